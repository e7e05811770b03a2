"""Generate and score ``PromptBatch``es: the one path of ``val/acc``, the benchmarks, lmms-eval and the
ablations.

A ``PromptScorer`` asks ``generate`` (``VLMModule.generate_answers``: greedy, stops at eos /
``<end_of_utterance>``) for the batch's answers, cuts each at its stop words (``prompts.apply_stop_words``:
the scorer's, then the item's), feeds its metric (by default ``metric.update(predictions,
batch["references"])``) and keeps one record per item: ``id``, ``prompt``, ``question``, ``generation``,
``prediction``, ``answers`` and the item's own ``record`` fields. ``VLMModule`` runs it on every prompt
batch of a validation run and logs ``compute()`` under ``name``; the DataModule chooses it
(``EvalDataModule.prompt_scorer``: the benchmark's metric as ``eval/<benchmark>/<metric>``; otherwise
``held_out_accuracy``: ``ExactMatch`` as ``val/acc``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchmetrics import Metric

from vlm.evaluation.batch import PromptBatch
from vlm.evaluation.prompts import apply_stop_words
from vlm.metrics import ExactMatch

Generate = Callable[[PromptBatch], list[str]]
Update = Callable[[Metric, list[str], PromptBatch], None]


def update_with_references(metric: Metric, predictions: list[str], batch: PromptBatch) -> None:
    """The default metric feed: the predictions against the batch's ``references``."""
    metric.update(predictions, batch["references"])


class PromptScorer:
    """Generate-and-score of prompt batches with ``metric`` (``None``: generate and cut only), logged as
    ``name``; ``update`` feeds the metric (default: ``update_with_references``)."""

    def __init__(
        self,
        name: str,
        metric: Metric | None,
        stop_words: Sequence[str] = (),
        update: Update = update_with_references,
    ) -> None:
        self.name, self.metric, self.stop_words, self.update = name, metric, tuple(stop_words), update
        self.records: list[dict[str, Any]] = []

    def __call__(self, batch: PromptBatch, generate: Generate) -> list[dict[str, Any]]:
        """Answer and score one batch; returns (and keeps) its records."""
        generations = generate(batch)
        predictions = [
            apply_stop_words(text, [*self.stop_words, *stops])
            for text, stops in zip(generations, batch["stop_words"])
        ]
        if self.metric is not None:
            self.update(self.metric, predictions, batch)
        records = [
            {"id": id_, "prompt": prompt, "question": question, "generation": text, "prediction": pred,
             "answers": refs, **extra}
            for id_, prompt, question, text, pred, refs, extra in zip(
                batch["ids"], batch["prompts"], batch["questions"], generations, predictions,
                batch["references"], batch["records"],
            )
        ]  # fmt: skip
        self.records += records
        return records

    def to(self, device: Any) -> PromptScorer:
        """The metric moved to ``device`` (where the model's outputs are)."""
        if self.metric is not None:
            self.metric = self.metric.to(device)
        return self

    def compute(self) -> float:
        """The metric over every scored item (reduced across processes by torchmetrics)."""
        if self.metric is None:
            raise ValueError(f"{self.name}: this scorer has no metric.")
        return float(self.metric.compute())


def held_out_accuracy() -> PromptScorer:
    """``val/acc``: exact match (``vlm.metrics.ExactMatch``) of the whole generation, no stop words."""
    return PromptScorer("val/acc", ExactMatch())
