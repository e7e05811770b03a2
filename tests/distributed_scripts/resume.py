"""Train through Lightning on synthetic shards and record every row of every optimizer step, per rank.

``python resume.py DATA_ROOT RUN_DIR DEVICES WORKERS BATCH ACCUMULATE PERSISTENT MAX_STEPS [CKPT]``:
checkpoints every 2 steps under ``RUN_DIR/ckpt``; rank r writes ``RUN_DIR/rows.<r>.json``
(``{global step: [row token ids without padding, ...]}``). With DEVICES > 1 Lightning runs DDP (gloo)
and re-launches this script for the other ranks.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import VLMDataModule

data_root, run_dir, devices, workers, batch, accumulate, persistent, max_steps, *ckpt = sys.argv[1:]
run_dir = Path(run_dir)


class Minimal(LightningModule):
    """A one-weight model: the test is about which rows each step trains on, not about learning."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        return self.weight * batch["input_ids"].float().mean() * 1e-6

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordRows(Callback):
    def __init__(self) -> None:
        self.rows: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = self.rows.setdefault(trainer.global_step + 1, [])
        for ids, documents in zip(batch["input_ids"], batch["document_ids"]):
            step.append(ids[documents > 0].tolist())

    def on_train_end(self, trainer, pl_module):
        (run_dir / f"rows.{trainer.global_rank}.json").write_text(json.dumps(self.rows))


source = {"source": "laion_coco", "urls": f"{data_root}/*.tar", "weight": 1.0, "max_seq_len": 96}
data = VLMDataModule(
    [source],
    image_seq_len=8,
    image_processor={"shortest_edge": 32, "longest_edge": 64},
    batch_size=int(batch),
    max_seq_len=96,
    max_tiles_per_row=8,
    num_workers=int(workers),
    persistent_workers=persistent == "1",
    shuffle_block=4,
    pack_window=4,
)
trainer = Trainer(
    max_steps=int(max_steps),
    accelerator="cpu",
    devices=int(devices),
    strategy="ddp" if int(devices) > 1 else "auto",
    accumulate_grad_batches=int(accumulate),
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    use_distributed_sampler=False,
    callbacks=[
        RecordRows(),
        ModelCheckpoint(dirpath=run_dir / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1),
    ],
)
trainer.fit(Minimal(), datamodule=data, ckpt_path=ckpt[0] if ckpt else None)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
