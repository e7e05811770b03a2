"""``BenchmarkEvaluation``: scores the generations of an ``EvalDataModule`` validation run
(``python -m lightning validate --config configs/eval/<b>.yaml``) with its benchmark's metric."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import Metric

from datamodules.evaluation import EvalDataModule
from vlm.evaluation.prompts import STOP_WORDS, apply_stop_words


class BenchmarkEvaluation(Callback):
    """Score the generations of an ``EvalDataModule`` validation run with its benchmark's metric.

    Needs a LightningModule with ``generate_answers(batch) -> list[str]`` (``VLMModule``: greedy,
    ``val_max_new_tokens`` tokens, stopping at eos / ``<end_of_utterance>``); the text is then cut at
    ``stop_words`` (Idefics2 A.3.1). ``max_new_tokens`` replaces the module's ``val_max_new_tokens``
    during the evaluation (restored after): ``--ckpt_path`` restores the training run's hyper-parameters,
    so the benchmark's generation length is set here rather than in ``model:``.
    Logs ``eval/<benchmark>/<metric>`` and writes, under ``output_dir`` (default: the trainer's log
    directory), ``<benchmark>_results.json`` (the score and settings) and
    ``<benchmark>_predictions.jsonl`` (one line per example: id, prompt, raw generation, prediction,
    references). With several processes each rank writes its own predictions file
    (``.rank<r>`` suffix) and the metric is reduced across ranks (a distributed sampler may repeat a
    few examples to even out the ranks).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        max_new_tokens: int | None = None,
        stop_words: list[str] | None = None,
    ) -> None:
        self.output_dir, self.max_new_tokens = output_dir, max_new_tokens
        self.stop_words = list(STOP_WORDS if stop_words is None else stop_words)
        self.metric: Metric | None = None
        self.records: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._module_max_new_tokens: int | None = None

    @staticmethod
    def _datamodule(trainer: Trainer) -> EvalDataModule | None:
        datamodule = trainer.datamodule
        return datamodule if isinstance(datamodule, EvalDataModule) else None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = self._datamodule(trainer)
        self.metric = None if datamodule is None else datamodule.benchmark.metric().to(pl_module.device)
        self.records = []
        if self.metric is not None and self.max_new_tokens is not None:
            self._module_max_new_tokens = pl_module.hparams.val_max_new_tokens
            pl_module.hparams.val_max_new_tokens = self.max_new_tokens

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        datamodule = self._datamodule(trainer)
        if self.metric is None or datamodule is None or "example_index" not in batch:
            return
        raw = pl_module.generate_answers(batch)
        preds = [apply_stop_words(text, self.stop_words) for text in raw]
        examples = [datamodule.examples[i] for i in batch["example_index"]]
        datamodule.benchmark.update(self.metric, preds, examples)
        for example, prompt, text, pred in zip(examples, batch["prompts"], raw, preds):
            self.records.append(
                {"id": example.id, "prompt": prompt, "generation": text, "prediction": pred,
                 "answers": example.answers, "choices": example.choices, "metadata": example.metadata}
            )  # fmt: skip

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = self._datamodule(trainer)
        if self.metric is None or datamodule is None:
            return
        if self._module_max_new_tokens is not None:
            pl_module.hparams.val_max_new_tokens, self._module_max_new_tokens = (
                self._module_max_new_tokens,
                None,
            )
        if trainer.sanity_checking:
            return
        benchmark = datamodule.benchmark
        value = float(self.metric.compute())
        key = f"eval/{benchmark.name}/{benchmark.metric_name}"
        pl_module.log(key, value)
        self.results = {
            "benchmark": benchmark.name,
            "metric": benchmark.metric_name,
            "value": value,
            "num_examples": len(self.records),
            "num_shots": datamodule.num_shots,
            "seed": datamodule.seed,
            "chat": datamodule.chat,
            "max_new_tokens": pl_module.hparams.val_max_new_tokens
            if self.max_new_tokens is None
            else self.max_new_tokens,
            "files": datamodule.files,
            "ckpt_path": trainer.ckpt_path,
        }
        self._write(trainer, benchmark.name)

    def _write(self, trainer: Trainer, name: str) -> None:
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        with open(directory / f"{name}_predictions.jsonl{suffix}", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in self.records)
        if trainer.is_global_zero:
            with open(directory / f"{name}_results.json", "w", encoding="utf-8") as f:
                json.dump(self.results, f, indent=2)
