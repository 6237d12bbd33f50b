"""`tokenizer.train`: trains a tokenizer on the caption column of arrow files (and, given a `questions` input, the
questions of VQA arrows) and saves it with save_pretrained, so that `AutoTokenizer.from_pretrained(output_dir)` loads
it."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from tokenizers import ByteLevelBPETokenizer, processors
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import BertTokenizerFast, PreTrainedTokenizerFast, RobertaTokenizerFast

from vlflow.errors import StageError
from vlflow.stage import StageContext

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def iter_captions(arrow_files: list[Path], column: str = "caption") -> Iterator[str]:
    """Yields every caption of `column` (list<string> or string), reading one record batch at a time."""
    for path in arrow_files:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            if column not in reader.schema.names:
                raise StageError(f"no column {column!r} (has {reader.schema.names})", file=str(path))
            for i in range(reader.num_record_batches):
                for value in reader.get_batch(i).column(column).to_pylist():
                    if isinstance(value, list):
                        yield from (text for text in value if text)
                    elif value:
                        yield value


def train_wordpiece(texts: Iterator[str], vocab_size: int, lowercase: bool, min_frequency: int) -> BertTokenizerFast:
    backend = BertWordPieceTokenizer(lowercase=lowercase)
    backend.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BERT_SPECIALS)
    # BERT framing: [CLS] A [SEP], pairs [CLS] A [SEP] B [SEP] (the untrained wrapper had no ids to build it from)
    backend._tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]")))
    return BertTokenizerFast(tokenizer_object=backend._tokenizer, do_lower_case=lowercase)


def train_bpe(texts: Iterator[str], vocab_size: int, lowercase: bool, min_frequency: int) -> RobertaTokenizerFast:
    backend = ByteLevelBPETokenizer(lowercase=lowercase)
    backend.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=ROBERTA_SPECIALS)
    # RoBERTa framing: <s> A </s>, pairs <s> A </s></s> B </s>
    backend._tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")))
    return RobertaTokenizerFast(tokenizer_object=backend._tokenizer)


def _matching(directory: Path, glob: str, field: str) -> list[Path]:
    files = sorted(directory.glob(glob)) if directory.is_dir() else [directory]
    if not files:
        raise StageError(f"no files match {glob!r} in {directory}", field=field)
    return files


def train_tokenizer(ctx: StageContext) -> dict:
    p = ctx.params
    files = _matching(ctx.inputs["arrows"], p.files_glob, "with.files_glob")
    texts = iter_captions(files, p.caption_column)
    if ctx.inputs.get("questions") is not None:
        question_files = _matching(ctx.inputs["questions"], p.questions_glob, "with.questions_glob")
        texts = itertools.chain(texts, iter_captions(question_files, "questions"))
        files = files + question_files  # a new list: `texts` still iterates the caption files
    train = train_wordpiece if p.kind == "wordpiece" else train_bpe
    tokenizer: PreTrainedTokenizerFast = train(texts, p.vocab_size, p.lowercase, p.min_frequency)
    tokenizer.save_pretrained(str(ctx.output_dir))
    ctx.log.info("trained %s tokenizer, %d tokens, from %s", p.kind, len(tokenizer), [f.name for f in files])
    return {"vocab_size": len(tokenizer), "files": len(files)}
