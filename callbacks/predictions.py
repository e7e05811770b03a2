"""``PredictionWriter``: the answers of ``python -m lightning predict`` as ``predictions.jsonl``.

Each rank appends its batches' records (``VLMModule.predict_step``: ``id``, ``shard``, ``prompt``, ``answer``,
``reference`` when known) to its own part file as they come, so nothing waits for the end of the run
in memory; after the last batch rank 0 concatenates the parts into ``output`` (rank by rank) and
removes them.
"""

from __future__ import annotations

import json
import os
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
            for record in prediction:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier("predictions_written")
        if trainer.is_global_zero:
            path = self.path(trainer)
            parts = [self._part(trainer, rank) for rank in range(trainer.world_size)]
            with path.open("w", encoding="utf-8") as out:
                for part in parts:
                    out.write(part.read_text(encoding="utf-8"))
            for part in parts:
                part.unlink()
            rank_zero_info(f"Wrote {sum(1 for _ in path.open(encoding='utf-8'))} predictions to {path}")
        trainer.strategy.barrier("predictions_merged")
