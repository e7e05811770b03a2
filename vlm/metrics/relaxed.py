"""ChartQA relaxed accuracy: pix2struct/metrics.py relaxed_correctness (Methani et al. 2020)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlm.metrics.base import MeanScore, Targets, reference_lists

_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?%?")


def _to_float(text: str) -> float | None:
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(pred: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness (pix2struct's ``relaxed_correctness``).

    Both strings are stripped. If both parse as numbers and the target is not 0, the prediction is
    correct when |pred - target| / |target| <= 5%; otherwise it must equal the target up to case.
    A trailing "%" divides by 100 ("45%" equals "0.45", not "45"), as pix2struct does. Additions to
    pix2struct (which calls float() on the raw strings): surrounding whitespace is stripped and
    thousands separators in well-formed groups ("1,234.5") are removed.
    """
    pred, target = pred.strip(), target.strip()
    pred_value, target_value = _to_float(pred), _to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    return pred.lower() == target.lower()


class RelaxedAccuracy(MeanScore):
    """ChartQA relaxed accuracy: a prediction scores 1 if it ``relaxed_match``-es any target."""

    def __init__(self, max_relative_change: float = 0.05, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_relative_change = max_relative_change

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = reference_lists(preds, targets)
        self._add(
            [
                float(any(relaxed_match(p, t, self.max_relative_change) for t in r))
                for p, r in zip(preds, refs)
            ]
        )
