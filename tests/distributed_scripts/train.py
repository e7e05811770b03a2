"""One VLMModule training run on CPU for tests/test_distributed.py: one process, DDP or FSDP2 (gloo).

Run as a script: with ``--strategy ddp`` / ``fsdp`` Lightning re-launches it once per extra rank.
Rank 0 writes ``--out`` (JSON): after each training batch (micro-batch under gradient accumulation),
the loss of every rank and a hash of the full weights; the non-finite step counters of every rank;
the final global step; the greedy tokens every rank generates after training, and those of an
unsharded copy of the final weights. ``--weights`` gets the final full state dict (gathered from the
FSDP2 shards). ``--nan-at RANK STEP`` makes the loss of one rank NaN at one global step.

Data: ``fixed`` is a map-style list of identical-length samples (each rank gets every other sample
of a global batch, so rank-averaged losses equal one process's loss on the whole batch); ``shards``
streams the synthetic laion_coco shards under ``--shards`` through ``VLMDataModule`` (exact resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import VLMDataModule
from lit_modules import TrainingPolicy, VLMModule
from vlm.config import FAKE_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, RECIPE_SPECIAL_TOKENS
from vlm.language_model import add_special_tokens
from vlm.processing import load_tiny_tokenizer

IMAGE_SEQ_LEN = 8  # idefics2-tiny: 8 perceiver latents per image


def fixed_samples(n: int, fusion: str, text_len: int = 12) -> list[dict[str, Tensor]]:
    """``n`` samples of one 32x32 image between text, all the same length with the same number of
    labelled tokens, so the mean loss of a batch is the mean of its halves' losses."""
    ids = add_special_tokens(load_tiny_tokenizer(), RECIPE_SPECIAL_TOKENS)
    generator = torch.Generator().manual_seed(0)
    image_tokens = 1 if fusion == "cross_attention" else IMAGE_SEQ_LEN  # one marker per image
    image = torch.tensor(
        [ids[FAKE_IMAGE_TOKEN]] + [ids[IMAGE_TOKEN]] * image_tokens + [ids[FAKE_IMAGE_TOKEN]]
    )
    samples = []
    for _ in range(n):
        text = torch.randint(10, 100, (text_len,), generator=generator)
        input_ids = torch.cat([text[:4], image, text[4:]])
        labels = input_ids.clone()
        labels[4 : 4 + len(image)] = IGNORE_INDEX
        pixel_values = torch.rand(1, 3, 32, 32, generator=generator)
        samples.append({"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values})
    return samples


class FixedData(LightningDataModule):
    def __init__(self, n: int, fusion: str, batch_size: int) -> None:
        super().__init__()
        self.samples, self.batch_size = fixed_samples(n, fusion), batch_size

    def train_dataloader(self) -> DataLoader:
        # Rank r gets samples r, r + 2, ...: Lightning's own DistributedSampler would shuffle them.
        sampler = DistributedSampler(self.samples, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.samples, batch_size=self.batch_size, sampler=sampler)


def shard_data(root: Path, fusion: str, batch_size: int) -> VLMDataModule:
    """Batches for idefics2-tiny from synthetic laion_coco shards, as tests/test_lit_module.py."""
    source = {"source": "laion_coco", "urls": str(root / "*.tar"), "weight": 1.0, "max_seq_len": 128}
    return VLMDataModule(
        [source],
        image_seq_len=IMAGE_SEQ_LEN,
        fusion=fusion,
        image_processor={"shortest_edge": 32, "longest_edge": 64},
        batch_size=batch_size,
        max_seq_len=128,
        max_tiles_per_row=8,
        shuffle_block=4,
        pack_window=4,
    )


def full_state(module: VLMModule) -> dict[str, Tensor]:
    """The module's whole state dict on every rank (FSDP2 shards gathered)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def state_hash(state: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class RecordingModule(VLMModule):
    """VLMModule that records every rank's loss and the weights' hash after each batch, and the dtype of
    the language model's last hidden states (bf16 under FSDP2 mixed precision; training computes the loss
    from them, without logits); ``nan_at`` makes one rank's loss NaN at one step."""

    def __init__(self, nan_at: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at = nan_at
        self.steps: list[dict[str, Any]] = []
        self.hidden_dtype = ""
        self._loss: Tensor | None = None

    def _record_dtype(self, module: Any, inputs: Any, output: Tensor) -> None:
        self.hidden_dtype = str(output.dtype)

    def forward(self, **batch: Any):
        if not self.hidden_dtype:  # first call: watch the decoder's final norm (its output feeds the head)
            self.hidden_dtype = "unset"
            self.model.language_model.base_model.norm.register_forward_hook(self._record_dtype)
        out = super().forward(**batch)
        if self.training and self.nan_at == (self.global_rank, self.global_step):
            out.loss = out.loss * float("nan")
        self._loss = out.loss.detach()
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append(
            {"losses": gather(self._loss.item()), "hashes": gather(state_hash(full_state(self)))}
        )


def generate(module: VLMModule, fusion: str) -> list[int]:
    """Greedy tokens after a fixed prompt (text, then one image)."""
    sample = fixed_samples(1, fusion)[0]
    prompt_len = int((sample["labels"] == IGNORE_INDEX).nonzero().max()) + 1
    module.eval()
    tokens = module.model.generate(
        sample["input_ids"][None, :prompt_len], pixel_values=sample["pixel_values"][None], max_new_tokens=4
    )
    return tokens[0, prompt_len:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--data", choices=["fixed", "shards"], default="fixed")
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--samples", type=int, default=8, help="fixed data: samples per epoch")
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--fusion", default="autoregressive")
    parser.add_argument("--policy", default="{}", help="TrainingPolicy fields as JSON")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gradient-clip", type=float)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", action="store_true", help="FSDP2 bf16 params, fp32 reduce")
    parser.add_argument("--consolidated", action="store_true", help="FSDP2: save one full checkpoint file")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps into --ckpt-dir")
    parser.add_argument("--ckpt-dir", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--nan-at", type=int, nargs=2, metavar=("RANK", "STEP"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path)
    args = parser.parse_args()

    seed_everything(0)
    module = RecordingModule(
        nan_at=tuple(args.nan_at) if args.nan_at else None,
        fusion=args.fusion,
        policy=TrainingPolicy(**json.loads(args.policy)),
        lr=args.lr,
        weight_decay=0.1,
        warmup_steps=1,
        max_steps=args.max_steps,
        activation_checkpointing=args.activation_checkpointing,
        fsdp_mixed_precision=args.mixed_precision,
    )
    strategy: Any = {"single": "auto", "ddp": "ddp"}.get(args.strategy)
    if args.strategy == "fsdp":
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not args.consolidated
        )
    callbacks = []
    if args.save_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=args.ckpt_dir, filename="{step}", every_n_train_steps=args.save_every, save_top_k=-1
            )
        )
    trainer = Trainer(
        accelerator="cpu",
        devices=1 if args.strategy == "single" else 2,
        strategy=strategy,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.gradient_clip,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    if args.data == "fixed":
        data: LightningDataModule = FixedData(args.samples, args.fusion, args.batch_size)
    else:
        data = shard_data(args.shards, args.fusion, args.batch_size)
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)

    weights = full_state(module)
    counters = gather([module.total_nonfinite, module.consecutive_nonfinite])
    generated = gather(generate(module, args.fusion))
    if trainer.is_global_zero:
        plain = VLMModule(fusion=args.fusion, policy=module.policy)  # unsharded, same weights
        plain.configure_model()
        plain.load_state_dict(weights)
        report = {
            "global_step": trainer.global_step,
            "steps": module.steps,
            "nonfinite": counters,
            "hidden_dtype": module.hidden_dtype,
            "generated": generated,
            "generated_unsharded": generate(plain, args.fusion),
        }
        args.out.write_text(json.dumps(report))
        if args.weights:
            torch.save({k: v.cpu() for k, v in weights.items()}, args.weights)
    # No rank may exit while another still uses the process group (else: teardown abort).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
