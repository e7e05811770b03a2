"""Held-out questions: each (question, answer) turn of a conversation sample as a ``PromptItem``, the
prompts of ``val/acc`` (``VLMDataModule(val_generate=True)``), of ``python -m lightning predict`` and of
the ablations' few-shot runs (``EvalDataModule(sources=...)``)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

from torch.utils.data import Dataset

from datamodules.sample import Sample
from vlm.config import IMAGE_TOKEN
from vlm.evaluation.batch import PromptItem
from vlm.evaluation.prompts import PromptTurn


def question_items(sample: Sample, max_questions: int | None = None) -> list[PromptItem]:
    """Each (question, answer) turn of a conversation sample as a stand-alone ``PromptItem``.

    The prompt is the images and that one question only (no earlier turns: an earlier question such
    as "How many circles...?" would give away the answer to "What shape is drawn?"). The images go
    before the question unless the question places them with ``<image>`` (as ``SampleEncoder``;
    ``PromptTurn.user_text``).
    An item's id is the sample's key, with ``#<turn index>`` when the sample has several turns; its
    reference is the turn's answer (``""``: none).
    """
    images = sample.images
    placed = any(IMAGE_TOKEN in user for user, _ in sample.turns)
    resolution = sample.meta.get("max_image_resolution")
    out = []
    for index, (user, answer) in enumerate(sample.turns[:max_questions]):
        if placed and user.count(IMAGE_TOKEN) != len(images):
            continue  # images placed in another turn: this question alone does not show them
        key = sample.key if len(sample.turns) == 1 else f"{sample.key}#{index}"
        out.append(PromptItem(key, [PromptTurn(images, user)], [answer], max_image_resolution=resolution))
    return out


class QuestionDataset(Dataset):
    """The ``question_items`` of every sample (read once, in order), as ``(index, item)`` pairs."""

    def __init__(self, samples: Iterable[Sample], max_questions_per_sample: int | None = None) -> None:
        self.samples = samples
        self.max_questions_per_sample = max_questions_per_sample

    @cached_property
    def items(self) -> list[PromptItem]:
        """Every held-out question, in stream order."""
        return [q for s in self.samples for q in question_items(s, self.max_questions_per_sample)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, PromptItem]:
        return index, self.items[index]
