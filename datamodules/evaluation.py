"""Benchmark prompts as a DataModule: ``python -m lightning validate --config configs/eval/<b>.yaml``.

``EvalDataModule`` reads a benchmark (``vlm.evaluation.benchmarks``), builds each query's zero- or
few-shot prompt (``vlm.evaluation.fewshot``) with training's chat template (or as plain text for
base models) and serves them as ``PromptBatch``es (``vlm.evaluation.batch``), the batches of ``val/acc``.
Its ``prompt_scorer`` tells ``VLMModule.validation_step`` how to score them (the benchmark's metric, the
paper's stop words; ``vlm.evaluation.scoring``), which logs ``eval/<benchmark>/<metric>``;
``callbacks.BenchmarkEvaluation`` writes ``<benchmark>_results.json`` and ``<benchmark>_predictions.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, partial
from itertools import islice
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from datamodules.contract import ModelProcessing
from datamodules.datamodule import expand_env
from datamodules.held_out import question_items
from datamodules.sources import iter_samples
from vlm.config import Fusion, Recipe
from vlm.evaluation.batch import PromptBatch, PromptItem, collate_prompts
from vlm.evaluation.benchmarks import Benchmark, Example, get_benchmark
from vlm.evaluation.fewshot import documents, select_shots
from vlm.evaluation.prompts import STOP_WORDS
from vlm.evaluation.scoring import PromptScorer


def question_examples(sources: Sequence[dict[str, Any]], limit: int | None = None) -> list[Example]:
    """The first ``limit`` questions of conversation ``sources`` (``{source, urls, options}``, ``${VAR}``
    expanded) as benchmark examples: ``held_out.question_items``, the answer as the one reference."""
    items = (
        item
        for source in map(expand_env, sources)
        for sample in iter_samples(source["source"], source["urls"], **source.get("options", {}))
        for item in question_items(sample)
    )
    return [
        Example(item.id, item.documents[-1].images, item.documents[-1].text, answers=item.references)
        for item in islice(items, limit)
    ]


class PromptDataset(Dataset):
    """The queries of a benchmark as ``(index, PromptItem)`` pairs: shots, then the query, with its
    references and, for its prediction record, its choices and metadata."""

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

    def __getitem__(self, index: int) -> tuple[int, PromptItem]:
        query = self.examples[index]
        shots = select_shots(query, self.support, self.num_shots, self.seed)
        docs = documents(query, shots, self.benchmark.prompt)
        record = {"choices": query.choices, "metadata": query.metadata}
        return index, PromptItem(query.id, docs, list(query.answers), record=record)


class EvalDataModule(ModelProcessing, LightningDataModule):
    """Generation batches of one benchmark, zero- or few-shot (validation loader only).

    - ``benchmark``: a key of ``vlm.evaluation.BENCHMARKS`` (its prompt and metric); ``files``: its parquet
      files (paths or globs, ``${VAR}`` expanded); ``limit``: evaluate only the first ``limit`` examples.
    - or, instead of ``files``, ``sources``: conversation sources (``{source, urls, options}``, as
      ``VLMDataModule``'s ``val_sources``) whose questions are the examples (``question_examples``: one
      per turn, its answer the one reference), e.g. held-out synthetic questions with the VQAv2 prompt.
    - ``num_shots`` in-context examples per query from ``support_files`` (same layout, e.g. the train
      split) or ``support_sources`` (the first ``support_limit`` questions), drawn with ``seed``
      (``vlm.evaluation.fewshot.select_shots``).
    - ``chat``: instruction models get training's chat template (shots as earlier user/assistant turns,
      then ``Assistant:``); ``False``: plain text for base models (``prompts.plain_text``).
    - ``image_processor`` (``ImageProcessor`` keyword arguments) and the evaluated model's tokenizer,
      recipe, fusion and visual tokens per tile define the ``VLMProcessor``, as in
      ``datamodules.VLMDataModule`` (``datamodules.contract``): ``tokenizer``, ``recipe``,
      ``image_seq_len`` and ``fusion`` are the model's when ``None``, checked against it when set.
    """

    def __init__(
        self,
        benchmark: str,
        files: str | list[str] | None = None,
        support_files: str | list[str] | None = None,
        sources: list[dict[str, Any]] | None = None,
        support_sources: list[dict[str, Any]] | None = None,
        support_limit: int | None = None,
        num_shots: int = 0,
        seed: int = 0,
        chat: bool = True,
        limit: int | None = None,
        tokenizer: str | None = None,
        recipe: Recipe | None = None,
        image_seq_len: int | None = None,
        image_processor: dict[str, Any] | None = None,
        fusion: Fusion | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (files is None) == (sources is None):
            raise ValueError(
                "Give the examples as files (a benchmark's parquet files) or as sources, not both."
            )
        if num_shots and support_files is None and support_sources is None:
            raise ValueError(
                f"num_shots={num_shots} needs support_files or support_sources (where the shots come from)."
            )
        self.benchmark = get_benchmark(benchmark)
        self.files, self.support_files = files, support_files
        self.sources, self.support_sources, self.support_limit = sources, support_sources, support_limit
        self.num_shots, self.seed, self.chat, self.limit = num_shots, seed, chat, limit
        self.processor_settings_given(tokenizer, recipe, image_seq_len, fusion, image_processor)
        self.batch_size, self.num_workers = batch_size, num_workers

    @cached_property
    def examples(self) -> list[Example]:
        """The evaluated examples, in file (or source) order."""
        if self.sources is not None:
            return question_examples(self.sources, self.limit)
        return self.benchmark.read(self.files)[: self.limit]

    @cached_property
    def support(self) -> list[Example]:
        """The examples in-context shots are drawn from (none for zero-shot)."""
        if not self.num_shots:
            return []
        if self.support_sources is not None:
            return question_examples(self.support_sources, self.support_limit)
        return self.benchmark.read(self.support_files)[: self.support_limit]

    def dataset(self) -> PromptDataset:
        return PromptDataset(self.benchmark, self.examples, self.support, self.num_shots, self.seed)

    def prompt_scorer(self, stop_words: Sequence[str] = STOP_WORDS) -> PromptScorer:
        """How ``VLMModule`` scores these prompts: the benchmark's metric, fed with the examples
        (``Benchmark.update``), logged as ``eval/<benchmark>/<metric>``; generations cut at ``stop_words``."""

        def update(metric: Metric, predictions: list[str], batch: PromptBatch) -> None:
            self.benchmark.update(metric, predictions, [self.examples[i] for i in batch["indices"]])

        name = f"eval/{self.benchmark.name}/{self.benchmark.metric_name}"
        return PromptScorer(name, self.benchmark.metric(), stop_words, update)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(collate_prompts, processor=self.processor, chat=self.chat),
        )
