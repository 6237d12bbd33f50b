"""tokenizer.train: output loads with AutoTokenizer, for both kinds; bad input gives a clear error."""
import logging
import subprocess
import sys

import pyarrow as pa
import pytest
from transformers import AutoTokenizer, BertTokenizerFast, RobertaTokenizerFast
from vlflow.stages.text.spec import TOKENIZER_TRAIN
from vlflow.stages.text.tokenizer import BERT_SPECIALS

from vlflow.errors import StageError
from vlflow.stage import StageContext

CAPTIONS = [
    ["A red circle on a white background", "a small red circle"],
    ["A blue square next to a green triangle", "blue square and green triangle"],
    ["A yellow triangle", "the yellow triangle is large"],
]


def write_arrow(path, captions):
    table = pa.table({
        "image": pa.array([b"\x00"] * len(captions), pa.binary()),
        "caption": pa.array(captions, pa.list_(pa.string())),
        "image_id": [f"img_{i}.jpg" for i in range(len(captions))],
        "split": ["train"] * len(captions),
    })
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def run_stage(tmp_path, **params):
    arrows = tmp_path / "arrows"
    arrows.mkdir(exist_ok=True)
    write_arrow(arrows / "coco_caption_karpathy_train.arrow", CAPTIONS)
    write_arrow(arrows / "coco_caption_karpathy_test.arrow", [["zebra zebra zebra"]])
    spec = TOKENIZER_TRAIN
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="tok", params=spec.params(**params), inputs={"arrows": arrows}, output_dir=out,
                       log=logging.getLogger("test"))
    return spec.load()(ctx), out


def test_wordpiece_loads_with_autotokenizer(tmp_path):
    metrics, out = run_stage(tmp_path, kind="wordpiece", vocab_size=120)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, BertTokenizerFast)
    assert metrics["vocab_size"] == len(tok) <= 120
    ids = tok("A RED Circle")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]  # lowercased, whole words learned
    assert tok.mask_token == "[MASK]" and tok.pad_token_id == 0
    assert "zebra" not in tok.get_vocab()  # only the train split was read (files_glob)


def test_bpe_loads_with_autotokenizer(tmp_path):
    _, out = run_stage(tmp_path, kind="bpe", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, RobertaTokenizerFast)
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tok.mask_token == "<mask>"


def test_no_matching_files_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="files_glob"):
        run_stage(tmp_path, files_glob="*nothing*.arrow")


def test_questions_input_adds_the_vqa_questions_words(tmp_path):
    questions = tmp_path / "vqa"
    questions.mkdir()
    table = pa.table({"questions": pa.array([["What color is the circle?"] * 3, ["How many shapes?"] * 3],
                                            pa.list_(pa.string()))})
    with pa.OSFile(str(questions / "vqav2_train.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with_questions, without = tmp_path / "with", tmp_path / "without"
    for root, inputs in ((with_questions, {"questions": questions}), (without, {})):
        root.mkdir()
        arrows = root / "arrows"
        arrows.mkdir()
        write_arrow(arrows / "coco_caption_karpathy_train.arrow", CAPTIONS)
        (root / "out").mkdir()
        ctx = StageContext(stage="tok", params=TOKENIZER_TRAIN.params(vocab_size=200),
                           inputs={"arrows": arrows, **inputs}, output_dir=root / "out", log=logging.getLogger("t"))
        metrics = TOKENIZER_TRAIN.load()(ctx)
        assert metrics["files"] == 1 + len(inputs)
    assert {"what", "color", "many"} <= set(AutoTokenizer.from_pretrained(with_questions / "out").get_vocab())
    assert "what" not in AutoTokenizer.from_pretrained(without / "out").get_vocab()
    assert "circle" in AutoTokenizer.from_pretrained(with_questions / "out").get_vocab()  # captions still read


# Many words of equal frequency: tokenizers' trainers break ties between equal-count merges by token id, which for
# WordPiece's "##x" pieces used to follow hash-map order, so each process learnt a different vocabulary.
TIED_CAPTIONS = [[f"a {colour} {shape} at the {place}" for colour in ("red", "blue", "green", "yellow", "purple")
                  for shape in ("circle", "square")] for place in ("top", "left", "bottom", "right", "middle")]
TRAIN_IN_FRESH_PROCESS = """
import logging, sys
from pathlib import Path
from vlflow.stage import StageContext
from vlflow.stages.text.spec import TOKENIZER_TRAIN
arrows, out, kind, vocab_size = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
out.mkdir()
ctx = StageContext(stage="tok", params=TOKENIZER_TRAIN.params(kind=kind, vocab_size=vocab_size),
                   inputs={"arrows": arrows}, output_dir=out, log=logging.getLogger("t"))
TOKENIZER_TRAIN.load()(ctx)
"""


@pytest.mark.parametrize("kind, vocab_size", [("wordpiece", 120), ("bpe", 300)])
def test_two_trainings_in_fresh_processes_give_identical_files(tmp_path, kind, vocab_size):
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    write_arrow(arrows / "coco_caption_karpathy_train.arrow", TIED_CAPTIONS)
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        subprocess.run([sys.executable, "-c", TRAIN_IN_FRESH_PROCESS, str(arrows), str(out), kind, str(vocab_size)],
                       check=True, capture_output=True)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert sorted(outputs[0]) == sorted(outputs[1])
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], f"{kind}: {name} differs between two trainings"
    vocab = AutoTokenizer.from_pretrained(tmp_path / "first").get_vocab()
    assert not [t for t in vocab if any(0xF0000 <= ord(c) < 0x100000 for c in t)]  # no internal marker leaks out


def test_wordpiece_pieces_tokenize_unseen_words(tmp_path):
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    write_arrow(arrows / "coco_caption_karpathy_train.arrow", TIED_CAPTIONS)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="tok", params=TOKENIZER_TRAIN.params(vocab_size=70), inputs={"arrows": arrows},
                       output_dir=out, log=logging.getLogger("test"))
    TOKENIZER_TRAIN.load()(ctx)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]  # BERT's special ids first
    pieces = tok.tokenize("bluer")  # unseen word: a learnt prefix plus "##" continuation pieces
    assert pieces[0] != "[UNK]" and all(p.startswith("##") for p in pieces[1:]) and len(pieces) > 1
    assert tok.convert_tokens_to_string(pieces) == "bluer"
