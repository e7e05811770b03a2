"""Training telemetry: throughput, batch composition, MFU and skipped data records, logged every n steps.

Logged with ``pl_module.log_dict`` (so TensorBoard or any Lightning logger gets them), per device:

- ``perf/tokens_per_s``, ``perf/images_per_s``, ``perf/tiles_per_s``: real (non-padding) tokens,
  images and tiles per second of wall time since the last log (data loading included);
- ``perf/mfu``: model FLOPs per second / ``peak_flops`` (see ``training_flops``);
- ``batch/padding_pct``: 100 * (1 - real tokens / token slots); ``batch/image_token_pct``: 100 *
  ``<image>`` tokens (the positions the visual tokens fill) / real tokens; ``batch/images_per_row``;
- ``data/skipped/<source>/<reason>``: records skipped so far, and ``data/retries/<source>/<reason>``:
  transient read errors retried so far (remote shards), from ``trainer.datamodule.record_stats()``
  when the DataModule has it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

# running sums over the logging window, in this order
COUNTS = ("real_tokens", "token_slots", "image_tokens", "rows", "images", "tiles", "patches")


def training_flops(module: nn.Module, n_inputs: float, backward_reaches: bool) -> float:
    """FLOPs of one training forward + backward of ``module`` over ``n_inputs`` tokens (or patches).

    Matmul FLOPs only (Kaplan et al.'s ``6 N`` rule, attention scores ignored): forward ``2 N``,
    gradients w.r.t. activations ``2 N`` (when the backward pass reaches the module at all),
    gradients w.r.t. weights ``2 N_trainable``; ``N`` = parameters of the module. A fully trained
    module costs ``6 N`` per input, a frozen language model under LoRA ``~4 N``, a frozen vision
    tower ``2 N`` (forward only).
    """
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return (2 * params + 2 * params * backward_reaches + 2 * trainable) * n_inputs


def measure_peak_flops(
    device: torch.device, size: int | None = None, repeats: int = 10, dtype: torch.dtype | None = None
) -> float:
    """Achieved FLOP/s of a square matmul on ``device`` (``dtype`` defaults to bf16 on CUDA, fp32 on CPU;
    ``size`` to 8192 on CUDA, 512 on CPU): an MFU denominator for machines whose datasheet peak is
    unknown (MFU against it reads higher than against the datasheet peak)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn_like(a)
    a @ b  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_token_mask(batch: dict[str, Tensor]) -> Tensor:
    """Where a batch's ``input_ids`` hold real tokens, not padding: its ``attention_mask``, or the
    non-zero ``document_ids`` of a padding-free batch."""
    return batch["attention_mask"] if "attention_mask" in batch else batch["document_ids"] > 0


class Telemetry(Callback):
    """Log throughput, batch composition, MFU and data skips every ``log_every_n_steps`` optimizer steps.

    ``peak_flops``: the device's peak FLOP/s for MFU (e.g. ``989e12`` for an H100 in bf16); by default
    measured once with ``measure_peak_flops`` at the start of training.

    FLOPs per batch (``training_flops``): the language model (and cross-attention blocks) over the
    real tokens, the vision tower and connector over the real patches (``pixel_attention_mask`` /
    patch area); the backward pass reaches the vision tower only when it has trainable parameters,
    the connector when it or the tower has. All parameters count, embeddings included (a few %
    over the usual non-embedding count). Parameters are counted at each log, so freezing changes
    (stage transitions, LoRA) are followed.
    """

    def __init__(self, log_every_n_steps: int = 50, peak_flops: float | None = None) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1; got {log_every_n_steps}.")
        self.log_every_n_steps, self.peak_flops = log_every_n_steps, peak_flops
        self._sums: Tensor | None = None
        self._start = 0.0
        self._logged_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(pl_module.device)
        self._reset(trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Tensor],
        batch_idx: int,
    ) -> None:
        counts = self._batch_counts(pl_module, batch)
        self._sums = counts if self._sums is None else self._sums + counts
        step = trainer.global_step
        if step != self._logged_step and step % self.log_every_n_steps == 0:
            pl_module.log_dict(self._metrics(trainer, pl_module), on_step=True, on_epoch=False, batch_size=1)
            self._reset(step)

    def _reset(self, step: int) -> None:
        self._sums, self._start, self._logged_step = None, time.perf_counter(), step

    @staticmethod
    def _batch_counts(pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor:
        """``COUNTS`` of one batch as a float64 tensor on the batch's device (no host sync per step)."""
        input_ids = batch["input_ids"]
        real = real_token_mask(batch)
        zero = input_ids.new_zeros(())
        tiles_per_image = batch.get("tiles_per_image")
        pixel_mask = batch.get("pixel_attention_mask")
        patch_area = pl_module.model.config.vision.patch_size**2
        values = [
            real.sum(),
            zero + input_ids.numel(),
            ((input_ids == pl_module.model.image_token_id) & real.bool()).sum(),
            zero + input_ids.shape[0],
            zero if tiles_per_image is None else zero + tiles_per_image.numel(),
            zero if "pixel_values" not in batch else zero + batch["pixel_values"].shape[0],
            zero if pixel_mask is None else pixel_mask.sum() / patch_area,
        ]
        return torch.stack([v.to(torch.float64) for v in values])

    def _metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        synchronize(pl_module.device)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        sums = dict(zip(COUNTS, self._sums.tolist()))
        model = pl_module.model
        text_parts = [model.language_model, getattr(model, "cross_attention", None)]
        flops = sum(training_flops(p, sums["real_tokens"], True) for p in text_parts if p is not None)
        vision_reached = any(p.requires_grad for p in model.vision_tower.parameters())
        connector_reached = vision_reached or any(p.requires_grad for p in model.connector.parameters())
        flops += training_flops(model.vision_tower, sums["patches"], vision_reached)
        flops += training_flops(model.connector, sums["patches"], connector_reached)
        real = max(sums["real_tokens"], 1.0)
        metrics = {
            "perf/tokens_per_s": sums["real_tokens"] / elapsed,
            "perf/images_per_s": sums["images"] / elapsed,
            "perf/tiles_per_s": sums["tiles"] / elapsed,
            "perf/mfu": flops / elapsed / self.peak_flops,
            "batch/padding_pct": 100 * (1 - sums["real_tokens"] / max(sums["token_slots"], 1.0)),
            "batch/image_token_pct": 100 * sums["image_tokens"] / real,
            "batch/images_per_row": sums["images"] / max(sums["rows"], 1.0),
        }
        record_stats = getattr(trainer.datamodule, "record_stats", None)
        for source, stats in (record_stats() if record_stats else {}).items():
            for reason, count in stats.skipped.items():
                metrics[f"data/skipped/{source}/{reason}"] = float(count)
            for reason, count in stats.retries.items():
                metrics[f"data/retries/{source}/{reason}"] = float(count)
        return metrics
