"""Minimal LightningModule / LightningDataModule for the CLI subprocess tests (tests/test_cli.py).

Importable as ``cli_fixtures`` with ``PYTHONPATH=tests``. Tiny and CPU-only: a linear regression on
random tensors. ``TinyModule`` writes a JSON marker (steps done, first/last loss) in
``on_train_end`` so a test can tell that ``fit`` really trained. ``LossLog`` records per-step losses of
any module (tests/test_checkpoints.py).
"""

import json
import os
import signal

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(L.LightningModule):
    def __init__(self, hidden: int = 4, lr: float = 0.1, marker_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def on_train_end(self):
        if self.hparams.marker_path and self.trainer.is_global_zero:  # one writer under DDP
            marker = {
                "global_step": self.trainer.global_step,
                "losses": self.losses,
                "hidden": self.hparams.hidden,
            }
            with open(self.hparams.marker_path, "w", encoding="utf-8") as f:
                json.dump(marker, f)


class TinyDataModule(L.LightningDataModule):
    def __init__(self, hidden: int = 4, num_samples: int = 16, batch_size: int = 4):
        super().__init__()
        self.hidden = hidden
        self.num_samples = num_samples
        self.batch_size = batch_size

    def _loader(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.num_samples, self.hidden, generator=g)
        y = x.sum(dim=1, keepdim=True)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return self._loader(1)


class LossLog(L.Callback):
    """Append ``{"step", "loss"}`` per training step to a JSON-lines file (kill-and-resume test); with
    ``KILL_AT_STEP=k`` in the environment, SIGKILL the process at the start of step ``k``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if str(trainer.global_step) == os.environ.get("KILL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "loss": float(outputs["loss"])}) + "\n")
