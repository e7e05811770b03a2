"""``MetricSummary``: keep a metric's value after every validation run and print the curve at the end.

The demo uses it to show ``val/acc`` from chance to its final value once ``fit`` returns (the
values are also in the logger, e.g. TensorBoard).
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class MetricSummary(Callback):
    """Record ``monitor`` (default ``val/acc``) at each validation run (not the sanity check) with its
    global step and elapsed time, and print them all at the end of ``fit``."""

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.history: list[tuple[int, float, float]] = []  # (global step, seconds since fit start, value)
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        self.history = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        self.history.append((trainer.global_step, time.perf_counter() - self._start, value))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history:
            rank_zero_info(f"{self.monitor}: not logged (no validation run with it).")
            return
        lines = [f"{self.monitor} after each validation run (step, elapsed):"]
        lines += [f"  step {step:>5d}  {seconds:7.1f}s  {value:.4f}" for step, seconds, value in self.history]
        lines.append(f"Final {self.monitor}: {self.history[-1][2]:.4f} at step {self.history[-1][0]}")
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)
