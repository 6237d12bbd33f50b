"""MlmMasker's whole-word masking against transformers 4.2's DataCollatorForWholeWordMask (ViLT's collator): words of
`##` pieces are chosen whole under a budget of round(padded length x p) tokens, pads are candidates that predict
nothing, and each chosen token is then [MASK] 80%, random 10%, kept 10%."""
from collections import Counter

import pytest
import torch
from transformers import BertTokenizerFast
from vlflow.stages.vilt.data import MlmMasker

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "blue", "squ", "##a", "##re", "top"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def batch_of(tokenizer, texts, length=None):
    encoded = tokenizer(texts, padding="max_length" if length else "longest", max_length=length,
                        return_tensors="pt", return_special_tokens_mask=True)
    return dict(encoded)


def test_worked_case_a_word_that_overflows_the_budget_is_skipped(tokenizer):
    # [CLS] red squ ##a ##re circle [SEP]: words {1}, {2,3,4}, {5}. Budget round(7 x 4/7) = 4 tokens.
    batch = batch_of(tokenizer, ["red square circle"])
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0]) == \
        ["[CLS]", "red", "squ", "##a", "##re", "circle", "[SEP]"]
    masker = MlmMasker(tokenizer, 4 / 7, whole_word=True)
    outcomes = Counter()
    for seed in range(600):
        labels = masker(batch, torch.Generator().manual_seed(seed))["labels"][0]
        outcomes[tuple((labels != -100).nonzero().squeeze(1).tolist())] += 1
    # the 3-piece word taken first or second fills the budget with one single word (4 tokens); drawn after both
    # singles (1 order in 3) it would make 5 > 4 and is skipped, leaving the 2 single words
    assert set(outcomes) == {(1, 2, 3, 4), (2, 3, 4, 5), (1, 5)}
    assert outcomes[(1, 5)] / 600 == pytest.approx(1 / 3, abs=0.06)
    assert outcomes[(1, 2, 3, 4)] / 600 == pytest.approx(1 / 3, abs=0.06)

    # budget 2: the 3-piece word can never be chosen, both single words always are
    two = MlmMasker(tokenizer, 2 / 7, whole_word=True)
    for seed in range(50):
        labels = two(batch, torch.Generator().manual_seed(seed))["labels"][0]
        assert (labels != -100).nonzero().squeeze(1).tolist() == [1, 5]


def test_pads_up_to_the_padded_length_take_budget_and_predict_nothing(tokenizer):
    batch = batch_of(tokenizer, ["red square circle", "blue"])  # row 1 is padded within the batch
    # ViLT pads to max_text_len (40): budget round(40 x 0.15) = 6 over 3 words + 34 pads (+ 3 in-batch pads)
    masker = MlmMasker(tokenizer, 0.15, whole_word=True, padded_length=40)
    predicted = torch.stack([masker(batch, torch.Generator().manual_seed(s))["labels"] != -100 for s in range(400)])
    assert not predicted[:, 1, 3:].any() and not predicted[:, :, 0].any() and not predicted[:, 0, 6].any()
    # row 0: each of its 5 real tokens is predicted far less often than without pads in the candidate list
    row0_rate = predicted[:, 0, 1:6].float().mean()
    assert 0.05 < row0_rate < 0.25
    unpadded = MlmMasker(tokenizer, 0.15, whole_word=True)  # budget max(1, round(7 x 0.15)) = 1 token: a single
    for seed in range(30):
        labels = unpadded(batch, torch.Generator().manual_seed(seed))["labels"]
        assert (labels[0] != -100).sum() == 1 and (labels[0, 2:5] == -100).all()  # never the 3-piece word


def test_whole_word_masking_replaces_80_10_10_per_token(tokenizer):
    texts = ["red square circle top", "blue square", "top red circle blue square"] * 4
    batch = batch_of(tokenizer, texts, length=16)
    masker = MlmMasker(tokenizer, 0.3, whole_word=True)
    mask_id = tokenizer.mask_token_id
    counts = Counter()
    mixed_word = False
    for seed in range(300):
        out = masker(batch, torch.Generator().manual_seed(seed))
        chosen = out["labels"] != -100
        assert torch.equal(out["labels"][chosen], batch["input_ids"][chosen])  # labels are the originals
        assert torch.equal(out["input_ids"][~chosen], batch["input_ids"][~chosen])  # the rest is untouched
        inputs, originals = out["input_ids"][chosen], batch["input_ids"][chosen]
        counts["mask"] += int((inputs == mask_id).sum())
        counts["kept"] += int((inputs == originals).sum())
        counts["other"] += int(((inputs != mask_id) & (inputs != originals)).sum())
        squ = out["input_ids"][1, 2:5]  # "blue squ ##a ##re": the word is chosen whole, treated per token
        if (out["labels"][1, 2:5] != -100).all() and len(set((squ == mask_id).tolist())) == 2:
            mixed_word = True
    total = sum(counts.values())
    assert counts["mask"] / total == pytest.approx(0.8, abs=0.03)
    # random draws from the 12-token vocabulary hit the original 1 time in 12
    assert counts["other"] / total == pytest.approx(0.1 * 11 / 12, abs=0.025)
    assert counts["kept"] / total == pytest.approx(0.1 + 0.1 / 12, abs=0.025)
    assert mixed_word  # 80/10/10 is drawn per token, not per word (as transformers 4.2)
    again = masker(batch, torch.Generator().manual_seed(7))
    assert torch.equal(again["input_ids"], masker(batch, torch.Generator().manual_seed(7))["input_ids"])
