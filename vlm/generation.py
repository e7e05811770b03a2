"""Decoding helpers for ``VisionLanguageModel.generate``: next-token choice and stop strings; and
``generate_answers``, the one path from prompt tensors to answer texts (validation, prediction, chat)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm.config import END_OF_UTTERANCE_TOKEN

if TYPE_CHECKING:
    from vlm.model import VisionLanguageModel


def select_next_token(
    logits: Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from last-position ``logits`` (batch, vocab): argmax, or a sample.

    Sampling applies temperature, then top-k, then top-p, with transformers' logits warpers so the
    distribution is the one ``transformers.generate`` would sample from.
    """
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0 when sampling (got {temperature}); use do_sample=False for greedy."
        )
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(None, logits.float())
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


class StopStrings:
    """Tells which rows' generated text contains one of ``stop_strings`` (e.g. "Question", "User:")."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: PreTrainedTokenizerBase | None) -> None:
        if tokenizer is None:
            raise ValueError(
                "stop_strings need the tokenizer to decode the generated text: pass tokenizer=..."
            )
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer

    def __call__(self, generated: Tensor) -> Tensor:
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=False)
        hits = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=generated.device)


@dataclass
class GenerationSettings:
    """How answers are decoded: greedy, or sampled with ``do_sample`` (``temperature``, ``top_k``,
    ``top_p``); at most ``max_new_tokens``, stopping at eos, ``<end_of_utterance>`` or any of
    ``stop_strings`` (cut from the answer)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: list[str] = field(default_factory=list)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end an answer: eos and ``<end_of_utterance>`` (the end of an assistant turn)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id, vocab.get(END_OF_UTTERANCE_TOKEN)]
    return [i for i in ids if i is not None]


def generate_answers(
    model: VisionLanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, Any],
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Answer texts (special tokens dropped, cut at the first stop string) to left-padded prompts:
    ``inputs`` holds ``VisionLanguageModel.generate``'s tensors (``input_ids``, ``attention_mask``,
    ``pixel_values``...)."""
    sequences = model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id or 0,
        stop_strings=settings.stop_strings,
        tokenizer=tokenizer,
        generator=generator,
    )
    texts = tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for stop in settings.stop_strings:
        texts = [text.split(stop, 1)[0] for text in texts]
    return texts
