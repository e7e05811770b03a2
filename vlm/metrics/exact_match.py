"""Exact match: the held-out accuracy of training runs (``val/acc``) and of the ablations' tiny scale."""

from __future__ import annotations

from collections.abc import Sequence

from vlm.metrics.base import MeanScore, Targets, reference_lists


def normalize_answer(text: str) -> str:
    """The exact-match normalisation: surrounding whitespace stripped, lower case."""
    return text.strip().lower()


def exact_match(pred: str, references: Sequence[str]) -> bool:
    """Whether ``pred`` equals one of ``references`` after ``normalize_answer``."""
    return any(normalize_answer(pred) == normalize_answer(ref) for ref in references)


class ExactMatch(MeanScore):
    """Share of predictions that ``exact_match`` one of their references."""

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = reference_lists(preds, targets)
        self._add([float(exact_match(p, r)) for p, r in zip(preds, refs)])
