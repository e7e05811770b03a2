"""``BenchmarkEvaluation``: the results and predictions files of a validation run on prompts: an
``EvalDataModule`` (``python -m lightning validate --config configs/eval/<b>.yaml``) or the held-out
questions of ``VLMDataModule(val_generate=True)`` (``val/acc``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from datamodules.evaluation import EvalDataModule
from vlm.evaluation.prompts import STOP_WORDS


class BenchmarkEvaluation(Callback):
    """Score an ``EvalDataModule`` validation run with its benchmark's metric and write the results.

    The LightningModule answers and scores the prompt batches (``VLMModule.validation_step`` with the
    ``prompt_scorer`` this callback installs: ``EvalDataModule.prompt_scorer(stop_words)``, greedy
    ``generate_answers``, the text cut at ``stop_words``, Idefics2 A.3.1) and logs
    ``eval/<benchmark>/<metric>``. ``max_new_tokens`` replaces the module's ``val_max_new_tokens`` during
    the evaluation (restored after): ``--ckpt_path`` restores the training run's hyper-parameters, so the
    benchmark's generation length is set here rather than in ``model:``.
    Writes, under ``output_dir`` (default: the trainer's log directory), ``<benchmark>_results.json``
    (the score and settings) and ``<benchmark>_predictions.jsonl`` (one line per example: id, prompt,
    question, raw generation, prediction, references, choices, metadata). With several processes each
    rank writes its own predictions file (``.rank<r>`` suffix) and the metric is reduced across ranks (a
    distributed sampler may repeat a few examples to even out the ranks).
    With another DataModule whose validation batches are prompts (``VLMDataModule(val_generate=True)``)
    the module scores them as ``val/acc`` and this callback writes ``val_results.json`` and
    ``val_predictions.jsonl`` the same way (``stop_words`` do not apply there: ``val/acc`` is on the
    whole generation).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        max_new_tokens: int | None = None,
        stop_words: list[str] | None = None,
    ) -> None:
        self.output_dir, self.max_new_tokens = output_dir, max_new_tokens
        self.stop_words = list(STOP_WORDS if stop_words is None else stop_words)
        self.records: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._module_max_new_tokens: int | None = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if isinstance(datamodule, EvalDataModule):
            pl_module.prompt_scorer = datamodule.prompt_scorer(self.stop_words)
        if self.max_new_tokens is not None:
            self._module_max_new_tokens = pl_module.hparams.val_max_new_tokens
            pl_module.hparams.val_max_new_tokens = self.max_new_tokens

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        max_new_tokens = pl_module.hparams.val_max_new_tokens
        if self._module_max_new_tokens is not None:
            pl_module.hparams.val_max_new_tokens, self._module_max_new_tokens = (
                self._module_max_new_tokens,
                None,
            )
        scorer = getattr(pl_module, "prompt_scorer", None)
        if trainer.sanity_checking or scorer is None or not scorer.records:
            return
        self.records = scorer.records
        datamodule = trainer.datamodule
        self.results = {"value": scorer.compute(), "num_examples": len(self.records)}
        if isinstance(datamodule, EvalDataModule):
            name = datamodule.benchmark.name
            self.results = {
                "benchmark": name,
                "metric": datamodule.benchmark.metric_name,
                **self.results,
                "num_shots": datamodule.num_shots,
                "seed": datamodule.seed,
                "chat": datamodule.chat,
                "files": datamodule.files,
                "sources": datamodule.sources,
            }
        else:
            name, self.results = "val", {"metric": scorer.name, **self.results}
        self.results.update(max_new_tokens=max_new_tokens, ckpt_path=trainer.ckpt_path)
        self._write(trainer, name)

    def _write(self, trainer: Trainer, name: str) -> None:
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        with open(directory / f"{name}_predictions.jsonl{suffix}", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in self.records)
        if trainer.is_global_zero:
            with open(directory / f"{name}_results.json", "w", encoding="utf-8") as f:
                json.dump(self.results, f, indent=2)
