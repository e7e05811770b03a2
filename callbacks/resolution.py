"""Resolution ramp-up: raise the data pipeline's maximum image resolution at given global steps.

Idefics2 §4.2 pretrains at 384 px then 980 px; Idefics3 §5.2.1 goes from 364 to 1820. The callback
calls ``trainer.datamodule.set_max_resolution(n)`` (``VLMDataModule``; per-source
``max_image_resolution`` still caps it).

Changing the encoder is not enough by itself: dataloader workers hold copies of the pipeline, the
packing buffer holds documents already encoded at the old resolution, and Lightning's fetcher has
a batch prefetched. Lightning 2.6 has no public way to re-create the train dataloader at a step
boundary (``reload_dataloaders_every_n_epochs`` acts at epoch starts, and the training stream is
one endless epoch), so ``restart_train_stream`` re-iterates the fit loop's data fetcher (its
``iter()`` makes a fresh loader iterator, new workers included, and prefetches again). The
``ResumableLoader`` then starts a new segment of its stream: each partition continues after the
window it was in (``datamodules.streaming``), so nothing before is replayed. Every batch from the
scheduled step on is at the new resolution, whatever ``num_workers``. Resume is exact: the loader
checkpoints its position and the settings it belongs to, the DataModule its ``max_resolution``,
this callback the resolution it applied (``state_dict``).
"""

from __future__ import annotations

import bisect
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


def restart_train_stream(trainer: Trainer) -> None:
    """Make the fit loop's next batch come from a new iteration of the train loader (a new segment for
    a ``ResumableLoader``), so that changes to the data pipeline reach workers and buffers now.

    Uses ``trainer.fit_loop._data_fetcher`` (private): Lightning 2.6 offers no public step-level reload.
    A no-op before the loader is iterated (the first iteration sees the change anyway).
    """
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None:
        return
    iter(fetcher)


class ResolutionRampUp(Callback):
    """Set the maximum image resolution (longest edge) to ``n`` from global step ``k`` on, for each
    ``(k, n)`` of ``schedule`` (a list of pairs or a ``{k: n}`` dict). Before the first scheduled step
    the DataModule's own setting is kept.

    The change is made at the end of the batch that reaches step ``k`` (after the optimizer step, so
    with gradient accumulation at an accumulation boundary); the train stream is then restarted
    (``restart_train_stream``). A step-0 entry is applied in ``on_fit_start``, before the loader is built.
    """

    def __init__(self, schedule: list[tuple[int, int]] | dict[int, int]) -> None:
        items = schedule.items() if isinstance(schedule, dict) else schedule
        pairs = sorted((int(k), int(n)) for k, n in items)
        steps = [k for k, _ in pairs]
        if not pairs or len(set(steps)) != len(steps) or steps[0] < 0 or any(n <= 0 for _, n in pairs):
            raise ValueError(
                f"schedule needs distinct non-negative steps and positive resolutions; got {schedule!r}."
            )
        self.steps, self.resolutions = steps, [n for _, n in pairs]
        self.resolution: int | None = None  # the resolution applied (checkpointed)

    def resolution_at(self, step: int) -> int | None:
        """The scheduled maximum resolution at global step ``step`` (``None`` before the first entry)."""
        index = bisect.bisect_right(self.steps, step) - 1
        return None if index < 0 else self.resolutions[index]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(trainer.datamodule, "set_max_resolution"):
            raise TypeError("ResolutionRampUp needs a datamodule with set_max_resolution (VLMDataModule).")
        # global_step is not restored yet here: a resumed run applies its checkpointed resolution
        resolution = self.resolution if self.resolution is not None else self.resolution_at(0)
        if resolution is not None:
            self._apply(trainer, resolution)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._follow_schedule(trainer)  # a resume whose checkpoint predates the last change

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._follow_schedule(trainer)

    def _follow_schedule(self, trainer: Trainer) -> None:
        resolution = self.resolution_at(trainer.global_step)
        if resolution is not None and resolution != self.resolution:
            self._apply(trainer, resolution)
            restart_train_stream(trainer)

    def _apply(self, trainer: Trainer, resolution: int) -> None:
        trainer.datamodule.set_max_resolution(resolution)
        self.resolution = resolution

    def state_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resolution = state_dict["resolution"]
