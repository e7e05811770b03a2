"""What the metrics share: reference lists from either target form, and the mean-of-scores state."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

Targets = Sequence[Sequence[str] | str]


def reference_lists(preds: Sequence[str], targets: Targets) -> list[list[str]]:
    """One list of reference answers per prediction (a single string target becomes a one-item list)."""
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
    refs = [[t] if isinstance(t, str) else list(t) for t in targets]
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference answer")
    return refs


class MeanScore(Metric):
    """Mean of per-sample scores, kept as a float64 sum and a count (both reduced with "sum")."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: Sequence[float]) -> None:
        self.score_sum += math.fsum(scores)
        self.count += len(scores)

    def compute(self) -> Tensor:
        return (self.score_sum / self.count).float()
