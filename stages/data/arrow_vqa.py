"""arrow.vqav2: VQAv2 questions + annotations and COCO images -> ViLT's vqav2_{split}.arrow files.

As ViLT's write_vqa.py: one row per image with the image's questions; the answer vocabulary is every
`multiple_choice_answer` of train + val, normalised as ViLT's glossary (the official VQA evaluation's punctuation,
number words, articles and contractions, then commas dropped), seen at least `min_answer_count` (9) times; each
question's labels are the vocabulary answers its 10 annotators gave, looked up raw as ViLT does (`annotator_answers:
normalized` normalises them first, so an annotator's "two" also counts for the label "2": ~2.8% of VQAv2 training
targets differ), scored 0.3 per annotator (capped at 1.0); train/val questions without any vocabulary answer are
dropped, and so are images left without questions. `vqav2_val` is split into `vqav2_trainable_val` and the last
`rest_val_images` rows, `vqav2_rest_val` (ViLT's held-out val). Every file ViLT's VQAv2 data module opens is written:
`vqav2_test` and `vqav2_test-dev` too, with 0 rows (same schema) when their question files are absent (ViLT's
BaseDataset indexes the tables it found by the names it asked for, so a missing file is an IndexError there).

One deliberate difference: rows are ordered by a seeded shuffle (ViLT shuffles without a seed, so its rest_val is a
different random set on every conversion). Also writes `vqa_answers.json` (the label -> answer list), which the VQA
stages read, and `vqav2_{split}_gt.json` for the val splits: each question's 10 raw annotator answers, for the
official VQA accuracy in vilt.evaluate_vqa.

Inputs: `root` holds the v2_*.json files (and image folders); the optional `images` input is another directory with
COCO image folders (train2014/, val2014/, test2015/, e.g. the COCO download), searched before `root`.
"""
from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from .arrow_common import ConversionReport, ImageRow, check_unique, convert, load_json, require, write_rows_of
from .errors import DataError

VQA_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("questions", pa.list_(pa.string())),
    ("answers", pa.list_(pa.list_(pa.string()))),
    ("answer_labels", pa.list_(pa.list_(pa.int64()))),
    ("answer_scores", pa.list_(pa.list_(pa.float64()))),
    ("image_id", pa.int64()),
    ("question_id", pa.list_(pa.int64())),
    ("split", pa.string()),
])
ANSWERS_FILE = "vqa_answers.json"
# split -> (questions file subtype, image folder, annotated)
SOURCES = {
    "train": ("train2014", "train2014", True),
    "val": ("val2014", "val2014", True),
    "test": ("test2015", "test2015", False),
    "test-dev": ("test-dev2015", "test2015", False),
}

# The official VQA evaluation's answer normalisation (GT-Vision-Lab/VQA vqaEval.py; ViLT's glossary.py uses the same
# lists): punctuation removed (next to a space, or anywhere when a comma sits between digits) or else replaced by a
# space, periods not between digits removed, then lower case, number words as digits, articles dropped and its
# contraction table applied word by word. Its table, quirks included ("somebody'd" -> "somebodyd"; capitalised keys
# never match the lower-cased words).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
    "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
    "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
    "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
    "somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll "
    "thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's "
    "theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've "
    "twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll "
    "whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've "
    "whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll "
    "whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
    "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've "
    "y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll "
    "youre=you're youve=you've").split())
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in the official code
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official evaluation's processPunctuation (the tests are checked on the original `text`)."""
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """The official evaluation's processDigitArticle: lower case, number words as digits, no articles,
    contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


@functools.lru_cache(maxsize=1 << 16)  # VQA's answers repeat ("yes", "2", ...): normalise each string once
def normalize_answer(answer: str) -> str:
    """ViLT's normalize_word (glossary.py): the official normalisation, then commas dropped. Makes the vocabulary."""
    return process_digit_article(process_punctuation(answer)).replace(",", "")


def official_accuracy(predicted: str, annotator_answers: list[str]) -> float:
    """The official VQA accuracy of one answer: min(1, matching annotators / 3) averaged over the leave-one-out
    subsets of the annotators. Answers are normalised only when the annotators disagree (all the same string: both
    compared as given, after whitespace cleaning), as vqaEval.py does."""
    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    given = [clean(a) for a in annotator_answers]
    predicted = clean(predicted)
    if len(set(given)) > 1:
        given = [process_digit_article(process_punctuation(a)) for a in given]
        predicted = process_digit_article(process_punctuation(predicted))
    matches = sum(a == predicted for a in given)
    # leaving out a matching annotator leaves matches - 1 matching others, a non-matching one leaves matches
    per_subset = [min(1.0, (matches - (a == predicted)) / 3) for a in given]
    return sum(per_subset) / len(per_subset) if per_subset else 0.0


