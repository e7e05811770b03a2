"""``PredictionWriter``: the answers of ``python -m lightning predict`` as ``predictions.jsonl``.

Each rank appends its batches' records (``VLMModule.predict_step``: ``id``, ``shard``, ``prompt``, ``answer``,
``reference`` when known), each with its question's position in the dataset, to its own part file as
they come, so nothing waits for the end of the run in memory. After the last batch rank 0 merges the
parts into ``output`` in dataset order, streaming (each rank's positions increase: Lightning's
distributed sampler deals them out in order), and drops the repeats that sampler pads the last
batches with (``merge_parts``), then removes the parts. So every question has exactly one line,
whatever the world size.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Write every prediction record as one JSON line to ``output`` (default:
    ``<trainer.default_root_dir>/predictions.jsonl``; ``~`` and ``${VAR}`` expanded)."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output

    def path(self, trainer: Trainer) -> Path:
        """Where the merged predictions go."""
        if self.output is None:
            return Path(trainer.default_root_dir) / "predictions.jsonl"
        return Path(os.path.expanduser(os.path.expandvars(self.output)))

    def _part(self, trainer: Trainer, rank: int) -> Path:
        path = self.path(trainer)
        return path.with_name(f".{path.name}.rank{rank}")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        part = self._part(trainer, trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self._part(trainer, trainer.global_rank).open("a", encoding="utf-8") as file:
            for index, record in zip(batch["indices"], prediction, strict=True):
                file.write(json.dumps([index, record], ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier("predictions_written")
        if trainer.is_global_zero:
            path = self.path(trainer)
            parts = [self._part(trainer, rank) for rank in range(trainer.world_size)]
            written = merge_parts(parts, path)
            for part in parts:
                part.unlink()
            rank_zero_info(f"Wrote {written} predictions to {path}")
        trainer.strategy.barrier("predictions_merged")


def _indexed_records(part: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A part's ``(index, record)`` pairs; an index not above its predecessor is the distributed
    sampler's padding (it wraps around to the first positions, dealt to some rank already): skipped."""
    last = -1
    with part.open(encoding="utf-8") as lines:
        for line in lines:
            index, record = json.loads(line)
            if index > last:
                yield index, record
                last = index


def merge_parts(parts: list[Path], path: Path) -> int:
    """Merge the ranks' part files (``[index, record]`` lines, increasing ``index`` within each but for
    the sampler's padding) into ``path``, one JSON record per line in index order, each index once;
    returns the number written."""
    written, last = 0, None
    with path.open("w", encoding="utf-8") as out:
        for index, record in heapq.merge(*map(_indexed_records, parts), key=lambda pair: pair[0]):
            if index != last:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written, last = written + 1, index
    return written
