"""Training progress for a terminal (a bar in optimizer steps) and for a log file (plain lines).

Lightning's default bar counts batches of the current epoch: with the endless training stream of
``VLMDataModule`` (no length) and ``max_steps`` set, its epoch reads ``0/-2`` (``max_epochs`` is -1)
and, with stdout redirected to a file (SLURM, nohup), a live bar prints nothing useful.
``StepProgressBar`` counts optimizer steps to ``trainer.estimated_stepping_batches`` (``max_steps``)
over the whole fit, resumes included. ``PlainProgress`` prints one line every ``every_n_steps``
optimizer steps: step, loss, learning rate, tokens/s, elapsed time and ETA, plus one line per
validation. ``progress_callbacks`` picks between them; the CLI (``runners.cli``) applies it.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from callbacks.telemetry import real_token_mask


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class StepProgressBar(TQDMProgressBar):
    """A tqdm training bar over optimizer steps: ``global_step`` of ``estimated_stepping_batches``
    (``max_steps`` when set), labelled with the epoch alone (no ``/-2`` when ``max_epochs`` is -1)."""

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        """Reset the bar as tqdm does per epoch, then span the whole fit in steps."""
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        total = trainer.estimated_stepping_batches
        bar.total = total if math.isfinite(total) else None
        bar.unit = "step"
        self._show(bar, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Move the bar to the current optimizer step."""
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total or 0):
            self._show(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def _show(bar: Any, step: int) -> None:
        if not bar.disable:
            bar.n = step
            bar.refresh()


class PlainProgress(Callback):
    """Print a plain progress line every ``every_n_steps`` optimizer steps (rank 0), for logs.

    ``every_n_steps``: default ``trainer.log_every_n_steps``. A line reads::

        step 120/300 (40%) | loss 2.3412 | lr 9.52e-04 | tokens/s 1,234 | elapsed 0:08:20 | ETA 0:12:30

    loss: the mean training loss of the steps since the last line (``training_step``'s loss);
    lr: the first parameter group's; tokens/s: real (non-padding) ``input_ids`` tokens of this
    process per second of training since the last line (validation time excluded; shown when batches
    are dicts with ``input_ids``); ETA: the remaining steps to ``estimated_stepping_batches`` at the
    mean pace of this run so far. After each validation: one line with the ``val`` metrics.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"every_n_steps must be >= 1 (or None: trainer.log_every_n_steps); got {every_n_steps}."
            )
        self.every_n_steps = every_n_steps
        self._start = self._window_start = self._paused_at = 0.0
        self._start_step = self._last_step = 0
        self._loss: Tensor | None = None
        self._tokens: Tensor | None = None

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clocks at the first step of this run (a resumed run counts from its step)."""
        self._start = self._window_start = time.perf_counter()
        self._start_step = self._last_step = trainer.global_step
        self._loss = self._tokens = None

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Sum the loss and tokens of the batch; print a line on every ``every_n_steps``-th step."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        if isinstance(batch, dict) and "input_ids" in batch:
            tokens = real_token_mask(batch).sum()
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        step, every = trainer.global_step, self.every_n_steps or trainer.log_every_n_steps
        if step != self._last_step and step % every == 0:
            self._print_line(trainer)

    def _print_line(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        finite = math.isfinite(total)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if finite else f"step {step}"]
        if self._loss is not None:
            parts.append(f"loss {float(self._loss) / (step - self._last_step):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        if self._tokens is not None:
            parts.append(f"tokens/s {float(self._tokens) / max(now - self._window_start, 1e-9):,.0f}")
        pace = (now - self._start) / max(step - self._start_step, 1)
        parts += [f"elapsed {_duration(now - self._start)}", f"ETA {_duration((total - step) * pace)}"]
        print(" | ".join(parts), flush=True)
        self._last_step, self._window_start, self._loss, self._tokens = step, now, None, None

    @rank_zero_only
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pause the tokens/s window."""
        self._paused_at = time.perf_counter()

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the validation metrics (not during the sanity check); resume the tokens/s window."""
        self._window_start += time.perf_counter() - self._paused_at
        if trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        shown = " | ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()))
        print(f"validation at step {trainer.global_step}" + (f" | {shown}" if shown else ""), flush=True)


def progress_callbacks(
    configured: list[Callback], enable_progress_bar: bool, terminal: bool
) -> tuple[list[Callback], bool]:
    """The progress callbacks to add to ``configured`` and the ``enable_progress_bar`` to use.

    On a terminal: a ``StepProgressBar`` unless the bar is disabled or another bar is configured.
    Otherwise (stdout redirected): a ``PlainProgress`` unless one is configured, and no live bar
    unless one is configured explicitly (a live bar in a log file is noise).
    """
    has_bar = any(isinstance(c, ProgressBar) for c in configured)
    if terminal:
        return ([StepProgressBar()] if enable_progress_bar and not has_bar else []), enable_progress_bar
    plain = [] if any(isinstance(c, PlainProgress) for c in configured) else [PlainProgress()]
    return plain, enable_progress_bar and has_bar
