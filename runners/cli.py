"""The launcher: ``python -m lightning <subcommand> ...`` or ``python -m runners ...``.

``LightningCLI`` in subclass mode: no fixed classes, so the YAML (or the command line) picks the
LightningModule and LightningDataModule by import path::

    model:
      class_path: lit_modules.VLMModule
      init_args: {...}
    data:
      class_path: datamodules.VLMDataModule
      init_args: {...}

Subcommands: ``fit``, ``validate``, ``test``, ``predict``. Everything LightningCLI/jsonargparse
offers works: ``--config``, ``--print_config``, ``--model.init_args.x 1`` (or ``--model.x 1`` once
the class is known), ``--trainer.max_steps 10``, ``--ckpt_path ...``. Unknown keys and bad values
are reported by jsonargparse with the key's name and a non-zero exit.

``VLMCLI`` adds to LightningCLI, before anything is built:

- ``runners.preflight``: a config this machine cannot run (too few CUDA devices, a multi-node run without
  a launcher, missing weights or shards) stops with one message naming what is missing, what the
  config expects and its CPU twin, instead of a traceback or a hang;
- progress: on a terminal the training bar counts optimizer steps to ``max_steps``
  (``callbacks.StepProgressBar``); with stdout redirected (SLURM, nohup) plain lines replace the bar
  (``callbacks.PlainProgress``). See ``callbacks.progress.progress_callbacks``;
- ``predict`` without a configured ``callbacks.PredictionWriter`` gets one (``predictions.jsonl`` in the
  trainer's ``default_root_dir``).

``python -m lightning`` reaches ``runners/__main__.py`` through ``_idefics_lightning_hook`` (installed
by ``pip install .`` or ``pip install -e .``; see ``setup.py``), which loads that file under the name
``lightning.__main__``; the classes live here, in an importable module, so they pickle.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from callbacks.predictions import PredictionWriter
from callbacks.progress import progress_callbacks
from runners.preflight import preflight_report

#: Default for ``--seed_everything``: a fixed seed (saved in config.yaml) so runs are reproducible;
#: ``--seed_everything true`` picks a random one, ``false`` disables seeding.
SEED_EVERYTHING_DEFAULT = 42


class VLMCLI(LightningCLI):
    """LightningCLI with the preflight check, the progress display chosen for stdout and a
    ``PredictionWriter`` when predicting."""

    def before_instantiate_classes(self) -> None:
        """Stop (``SystemExit`` with the report) when ``runners.preflight`` finds something missing."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        files = [str(path) for path in (config.get("config") or []) if path is not None]
        report = preflight_report(config.clone().as_dict(), files)
        if report is not None:
            raise SystemExit(report)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with the progress callbacks ``progress_callbacks`` picks for this stdout and, for
        ``predict``, a ``PredictionWriter`` unless one is configured (with its own ``output``)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        configured = trainer_config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        enable_bar = trainer_config.get("enable_progress_bar")
        added, enable_bar = progress_callbacks(configured, enable_bar is not False, sys.stdout.isatty())
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in configured):
            added.append(PredictionWriter())
        return super().instantiate_trainer(
            **{"callbacks": configured + added, "enable_progress_bar": enable_bar, **kwargs}
        )


def _prog() -> str:
    """``python -m lightning`` / ``python -m runners`` in usage lines instead of ``cli.py``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    if name.endswith(".__main__"):
        name = name[: -len(".__main__")]
    return f"python -m {name}" if name else "python -m runners"


def main(args: list[str] | dict | None = None) -> VLMCLI:
    """Run ``VLMCLI`` (LightningCLI). ``args``: a list of strings or a dict (default: ``sys.argv[1:]``)."""
    return VLMCLI(
        save_config_kwargs={"overwrite": True},
        seed_everything_default=SEED_EVERYTHING_DEFAULT,
        parser_kwargs={"prog": _prog()},
        args=args,
    )
