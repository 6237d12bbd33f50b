"""VQAv2: the synthetic generator's question/annotation files, and arrow.vqav2's rows, answer vocabulary, soft
scores, held-out val and errors."""
import io
import json
import re
import shutil
from collections import Counter

import pyarrow as pa
import pytest
from PIL import Image
from vlflow.stages.data.arrow_vqa import (
    VQA_SCHEMA,
    answer_score,
    convert_vqav2,
    normalize_answer,
    official_accuracy,
    question_targets,
)
from vlflow.stages.data.errors import DataError
from vlflow.stages.data.spec import SyntheticCocoParams, VqaArrowParams
from vlflow.stages.data.synthetic import ANSWER_POOLS, COLOURS, SHAPES, generate_coco


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_vqa")
    # complete captions name every shape with colour and position: the answers can be checked against them
    generate_coco(root, SyntheticCocoParams(num_images=40, image_size=48, seed=5, vqa_questions_per_image=4,
                                            caption_style="complete",
                                            splits={"train": 30, "restval": 0, "val": 5, "test": 5}))
    return root


def read(path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def test_synthetic_vqa_files_follow_the_vqav2_layout(coco):
    karpathy = json.loads((coco / "karpathy" / "dataset_coco.json").read_text())["images"]
    for folder, images in (("train2014", 30), ("val2014", 10)):
        questions = json.loads((coco / f"v2_OpenEnded_mscoco_{folder}_questions.json").read_text())
        annotations = json.loads((coco / f"v2_mscoco_{folder}_annotations.json").read_text())
        assert questions["data_subtype"] == annotations["data_subtype"] == folder
        assert len(questions["questions"]) == len(annotations["annotations"]) == 4 * images
        ids = [q["question_id"] for q in questions["questions"]]
        assert len(set(ids)) == len(ids) and ids == [a["question_id"] for a in annotations["annotations"]]
        for q in questions["questions"]:
            assert (coco / folder / f"COCO_{folder}_{q['image_id']:012d}.jpg").is_file()
            assert q["question_id"] // 1000 == q["image_id"]  # VQA numbering
        for a in annotations["annotations"]:
            answers = [x["answer"] for x in a["answers"]]
            assert len(answers) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert Counter(answers)[a["multiple_choice_answer"]] == max(Counter(answers).values())
            assert a["answer_type"] in ("yes/no", "number", "other")
    assert {e["cocoid"] for e in karpathy} >= {q["image_id"] for q in questions["questions"]}


def test_synthetic_answers_are_right_about_the_picture(coco):
    """The majority answer of each question matches the scene as the captions describe it."""
    captions = {e["cocoid"]: e["sentences"][0]["raw"].lower()
                for e in json.loads((coco / "karpathy" / "dataset_coco.json").read_text())["images"]}
    questions = {q["question_id"]: q for q in
                 json.loads((coco / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]}
    checked = Counter()
    for a in json.loads((coco / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]:
        text, answer = questions[a["question_id"]]["question"], normalize_answer(a["multiple_choice_answer"])
        said = captions[a["image_id"]]
        if m := re.fullmatch(r"What color is the shape (.+)\?", text):
            where = m.group(1)
            assert re.search(rf"{answer} \w+ {where}|{where} an? {answer}", said), (text, answer, said)
            checked["colour"] += 1
        elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", text):
            assert (f"{m.group(1)} {m.group(2)}" in said) == (answer == "yes"), (text, answer, said)
            checked["yes/no"] += 1
        elif text == "How many shapes are there?":
            named = sum(said.count(f"{c} {k}") for c in COLOURS for k in SHAPES)
            assert answer == str(named), (answer, said)
            checked["count"] += 1
    assert min(checked.values()) >= 3, checked
    assert set(ANSWER_POOLS["count"]) == {"1", "2", "3"}


def test_vqa_files_do_not_change_the_captions_or_images(coco, tmp_path):
    plain = tmp_path / "plain"
    generate_coco(plain, SyntheticCocoParams(num_images=40, image_size=48, seed=5, caption_style="complete",
                                             splits={"train": 30, "restval": 0, "val": 5, "test": 5}))
    assert not list(plain.glob("v2_*.json"))
    assert (plain / "karpathy" / "dataset_coco.json").read_bytes() == (coco / "karpathy" /
                                                                       "dataset_coco.json").read_bytes()
    for image in (plain / "val2014").iterdir():
        assert image.read_bytes() == (coco / "val2014" / image.name).read_bytes()


def test_answer_normalisation_and_scores():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer(" Yes! ") == "yes"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("3.5") == "3.5"
    assert [answer_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    given = [{"answer": a} for a in ("Two", "two", "2", "3", "many", "lots", "?", "", "4", "4")]
    # ViLT looks the annotators' answers up as given: only the literal "2" votes for "2"
    assert question_targets({"answers": given}, {"2": 0, "3": 1, "5": 2}) == ([0, 1], [0.3, 0.3])
    # normalized: "Two", "two" and "2" are three votes for "2"
    assert question_targets({"answers": given}, {"2": 0, "3": 1, "5": 2}, normalize=True) == ([0, 1], [0.9, 0.3])


@pytest.mark.parametrize("predicted, annotators, accuracy", [
    # all 10 the same string: nothing is normalised, "2" does not match "two" (the official rule, for OCR answers)
    ("2", ["two"] * 10, 0.0),
    ("two", ["two"] * 10, 1.0),
    # they disagree: both sides normalised; 5 of "two"/"2" -> every leave-one-out subset has >= 3 matches
    ("2", ["two"] * 3 + ["2"] * 2 + ["three"] * 5, 1.0),
    # 2 matching annotators: subsets without one of them see 1 match (1/3), the other 8 subsets see 2 (2/3)
    ("yes", ["yes", "Yes"] + ["no"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
    # 3 matching annotators: the 3 subsets without one of them see 2 (2/3), the other 7 see 3 (1) -> 0.9.
    # Punctuation next to a space is removed, elsewhere it becomes a space; a period not between digits goes
    ("tennis racket", ["tennis-racket", "tennis racket!", "tennis racket."] + ["ball"] * 7, 0.9),
    ("3.5", ["3.5", "3.5", "3.5", "4"] + ["5"] * 6, 0.9),
    ("dog", ["the dog", "a dog", "dog", "an apple"] + ["cat"] * 6, 0.9),  # articles
    ("don't", ["dont", "dont", "don't"] + ["yes"] * 7, 0.9),  # its contraction table
    ("1000", ["1,000", "1000", "1,000"] + ["many"] * 7, 0.9),  # a comma between digits strips all punctuation
    ("#1", ["#1", "#1", "#1", "1"] + ["one"] * 6, 0.9),  # '#' is not in its punctuation list: "#1" stays
    ("dog", ["dog"] * 4 + ["cat"] * 6, 1.0),  # 4 matching: every subset sees >= 3
])
def test_official_vqa_accuracy_on_worked_cases(predicted, annotators, accuracy):
    """Each case as GT-Vision-Lab/VQA vqaEval.py scores it (checked against it on 20,000 random cases: see
    docs/FIDELITY.md)."""
    assert official_accuracy(predicted, annotators) == pytest.approx(accuracy)


def test_vocabulary_normalisation_is_vilts():
    """ViLT's glossary.normalize_word: the official normalisation, then commas dropped."""
    assert normalize_answer("Red, White") == "red white"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("#1") == "#1" and normalize_answer("100%") == "100%"  # not in the punctuation list
    assert normalize_answer("hes") == "he's" and normalize_answer("Im") == "im"  # its table's keys, as written


def test_arrows_rows_labels_and_held_out_val(coco, tmp_path):
    report = convert_vqav2(coco, tmp_path, VqaArrowParams(rest_val_images=4, batch_rows=3, min_answer_count=2))
    answers = json.loads((tmp_path / "vqa_answers.json").read_text())["label2answer"]
    assert len(answers) == len(set(answers)) and "2" in answers and "two" not in answers
    annotations = {a["question_id"]: a for folder in ("train2014", "val2014") for a in
                   json.loads((coco / f"v2_mscoco_{folder}_annotations.json").read_text())["annotations"]}
    tables = {s: read(tmp_path / f"vqav2_{s}.arrow") for s in ("train", "val", "trainable_val", "rest_val")}
    assert tables["train"].schema.names == ["image", "questions", "answers", "answer_labels", "answer_scores",
                                            "image_id", "question_id", "split"]
    assert report.splits["train"]["rows"] == 30 and report.splits["val"]["rows"] == 10
    for row in tables["train"].to_pylist() + tables["val"].to_pylist():
        assert Image.open(io.BytesIO(row["image"])).size[0] == 48
        assert len(row["questions"]) == len(row["answer_labels"]) == len(row["question_id"])
        for qid, labels, scores, texts in zip(row["question_id"], row["answer_labels"], row["answer_scores"],
                                              row["answers"]):
            given = Counter(x["answer"] for x in annotations[qid]["answers"])  # raw, as ViLT
            expected = {answers.index(a): answer_score(n) for a, n in given.items() if a in answers}
            assert dict(zip(labels, scores)) == expected
            assert texts == [answers[label] for label in labels]
    # rest_val is the last 4 images of val, trainable_val the others, in order
    val_ids = tables["val"].column("image_id").to_pylist()
    assert tables["trainable_val"].column("image_id").to_pylist() == val_ids[:-4]
    assert tables["rest_val"].column("image_id").to_pylist() == val_ids[-4:]
    # the order is a seeded shuffle: the same seed gives the same rows, another seed another order
    again, other = tmp_path / "again", tmp_path / "other"
    convert_vqav2(coco, again, VqaArrowParams(rest_val_images=4, min_answer_count=2))
    convert_vqav2(coco, other, VqaArrowParams(rest_val_images=4, min_answer_count=2, seed=1))
    assert read(again / "vqav2_val.arrow").equals(tables["val"])
    assert read(other / "vqav2_val.arrow").column("image_id").to_pylist() != val_ids


def test_every_split_vilt_opens_is_written_typed_and_val_keeps_the_annotators_answers(coco, tmp_path):
    convert_vqav2(coco, tmp_path, VqaArrowParams(rest_val_images=4, min_answer_count=2))
    # ViLT's VQAv2Dataset opens vqav2_{train,trainable_val,rest_val,test} (+ test-dev): no question files for
    # test here, so they are written with 0 rows and the full schema, and open as ViLT opens them
    for name in ("train", "val", "trainable_val", "rest_val", "test", "test-dev"):
        with pa.memory_map(str(tmp_path / f"vqav2_{name}.arrow"), "r") as source:
            table = pa.ipc.RecordBatchFileReader(source).read_all()
        assert table.schema.equals(VQA_SCHEMA), name
        assert (len(table) == 0) == name.startswith("test"), name
    raw = {a["question_id"]: [x["answer"] for x in a["answers"]]
           for a in json.loads((coco / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]}
    for split in ("val", "rest_val"):
        gt = json.loads((tmp_path / f"vqav2_{split}_gt.json").read_text())
        question_ids = [q for ids in read(tmp_path / f"vqav2_{split}.arrow").column("question_id").to_pylist()
                        for q in ids]
        assert sorted(map(int, gt)) == sorted(question_ids) and all(gt[str(q)] == raw[q] for q in question_ids)


def test_normalized_annotator_answers_are_an_option(coco, tmp_path):
    """Annotators' answers normalised before the lookup: every target row scores each vocabulary answer by the
    normalised votes (the synthetic annotators write numbers both ways)."""
    convert_vqav2(coco, tmp_path, VqaArrowParams(min_answer_count=2, annotator_answers="normalized"))
    answers = json.loads((tmp_path / "vqa_answers.json").read_text())["label2answer"]
    annotations = {a["question_id"]: a for a in
                   json.loads((coco / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]}
    normalized = read(tmp_path / "vqav2_train.arrow")
    for row in normalized.to_pylist():
        for qid, labels, scores in zip(row["question_id"], row["answer_labels"], row["answer_scores"]):
            given = Counter(normalize_answer(x["answer"]) for x in annotations[qid]["answers"])
            assert dict(zip(labels, scores)) == {answers.index(a): answer_score(n) for a, n in given.items()
                                                 if a in answers}
    convert_vqav2(coco, tmp_path / "raw", VqaArrowParams(min_answer_count=2))
    raw = read(tmp_path / "raw" / "vqav2_train.arrow")
    assert raw.column("answer_scores").to_pylist() != normalized.column("answer_scores").to_pylist()


def test_rare_answers_leave_the_vocabulary_and_their_questions_the_rows(coco, tmp_path):
    convert_vqav2(coco, tmp_path, VqaArrowParams(min_answer_count=15, rest_val_images=0))
    answers = json.loads((tmp_path / "vqa_answers.json").read_text())["label2answer"]
    majority = Counter(normalize_answer(a["multiple_choice_answer"]) for folder in ("train2014", "val2014")
                       for a in json.loads((coco / f"v2_mscoco_{folder}_annotations.json").read_text())["annotations"])
    assert set(answers) == {a for a, n in majority.items() if n >= 15} and len(answers) < len(majority)
    train = read(tmp_path / "vqav2_train.arrow").to_pylist()
    kept = sum(len(r["questions"]) for r in train)
    assert 0 < kept < 120  # questions whose annotators gave no vocabulary answer are dropped
    assert all(labels for r in train for labels in r["answer_labels"])


def test_test_splits_are_written_without_answers_when_present(coco, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(coco, root)
    (root / "test2015").mkdir()
    Image.new("RGB", (48, 48)).save(root / "test2015" / "COCO_test2015_000000000007.jpg")
    questions = [{"image_id": 7, "question": "What color is it?", "question_id": 7000}]
    for subtype in ("test2015", "test-dev2015"):
        (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps({"questions": questions}))
    convert_vqav2(root, tmp_path / "out", VqaArrowParams(min_answer_count=2, rest_val_images=2))
    for split in ("test", "test-dev"):
        rows = read(tmp_path / "out" / f"vqav2_{split}.arrow").to_pylist()
        assert [(r["image_id"], r["questions"], r["answer_labels"], r["split"]) for r in rows] == \
            [(7, ["What color is it?"], [], split)]


def test_missing_and_malformed_files_name_file_and_field(coco, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(coco, root)
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()
    with pytest.raises(DataError, match="val questions not found"):
        convert_vqav2(root, tmp_path / "out", VqaArrowParams())
    shutil.copy(coco / "v2_OpenEnded_mscoco_val2014_questions.json", root)
    path = root / "v2_mscoco_train2014_annotations.json"
    data = json.loads(path.read_text())
    del data["annotations"][3]["answers"][2]["answer"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as failure:
        convert_vqav2(root, tmp_path / "out", VqaArrowParams())
    assert "v2_mscoco_train2014_annotations.json" in str(failure.value)
    assert "annotations[3].answers[2].answer" in str(failure.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_images_input_supplies_the_image_folders(coco, tmp_path):
    questions_only = tmp_path / "vqa_download"
    questions_only.mkdir()
    for path in coco.glob("v2_*.json"):
        shutil.copy(path, questions_only)
    convert_vqav2(questions_only, tmp_path / "out", VqaArrowParams(min_answer_count=2, rest_val_images=2),
                  images=coco)
    convert_vqav2(coco, tmp_path / "reference", VqaArrowParams(min_answer_count=2, rest_val_images=2))
    for split in ("train", "val", "trainable_val", "rest_val"):
        assert read(tmp_path / "out" / f"vqav2_{split}.arrow").equals(read(tmp_path / "reference" /
                                                                           f"vqav2_{split}.arrow"))
    # without it, every image is missing from the questions-only root: an error, not empty arrows
    with pytest.raises(DataError) as info:
        convert_vqav2(questions_only, tmp_path / "missing", VqaArrowParams(min_answer_count=2))
    assert str(info.value).startswith(f"{questions_only / 'v2_mscoco_train2014_annotations.json'}: every image of "
                                      "split 'train' is bad (")
    assert ": missing file); nothing to convert" in str(info.value)


def test_a_dropped_val_image_moves_the_held_out_cut(coco, tmp_path):
    """trainable_val and rest_val are written along with val when no val image is dropped; when one is, they are
    cut from the val actually written (rest_val: its last rows), as ViLT cuts the written table."""
    params = VqaArrowParams(rest_val_images=4, batch_rows=3, min_answer_count=2)
    convert_vqav2(coco, tmp_path / "whole", params)
    root = tmp_path / "root"
    shutil.copytree(coco, root)
    dropped = read(tmp_path / "whole" / "vqav2_val.arrow").column("image_id").to_pylist()[2]
    (root / "val2014" / f"COCO_val2014_{dropped:012d}.jpg").write_bytes(b"not a jpeg")
    report = convert_vqav2(root, tmp_path / "out", params)
    for directory, val_rows in ((tmp_path / "whole", 10), (tmp_path / "out", 9)):
        val = read(directory / "vqav2_val.arrow")
        assert len(val) == val_rows
        assert read(directory / "vqav2_trainable_val.arrow").equals(val.slice(0, val_rows - 4))
        assert read(directory / "vqav2_rest_val.arrow").equals(val.slice(val_rows - 4))
        assert not list(directory.glob("*.tmp"))
        saved = json.loads((directory / "report.json").read_text())
        assert list(saved["splits"]) == ["train", "val", "test", "test-dev", "trainable_val", "rest_val"]
        assert [saved["splits"][s]["rows"] for s in ("trainable_val", "rest_val")] == [val_rows - 4, 4]
        gt = json.loads((directory / "vqav2_rest_val_gt.json").read_text())
        assert sorted(map(int, gt)) == sorted(q for ids in val.slice(val_rows - 4).column("question_id").to_pylist()
                                              for q in ids)
    assert dropped not in read(tmp_path / "out" / "vqav2_val.arrow").column("image_id").to_pylist()
    assert [b["split"] for b in report.bad_images] == ["val"]
