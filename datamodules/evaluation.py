"""Benchmark prompts as a DataModule: ``python -m lightning validate --config configs/eval/<b>.yaml``.

``EvalDataModule`` reads a benchmark (``vlm.evaluation.benchmarks``), builds each query's zero- or
few-shot prompt (``vlm.evaluation.fewshot``) with training's chat template (or as plain text for
base models) and serves left-padded generation batches in the ``prompt_*`` layout that
``VLMModule.generate_answers`` reads. ``callbacks.BenchmarkEvaluation`` generates greedily with the
LightningModule's ``generate_answers``, cuts the text at the paper's stop words, scores it with the
benchmark's metric, logs ``eval/<benchmark>/<metric>`` and writes ``<benchmark>_results.json`` and
``<benchmark>_predictions.jsonl``. The batches carry no ``answers`` / ``labels``, so
``VLMModule.validation_step`` itself does nothing on them (no second generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, partial
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from vlm.evaluation.benchmarks import Benchmark, Example, get_benchmark
from vlm.evaluation.fewshot import documents, select_shots
from vlm.evaluation.prompts import (
    Document,
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
