"""The one prompt path: prompt items -> ``PromptBatch`` (``collate_prompts``).

Held-out questions of training conversations (``datamodules.questions``: ``val/acc`` and ``predict``),
benchmark examples (``datamodules.EvalDataModule``, zero- or few-shot) and lmms-eval requests
(``runners.lmms_eval``) all become ``PromptItem``s: the documents of one prompt (in-context shots, then
the query) with the query's references. ``collate_prompts`` renders them with training's chat template
(or as plain text for base models) and encodes them left-padded; the model inputs sit under the
``prompt_`` prefix (``vlm.processing.processor.prompt_inputs``), ``generation_inputs`` takes them back
out for ``generate``. ``vlm.evaluation.scoring.PromptScorer`` generates and scores such batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from torch import Tensor

from vlm.evaluation.prompts import PromptTurn, chat_messages, plain_text, render_chat_text
from vlm.processing import VLMProcessor, build_processor
from vlm.processing.processor import GENERATION_INPUTS, prompt_inputs

PROMPT_PREFIX = "prompt_"


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer.

    - ``id``: the example's id (a benchmark question id; a sample key, ``#<turn>`` for one of several
      questions); ``documents``: in-context shots (with answers), then the query;
    - ``references``: the query's reference answers (may be empty: nothing to score);
    - ``stop_words``: where this item's generation is cut, besides the scorer's;
    - ``record``: extra fields of its prediction record (a benchmark's choices and metadata);
    - ``max_image_resolution``: a cap on the longest image edge (the sample's, as in training).
    """

    id: str
    documents: list[PromptTurn]
    references: list[str] = field(default_factory=list)
    stop_words: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    max_image_resolution: int | None = None

    @property
    def question(self) -> str:
        """The query's user text (``<image>`` placeholders included)."""
        return self.documents[-1].user_text


class _ImageInputs(TypedDict, total=False):
    prompt_pixel_values: Tensor
    prompt_pixel_attention_mask: Tensor
    prompt_tiles_per_sample: Tensor
    prompt_tiles_per_image: Tensor


class PromptBatch(_ImageInputs):
    """A left-padded generation batch: the ``prompt_*`` inputs of ``generate`` (images only when some
    prompt has them), then per item: ``indices`` (positions in the dataset), ``ids``, ``prompts`` (the
    rendered prompt texts before image expansion), ``questions`` (the queries' user texts),
    ``references``, ``stop_words`` and ``records`` (``PromptItem``'s fields)."""

    prompt_input_ids: Tensor
    prompt_attention_mask: Tensor
    indices: list[int]
    ids: list[str]
    prompts: list[str]
    questions: list[str]
    references: list[list[str]]
    stop_words: list[list[str]]
    records: list[dict[str, Any]]


def _capped(processor: VLMProcessor, items: Sequence[PromptItem]) -> VLMProcessor:
    """``processor`` with its longest image edge lowered to the smallest cap of ``items`` (if below)."""
    limits = {item.max_image_resolution for item in items} - {None}
    if not limits or min(limits) >= processor.image_processor.longest_edge:
        return processor
    image_processor = dataclasses.replace(processor.image_processor, longest_edge=min(limits))
    return build_processor(
        processor.tokenizer, image_processor, processor.image_seq_len, fusion=processor.fusion
    )


def collate_prompts(
    items: Sequence[tuple[int, PromptItem]], processor: VLMProcessor, chat: bool = True
) -> PromptBatch:
    """The ``PromptBatch`` of ``(index, item)`` pairs: with ``chat``, training's chat template up to
    ``Assistant:`` (shots as earlier user/assistant turns); otherwise plain text (``prompts.plain_text``)."""
    prompt_items = [item for _, item in items]
    processor = _capped(processor, prompt_items)
    docs = [item.documents for item in prompt_items]
    images = [[image for doc in documents for image in doc.images] for documents in docs]
    images_arg = images if any(images) else None
    if chat:
        encoded = processor.encode_conversations(
            [chat_messages(documents) for documents in docs],
            images_arg,
            add_generation_prompt=True,
            padding_side="left",
        )
        prompts = [render_chat_text(documents) for documents in docs]
    else:
        prompts = [plain_text(documents) for documents in docs]
        encoded = processor(prompts, images_arg, padding_side="left")
    return PromptBatch(
        **prompt_inputs(encoded),
        indices=[index for index, _ in items],
        ids=[item.id for item in prompt_items],
        prompts=prompts,
        questions=[item.question for item in prompt_items],
        references=[list(item.references) for item in prompt_items],
        stop_words=[list(item.stop_words) for item in prompt_items],
        records=[dict(item.record) for item in prompt_items],
    )


def generation_inputs(batch: PromptBatch) -> dict[str, Tensor]:
    """The batch's ``generate`` arguments (``input_ids``, ``attention_mask``, images), prefix removed."""
    return {key: batch[PROMPT_PREFIX + key] for key in GENERATION_INPUTS if PROMPT_PREFIX + key in batch}
