"""``VLMCLI``: the project's ``LightningCLI``, run by ``vlm.cli.main``.

Two additions to LightningCLI, both before anything is built:

- ``vlm.preflight``: a config this machine cannot run (too few CUDA devices, a multi-node run without a
  launcher, missing weights or shards) stops with one message naming what is missing, what the
  config expects and its CPU twin, instead of a traceback or a hang;
- progress: on a terminal the training bar counts optimizer steps to ``max_steps``
  (``callbacks.StepProgressBar``); with stdout redirected (SLURM, nohup) plain lines replace the bar
  (``callbacks.PlainProgress``). See ``callbacks.progress.progress_callbacks``.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from callbacks.progress import progress_callbacks
from vlm.preflight import preflight_report


class VLMCLI(LightningCLI):
    """LightningCLI with the preflight check and the progress display chosen for stdout."""

    def before_instantiate_classes(self) -> None:
        """Stop (``SystemExit`` with the report) when ``vlm.preflight`` finds something missing."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        files = [str(path) for path in (config.get("config") or []) if path is not None]
        report = preflight_report(config.clone().as_dict(), files)
        if report is not None:
            raise SystemExit(report)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with the progress callbacks ``progress_callbacks`` picks for this stdout."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        configured = trainer_config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        enable_bar = trainer_config.get("enable_progress_bar")
        added, enable_bar = progress_callbacks(configured, enable_bar is not False, sys.stdout.isatty())
        return super().instantiate_trainer(
            **{"callbacks": configured + added, "enable_progress_bar": enable_bar, **kwargs}
        )
