"""Decoding helpers for ``VisionLanguageModel.generate``: next-token choice and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


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
