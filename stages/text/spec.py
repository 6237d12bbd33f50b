"""Stage specs of the text package (no torch/transformers imports here)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlflow.stage import Params, StageSpec


class TokenizerTrainParams(Params):
    kind: Literal["wordpiece", "bpe"] = Field(
        "wordpiece", description="wordpiece -> BertTokenizerFast, bpe -> byte-level RobertaTokenizerFast")
    vocab_size: int = Field(1000, ge=50)
    lowercase: bool = True
    files_glob: str = Field("*train*.arrow",
                            description="arrow files (inside the `arrows` input) to read captions from")
    caption_column: str = "caption"
    questions_glob: str = Field("vqav2_train.arrow",
                                description="VQA arrow files (inside the optional `questions` input) whose questions "
                                            "are read too")
    min_frequency: int = Field(1, ge=1)


TOKENIZER_TRAIN = StageSpec(
    name="tokenizer.train",
    entry="vlflow.stages.text.tokenizer:train_tokenizer",
    params=TokenizerTrainParams,
    inputs=("arrows",),
    optional_inputs=("questions",),
    description="Train a WordPiece/BPE tokenizer on arrow captions; saves a transformers-loadable directory",
)

STAGES = [TOKENIZER_TRAIN]
