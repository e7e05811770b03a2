"""Benchmark evaluation through Lightning: ``python -m lightning validate --config configs/eval/<b>.yaml``.

``EvalDataModule`` reads a benchmark (``vlm.evaluation.benchmarks``), builds each query's zero- or
few-shot prompt (``vlm.evaluation.fewshot``) with training's chat template (or as plain text for
base models) and serves left-padded generation batches in the ``prompt_*`` layout that
``VLMModule.generate_answers`` reads. ``BenchmarkEvaluation`` (a callback) generates greedily with the
LightningModule's ``generate_answers``, cuts the text at the paper's stop words, scores it with the
benchmark's metric, logs ``eval/<benchmark>/<metric>`` and writes ``<benchmark>_results.json`` and
``<benchmark>_predictions.jsonl``. The batches carry no ``answers`` / ``labels``, so
``VLMModule.validation_step`` itself does nothing on them (no second generation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from vlm.evaluation.benchmarks import Benchmark, Example, get_benchmark
from vlm.evaluation.fewshot import documents, select_shots
from vlm.evaluation.prompts import (
    STOP_WORDS,
    Document,
    apply_stop_words,
    chat_messages,
    plain_text,
    render_chat_text,
)
from vlm.language_model import load_tokenizer
from vlm.processing import ImageProcessor, VLMProcessor, load_tiny_tokenizer
from vlm.processing.processor import prompt_inputs
from vlm.processing.text import Fusion


class PromptDataset(Dataset):
    """The queries of a benchmark, each with its documents (shots, then the query)."""

    def __init__(
        self,
        benchmark: Benchmark,
        examples: Sequence[Example],
        support: Sequence[Example],
        num_shots: int,
        seed: int,
    ) -> None:
        self.benchmark, self.examples, self.support = benchmark, list(examples), list(support)
        self.num_shots, self.seed = num_shots, seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, list[Document]]:
        query = self.examples[index]
        shots = select_shots(query, self.support, self.num_shots, self.seed)
        return index, documents(query, shots, self.benchmark.prompt)


def collate_prompts(
    items: list[tuple[int, list[Document]]], processor: VLMProcessor, chat: bool
) -> dict[str, Any]:
    """A left-padded generation batch: ``prompt_input_ids``, ``prompt_attention_mask`` and, with images,
    ``prompt_pixel_values``, ``prompt_pixel_attention_mask``, ``prompt_tiles_per_sample``,
    ``prompt_tiles_per_image``; plus ``example_index`` (positions in the dataset) and ``prompts`` (the
    prompt texts before image expansion)."""
    images = [[image for doc in docs for image in doc.images] for _, docs in items]
    images_arg = images if any(images) else None
    if chat:
        out = processor.encode_conversations(
            [chat_messages(docs) for _, docs in items],
            images_arg,
            add_generation_prompt=True,
            padding_side="left",
        )
        prompts = [render_chat_text(docs) for _, docs in items]
    else:
        prompts = [plain_text(docs) for _, docs in items]
        out = processor(prompts, images_arg, padding_side="left")
    batch: dict[str, Any] = {"example_index": [index for index, _ in items], "prompts": prompts}
    batch.update(prompt_inputs(out))
    return batch


class EvalDataModule(LightningDataModule):
    """Generation batches of one benchmark, zero- or few-shot (validation loader only).

    - ``benchmark``: a key of ``vlm.evaluation.BENCHMARKS``; ``files``: its parquet files (paths or globs,
      ``${VAR}`` expanded); ``limit``: evaluate only the first ``limit`` examples.
    - ``num_shots`` in-context examples per query from ``support_files`` (same layout, e.g. the train
      split), drawn with ``seed`` (``vlm.evaluation.fewshot.select_shots``).
    - ``chat``: instruction models get training's chat template (shots as earlier user/assistant turns,
      then ``Assistant:``); ``False``: plain text for base models (``prompts.plain_text``).
    - ``tokenizer``, ``recipe``, ``image_seq_len``, ``image_processor`` (``ImageProcessor`` keyword
      arguments) and ``fusion`` (``None``: the LightningModule's) define the ``VLMProcessor``, as in
      ``datamodules.VLMDataModule``; they must match the evaluated model.
    """

    def __init__(
        self,
        benchmark: str,
        files: str | list[str],
        support_files: str | list[str] | None = None,
        num_shots: int = 0,
        seed: int = 0,
        chat: bool = True,
        limit: int | None = None,
        tokenizer: str = "tiny",
        recipe: Literal["idefics2", "idefics3"] = "idefics2",
        image_seq_len: int = 64,
        image_processor: dict[str, Any] | None = None,
        fusion: Fusion | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_shots and support_files is None:
            raise ValueError(f"num_shots={num_shots} needs support_files (the split the shots come from).")
        self.benchmark = get_benchmark(benchmark)
        self.files, self.support_files = files, support_files
        self.num_shots, self.seed, self.chat, self.limit = num_shots, seed, chat, limit
        self.tokenizer_name, self.recipe, self.image_seq_len = tokenizer, recipe, image_seq_len
        self.image_processor_options = dict(image_processor or {})
        self.fusion, self.batch_size, self.num_workers = fusion, batch_size, num_workers

    @cached_property
    def examples(self) -> list[Example]:
        """The evaluated examples, in file order."""
        return self.benchmark.read(self.files)[: self.limit]

    @cached_property
    def support(self) -> list[Example]:
        """The examples in-context shots are drawn from (none for zero-shot)."""
        return [] if not self.num_shots else self.benchmark.read(self.support_files)

    @cached_property
    def processor(self) -> VLMProcessor:
        name = self.tokenizer_name
        tokenizer = load_tiny_tokenizer() if name == "tiny" else load_tokenizer(name)
        image_processor = ImageProcessor(self.recipe, **self.image_processor_options)
        return VLMProcessor(
            tokenizer, image_processor, self.image_seq_len, fusion=self.fusion or "autoregressive"
        )

    def setup(self, stage: str) -> None:
        """With ``fusion=None``, adopt the LightningModule's fusion (its ``config.fusion``)."""
        if self.fusion is None and self.trainer is not None:
            self.fusion = getattr(getattr(self.trainer.lightning_module, "config", None), "fusion", None)

    def dataset(self) -> PromptDataset:
        return PromptDataset(self.benchmark, self.examples, self.support, self.num_shots, self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(collate_prompts, processor=self.processor, chat=self.chat),
        )


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
