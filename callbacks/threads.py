"""``TorchThreads``: set PyTorch's intra-op CPU threads when training starts.

Small models on a few shared CPU cores train much faster with one thread: with more threads than
free cores, every tiny op waits for a thread that another process holds (measured for the CPU demo
on 2 cores with another job running: 2.3 s per step with 2 threads, 0.2 s with 1).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class TorchThreads(Callback):
    """``torch.set_num_threads(num_threads)`` in ``setup`` (every stage)."""

    def __init__(self, num_threads: int = 1) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
        self.num_threads = num_threads

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
