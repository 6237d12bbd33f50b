"""Evaluation metrics: box IoU / grounding recall@1, and caption BLEU-4 and CIDEr-D from their standard definitions
(Papineni et al. 2002; Vedantam et al. 2015 as implemented by coco-caption, whose package is not installed here).

Captions are compared after `tokenize`: lower-case, punctuation removed, split on whitespace (coco-caption's PTB
tokenizer does the same for plain English captions).
"""
from __future__ import annotations

import math
import re
from collections import Counter

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


# ---------------------------------------------------------------------------------------------------------------
# Boxes

def box_iou(a, b) -> float:
    """IoU of two x1,y1,x2,y2 boxes (degenerate boxes have zero area)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(predicted, gold_boxes, threshold: float = 0.5) -> bool:
    """Recall@1 criterion: the predicted box overlaps any gold box of the phrase with IoU >= threshold."""
    return any(box_iou(predicted, gold) >= threshold for gold in gold_boxes)


def merged_box(boxes: list) -> list:
    """The smallest box enclosing all of a phrase's gold boxes (MDETR flickr_eval._merge_boxes, the MERGED protocol)."""
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def recall_at_1(predictions: list, gold: list[list], threshold: float = 0.5) -> float:
    """predictions[i]: one box for phrase i; gold[i]: that phrase's gold boxes (any of them counts: ANY-BOX; pass
    `[[merged_box(boxes)]]` per phrase for the MERGED protocol)."""
    if not predictions:
        return 0.0
    return sum(grounding_hit(p, g, threshold) for p, g in zip(predictions, gold, strict=True)) / len(predictions)


# ---------------------------------------------------------------------------------------------------------------
# Captions

def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4: clipped n-gram precisions (n=1..4) pooled over the corpus, geometric mean, brevity penalty
    against the closest reference length (ties: the shorter). 0 when some precision is 0."""
    matched = [0] * 4
    total = [0] * 4
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references, strict=True):
        words = tokenize(candidate)
        ref_words = [tokenize(r) for r in refs]
        candidate_length += len(words)
        reference_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, 5):
            counts = ngrams(words, n)
            max_ref = Counter()
            for r in ref_words:
                max_ref |= ngrams(r, n)
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    if candidate_length == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / candidate_length)
    return brevity * math.exp(log_precision)


def cider_d(candidates: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (coco-caption): per n=1..4, TF-IDF n-gram vectors (tf = raw counts, idf from the reference sets of
    this corpus), similarity sum_g min(c_g, r_g) * r_g / (|c||r|) times a Gaussian length penalty
    exp(-(len_c - len_r)^2 / (2 sigma^2)); averaged over n and references, times 10, averaged over images."""
    ref_ngrams = [[[ngrams(tokenize(r), n) for n in range(1, 5)] for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_ngrams:
        document_frequency.update({g for ref in refs for counts in ref for g in counts})
    log_corpus = math.log(float(len(references))) if references else 0.0

    def vectors(counts_by_n):
        vecs, norms = [], []
        for counts in counts_by_n:
            vec = {g: c * (log_corpus - math.log(max(1.0, document_frequency[g]))) for g, c in counts.items()}
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms

    scores = []
    for candidate, refs in zip(candidates, ref_ngrams, strict=True):
        cand_words = tokenize(candidate)
        cand_vecs, cand_norms = vectors([ngrams(cand_words, n) for n in range(1, 5)])
        per_n = [0.0] * 4
        for ref in refs:
            ref_vecs, ref_norms = vectors(ref)
            delta = len(cand_words) - sum(ref[0].values())  # word counts
            for n in range(4):
                value = sum(min(v, ref_vecs[n].get(g, 0.0)) * ref_vecs[n].get(g, 0.0)
                            for g, v in cand_vecs[n].items())
                if cand_norms[n] and ref_norms[n]:
                    value /= cand_norms[n] * ref_norms[n]
                per_n[n] += value * math.exp(-(delta ** 2) / (2 * sigma ** 2))
        scores.append(sum(per_n) / 4 / max(len(refs), 1) * 10.0)
    return sum(scores) / len(scores) if scores else 0.0

