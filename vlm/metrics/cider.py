"""CIDEr-D: pycocoevalcap cider/cider_scorer.py (the coco-caption evaluation server's "CIDEr")."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from vlm.metrics.base import Targets, reference_lists
from vlm.metrics.ptb_tokenizer import ptb_tokenize


def _ngram_counts(sentence: str, n: int) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D of tokenised captions, reproducing pycocoevalcap's ``CiderScorer``.

    n-grams (1..n) of whitespace-split words are weighted by tf-idf, with document frequencies
    counted over the reference sets of this corpus and idf = log(#images) - log(max(1, df)). For
    each reference, per-n cosine similarity with clipping (sum of min(cand, ref) * ref over the
    norms), times a Gaussian length penalty exp(-delta^2 / (2 sigma^2)); averaged over n and over
    references and multiplied by 10. As in pycocoevalcap, the lengths entering delta are counted
    in bigrams (its ``if n == 1`` tests the 2-gram index); that equals the word-count difference
    whenever the similarity is non-zero. The corpus CIDEr-D is the mean of these scores.
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates for {len(references)} reference sets")
    if not candidates:
        return []
    cand_counts = [_ngram_counts(c, n) for c in candidates]
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({g for counts in refs for g in counts})
    log_images = math.log(float(len(candidates)))

    def vectorise(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = float(tf) * (log_images - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight**2
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = vectorise(cand)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = vectorise(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return scores


# Separators of the byte encoding of the CIDEr state; str.split() treats both as whitespace, so they
# can never occur inside a tokenised caption.
_CAPTION_SEP, _RECORD_SEP = "\x1f", "\x1e"


class CIDEr(Metric):
    """Corpus CIDEr-D (``cider_d``) of generated captions against reference captions (COCO style).

    Captions are tokenised with ``ptb_tokenize`` as in the official evaluation (``tokenize=False``
    for captions that are already tokenised). CIDEr's idf is computed over the whole evaluated
    corpus, so the tokenised captions are kept until ``compute``: as the UTF-8 bytes of
    separator-delimited records, stored as a list state of float tensors (in the metric's dtype:
    the empty-rank placeholder torchmetrics adds is of that dtype) and reduced with "cat". Under DDP
    every process therefore scores the full gathered corpus; single-process results are identical
    to pycocoevalcap's. The returned value is the CIDEr-D itself (x10 scale, typically 0-2), not
    bounded by 1; samples duplicated by a distributed sampler are counted twice.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        self.add_state("records", [], dist_reduce_fx="cat")

    def _prepare(self, caption: str) -> str:
        # Re-joining on whitespace keeps CIDEr's split() unchanged and removes the separators.
        return " ".join((ptb_tokenize(caption) if self.tokenize else caption).split())

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = reference_lists(preds, targets)
        text = "".join(
            _CAPTION_SEP.join([self._prepare(p), *(self._prepare(r) for r in rs)]) + _RECORD_SEP
            for p, rs in zip(preds, refs)
        )
        if not text:
            return
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        self.records.append(data.to(device=self.device, dtype=self.dtype))

    def compute(self) -> Tensor:
        if isinstance(self.records, Tensor):  # after a distributed sync
            parts = [self.records]
        else:
            parts = list(self.records)
        data = torch.cat(parts).to(torch.uint8).cpu().numpy().tobytes() if parts else b""
        candidates, references = [], []
        for record in data.decode("utf-8").split(_RECORD_SEP)[:-1]:
            pred, *refs = record.split(_CAPTION_SEP)
            candidates.append(pred)
            references.append(refs)
        if not candidates:
            return torch.tensor(float("nan"))
        return torch.tensor(math.fsum(cider_d(candidates, references, self.n, self.sigma)) / len(candidates))