def answer_score(count: int) -> float:
    """VQA's soft score for an answer `count` of the 10 annotators gave, in ViLT's steps (0.3 each, 4+ -> 1)."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _types(values) -> set[type]:
    return set(map(type, values))  # C speed: no Python-level isinstance per value


def _well_formed_questions(items: list) -> bool:
    """The common case, checked column by column (the field-by-field walk below names the first problem when this
    is False; it also accepts the subclasses this check leaves to it)."""
    try:
        ids = [q["question_id"] for q in items]
        return (_types(ids) <= {int} and _types([q["image_id"] for q in items]) <= {int}
                and _types([q["question"] for q in items]) <= {str} and len(set(ids)) == len(ids))
    except (KeyError, TypeError):
        return False


def _well_formed_annotations(items: list) -> bool:
    try:
        ids = [a["question_id"] for a in items]
        given = [a["answers"] for a in items]
        return (_types(ids) <= {int} and _types([a["multiple_choice_answer"] for a in items]) <= {str}
                and _types(given) <= {list} and _types([g["answer"] for answers in given for g in answers]) <= {str}
                and len(set(ids)) == len(ids))
    except (KeyError, TypeError):
        return False


def _questions(root: Path, subtype: str) -> tuple[Path, list[dict]]:
    path = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    items = require(load_json(path), "questions", path, "", list)
    if _well_formed_questions(items):
        return path, items
    seen: dict = {}
    for i, q in enumerate(items):
        for key, kind in (("image_id", int), ("question_id", int), ("question", str)):
            require(q, key, path, f"questions[{i}]", kind)
        check_unique(seen, q["question_id"], path, f"questions[{i}]", f"questions[{i}] (question_id "
                                                                      f"{q['question_id']})")
    return path, items


def _annotations(root: Path, subtype: str) -> tuple[Path, list[dict]]:
    path = root / f"v2_mscoco_{subtype}_annotations.json"
    items = require(load_json(path), "annotations", path, "", list)
    if _well_formed_annotations(items):
        return path, items
    seen: dict = {}
    for i, a in enumerate(items):
        require(a, "question_id", path, f"annotations[{i}]", int)
        check_unique(seen, a["question_id"], path, f"annotations[{i}]", f"annotations[{i}] (question_id "
                                                                         f"{a['question_id']})")
        require(a, "multiple_choice_answer", path, f"annotations[{i}]", str)
        for j, given in enumerate(require(a, "answers", path, f"annotations[{i}]", list)):
            require(given, "answer", path, f"annotations[{i}].answers[{j}]", str)
    return path, items


def answer_vocabulary(annotations: list[list[dict]], min_count: int) -> list[str]:
    """Normalised majority answers of all annotated splits seen >= min_count times, in first-seen order (ViLT)."""
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for items in annotations for a in items)
    return [answer for answer, n in counts.items() if n >= min_count]


def question_targets(annotation: dict, label_of: dict[str, int],
                     normalize: bool = False) -> tuple[list[int], list[float]]:
    """(labels, scores) of one question: each vocabulary answer its annotators gave, with its soft score. The
    annotators' answers are looked up as given (ViLT), or normalised first (`normalize`)."""
    given = [normalize_answer(a["answer"]) if normalize else a["answer"] for a in annotation["answers"]]
    labels, scores = [], []
    for answer in dict.fromkeys(given):  # first-seen order, as a Counter's; counting 10 answers in C is cheaper
        label = label_of.get(answer)
        if label is not None:
            labels.append(label)
            scores.append(answer_score(given.count(answer)))
    return labels, scores


