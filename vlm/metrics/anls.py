"""ANLS: the DocVQA / InfographicVQA evaluation script of the RRC (rrc.cvc.uab.es, docvqa.org)."""

from __future__ import annotations

from collections.abc import Sequence

from vlm.metrics.base import MeanScore, Targets, reference_lists


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions (characters)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        current = [j]
        for i, ca in enumerate(a, 1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(pred: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one answer, exactly as the official DocVQA/InfographicVQA script.

    For each reference, NL = levenshtein(norm(ref), norm(pred)) / max(len(ref), len(pred)) where
    ``norm`` lower-cases, strips and collapses whitespace, while the lengths are those of the raw
    strings (0 / 0 counts as NL = 0, so empty vs empty is a match). The score is 1 - min NL, set
    to 0 when it is below ``threshold``. Note the official comparison is ``1 - NL < threshold``:
    NL exactly 0.5 keeps 0.5, although the ST-VQA paper writes the rule as "NL < tau".
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    det = " ".join(pred.strip().lower().split())
    values = []
    for ref in references:
        length = max(len(ref.upper()), len(pred.upper()))
        dist = levenshtein_distance(" ".join(ref.strip().lower().split()), det)
        values.append(0.0 if length == 0 else dist / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


class ANLS(MeanScore):
    """Average normalised Levenshtein similarity (``anls_score``) over questions, in [0, 1]."""

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = reference_lists(preds, targets)
        self._add([anls_score(p, r, self.threshold) for p, r in zip(preds, refs)])
