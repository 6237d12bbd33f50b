"""`tokenizer.train`: trains a tokenizer on the caption column of arrow files (and, given a `questions` input, the
questions of VQA arrows) and saves it with save_pretrained, so that `AutoTokenizer.from_pretrained(output_dir)` loads
it."""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers, processors, trainers
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


# WordPiece training runs tokenizers' BPE trainer (as `WordPieceTrainer` does), but marks continuation characters by
# moving them into a private-use plane instead of giving them a "##" prefix: the trainer numbers the alphabet in sorted
# order, whereas "##x" tokens get ids in hash-map order, and merges of equal count are taken in id order. So the same
# captions gave different vocabularies (not only orders) from run to run; with the marked alphabet they give one.
CONTINUATION_BASE = 0xF0000  # Supplementary Private Use Area-A: U+F0000 + ord(c) for Basic Multilingual Plane chars
BMP_END = 0x10000
TEXTS_PER_CHUNK = 1000


def _mark_continuations(word: str) -> str:
    """`red` -> `r` + marked(e) + marked(d); characters outside the BMP (rare in captions) stay as they are."""
    return word[:1] + "".join(chr(CONTINUATION_BASE + ord(c)) if ord(c) < BMP_END else c for c in word[1:])


def _unmark(token: str, prefix: str = "##") -> str:
    """Inverse of `_mark_continuations` for a trained token: a token that starts with a marked char is a piece."""
    if not token:
        return token
    is_piece = CONTINUATION_BASE <= ord(token[0]) < CONTINUATION_BASE + BMP_END
    text = "".join(chr(ord(c) - CONTINUATION_BASE) if CONTINUATION_BASE <= ord(c) < CONTINUATION_BASE + BMP_END else c
                   for c in token)
    return prefix + text if is_piece else text


def train_wordpiece(texts: Iterator[str], vocab_size: int, lowercase: bool, min_frequency: int) -> BertTokenizerFast:
    framing = BertWordPieceTokenizer(lowercase=lowercase)  # its normalizer and pre-tokenizer split the captions
    normalizer, pre_tokenizer = framing._tokenizer.normalizer, framing._tokenizer.pre_tokenizer

    texts = iter(texts)  # consumed chunk by chunk
    mark = functools.lru_cache(maxsize=1 << 16)(_mark_continuations)  # captions repeat a small vocabulary

    def marked_words() -> Iterator[str]:
        # Captions go through the Rust normalizer and pre-tokenizer in chunks: per caption, the Python calls cost
        # more than the training (newlines separate captions like any whitespace)
        while chunk := list(itertools.islice(texts, TEXTS_PER_CHUNK)):
            words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str("\n".join(chunk)))
            yield " ".join(mark(word) for word, _ in words)

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BERT_SPECIALS,
                                  show_progress=False)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(marked_words(), trainer)
    vocab: dict[str, int] = {}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(_unmark(token), len(vocab))  # ids stay dense and in training order
    # With a vocabulary, the wrapper adds BERT's framing: [CLS] A [SEP], pairs [CLS] A [SEP] B [SEP]
    backend = BertWordPieceTokenizer(vocab, lowercase=lowercase)
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