def vqa_rows(root: Path, params, images: Path | None = None
             ) -> tuple[dict[str, list[ImageRow]], list[str], Path, dict[int, list[str]]]:
    """Rows per split, the answer vocabulary, the file named in errors and the val questions' raw annotator
    answers (question_id -> answers, for the official accuracy)."""
    root = Path(root)
    present = {split: src for split, src in SOURCES.items()
               if (root / f"v2_OpenEnded_mscoco_{src[0]}_questions.json").is_file()}
    for split in ("train", "val"):
        if split not in present:
            raise DataError(f"VQAv2 {split} questions not found (expected "
                            f"v2_OpenEnded_mscoco_{SOURCES[split][0]}_questions.json in the root)", file=str(root))
    annotations = {split: _annotations(root, SOURCES[split][0]) for split in ("train", "val")}
    answers = answer_vocabulary([items for _, items in annotations.values()], params.min_answer_count)
    if not answers:
        raise DataError(f"no answer is the majority answer of {params.min_answer_count}+ questions; lower "
                        f"min_answer_count", file=str(annotations["train"][0]))
    label_of = {answer: i for i, answer in enumerate(answers)}

    rows: dict[str, list[ImageRow]] = {}
    for split, (subtype, folder, annotated) in present.items():
        questions_path, questions = _questions(root, subtype)
        targets = {}
        if annotated:
            normalize = params.annotator_answers == "normalized"
            targets = {a["question_id"]: question_targets(a, label_of, normalize) for a in annotations[split][1]}
        per_image: dict[int, list[dict]] = {}
        for i, q in enumerate(questions):
            if annotated:
                if q["question_id"] not in targets:
                    raise DataError(f"question {q['question_id']} has no annotation", file=str(questions_path),
                                    field=f"questions[{i}]")
                if not targets[q["question_id"]][0]:  # no vocabulary answer: ViLT drops the question
                    continue
            per_image.setdefault(q["image_id"], []).append(q)
        image_ids = sorted(per_image)
        random.Random(f"{params.seed}-{split}").shuffle(image_ids)
        image_dir = images / folder if images is not None and (Path(images) / folder).is_dir() else root / folder
        rows[split] = []
        for image_id in image_ids:
            qs = per_image[image_id]
            labels = [targets[q["question_id"]][0] for q in qs] if annotated else []
            rows[split].append(ImageRow(f"{image_dir}/COCO_{folder}_{image_id:012d}.jpg", {  # str: Path() is slow
                "questions": [q["question"] for q in qs],
                "answers": [[answers[label] for label in ls] for ls in labels],
                "answer_labels": labels,
                "answer_scores": [targets[q["question_id"]][1] for q in qs] if annotated else [],
                "image_id": image_id,
                "question_id": [q["question_id"] for q in qs],
                "split": split,
            }))
    for split in SOURCES:  # ViLT's data module opens every one of them: 0 rows rather than no file
        rows.setdefault(split, [])
    raw = {a["question_id"]: [given["answer"] for given in a["answers"]] for a in annotations["val"][1]}
    return rows, answers, annotations["train"][0], raw


def gt_file(split: str) -> str:
    return f"vqav2_{split}_gt.json"


def convert_vqav2(root: Path, out_dir: Path, params, images: Path | None = None) -> ConversionReport:
    out_dir = Path(out_dir)
    rows, answers, source, raw = vqa_rows(Path(root), params, Path(images) if images is not None else None)
    # ViLT's held-out val: the last rest_val_images rows of the written val; the rest is trainable. Both are written
    # with val when no val image is dropped (the cut is then known beforehand), else copied from the written val.
    planned = len(rows["val"])
    planned_cut = max(0, planned - params.rest_val_images)
    held_out = {"trainable_val": (0, planned_cut), "rest_val": (planned_cut, planned)}
    report = convert(Path(root), out_dir, source, rows, lambda split: f"vqav2_{split}.arrow", VQA_SCHEMA, params,
                     copies={"val": held_out})
    val = out_dir / "vqav2_val.arrow"
    val_rows = report.splits["val"]["rows"]
    cut = max(0, val_rows - params.rest_val_images)
    for split, (start, stop) in (("trainable_val", (0, cut)), ("rest_val", (cut, val_rows))):
        if split not in report.splits:
            write_rows_of(val, out_dir / f"vqav2_{split}.arrow", start, stop, split=split, report=report)
        report.splits[split] = report.splits.pop(split)  # listed after the question files' splits, as before
    report.write(out_dir)
    (out_dir / ANSWERS_FILE).write_text(json.dumps({"label2answer": answers,
                                                    "min_answer_count": params.min_answer_count}, indent=1))
    with pa.memory_map(str(val)) as mapped:  # only this column's pages are read
        question_ids = pa.ipc.open_file(mapped).read_all().column("question_id").to_pylist()
    for split in ("val", "trainable_val", "rest_val"):  # trainable_val and rest_val are val's rows [0, cut), [cut, end)
        start, stop = {"val": (0, val_rows), "trainable_val": (0, cut), "rest_val": (cut, val_rows)}[split]
        (out_dir / gt_file(split)).write_text(json.dumps({str(q): raw[q] for ids in question_ids[start:stop]
                                                          for q in ids}))
    return report


def vqav2_stage(ctx) -> dict:
    report = convert_vqav2(ctx.inputs["root"], ctx.output_dir, ctx.params, ctx.inputs.get("images"))
    metrics = report.metrics()
    metrics["answers"] = len(json.loads((ctx.output_dir / ANSWERS_FILE).read_text())["label2answer"])
    return metrics
