"""Decoding for ``VisionLanguageModel.generate``: the loop, its two back-ends and its helpers; and
``generate_answers``, the one path from prompt tensors to answer texts (validation, prediction, chat).

The images are encoded once, the prompt is prefilled once, then each step picks the next tokens
(``select_next_token``) until eos or a stop string (``StopStrings``). Back-ends: ``vlm.decoder``'s
``CachedDecoder`` (Llama / Mistral / Qwen2 language models without adapters), else transformers' own
modules with a ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm.config import END_OF_UTTERANCE_TOKEN
from vlm.cross_attention import CrossAttentionMedia, text_image_index
from vlm.decoder import CachedDecoder, unsupported_reason

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


def generate(
    model: VisionLanguageModel,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    pixel_attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
    generator: torch.Generator | None = None,
    tiles_per_sample: Tensor | None = None,
    tiles_per_image: Tensor | None = None,
) -> Tensor:
    """``model.generate``: decode up to ``max_new_tokens`` after left-padded prompts; returns prompts +
    new tokens.

    Greedy by default, sampling with ``do_sample`` (temperature, top-k, top-p). A row stops at
    any of ``eos_token_id`` or once its text contains one of ``stop_strings`` (needs
    ``tokenizer``); finished rows are filled with ``pad_token_id``. ``tiles_per_sample`` /
    ``tiles_per_image`` as in ``forward``.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask[:, -1].eq(0).any():
        raise ValueError(
            "generate needs left-padded prompts (attention_mask[:, -1] must be 1 for every row)."
        )
    eos_ids = torch.tensor(
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id),
        device=input_ids.device,
    )
    stops = StopStrings(stop_strings, tokenizer) if stop_strings else None
    image_features = None if pixel_values is None else model.encode_images(pixel_values, pixel_attention_mask)
    inputs_embeds, media = model.embed_inputs(input_ids, image_features, tiles_per_sample, tiles_per_image)
    if unsupported_reason(model.language_model) is None:
        logits, advance = _cached_decoding(
            model, input_ids, attention_mask, inputs_embeds, media, max_new_tokens
        )
    else:
        logits, advance = _transformers_decoding(model, input_ids, attention_mask, inputs_embeds, media)
    sequences = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_tokens = select_next_token(logits, do_sample, temperature, top_k, top_p, generator)
        next_tokens = torch.where(finished, pad_token_id, next_tokens)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        finished |= torch.isin(next_tokens, eos_ids)
        if stops is not None:
            finished |= stops(sequences[:, input_ids.shape[1] :])
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = advance(next_tokens[:, None])
    return sequences


def _cached_decoding(
    model: VisionLanguageModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    inputs_embeds: Tensor,
    media: CrossAttentionMedia | None,
    max_new_tokens: int,
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Prefill through ``vlm.decoder.CachedDecoder``: the prompt's last logits, and a function from
    each step's new tokens (rows, 1) to their logits."""
    fusion = None if media is None else model.cross_attention
    decoder = CachedDecoder(model.language_model, *input_ids.shape, max_new_tokens, fusion)
    embed_tokens = model.language_model.get_input_embeddings()
    if media is None:
        logits = decoder.prefill(inputs_embeds, attention_mask)
        return logits, lambda step_ids: decoder.step(embed_tokens(step_ids))
    image_markers = input_ids == model.image_token_id
    images_seen = image_markers.sum(1)
    conditioning = (media.media, media.media_image_index)
    logits = decoder.prefill(inputs_embeds, attention_mask, conditioning, text_image_index(image_markers))

    def advance(step_ids: Tensor) -> Tensor:
        nonlocal images_seen
        step_markers = step_ids == model.image_token_id
        step_index = text_image_index(step_markers, images_seen)
        images_seen = images_seen + step_markers.sum(1)
        return decoder.step(embed_tokens(step_ids), step_index)

    return logits, advance


def _transformers_decoding(
    model: VisionLanguageModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    inputs_embeds: Tensor,
    media: CrossAttentionMedia | None,
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Prefill through transformers' own modules and a ``DynamicCache`` (for the language models
    ``CachedDecoder`` does not run): the prompt's last logits, and a function from each step's new
    tokens (rows, 1) to their logits."""
    cache = DynamicCache(config=model.language_model.config)
    head = model.plain_output_embedding  # then only the last position's logits are computed
    images_seen = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def run(step_ids: Tensor, step_embeds: Tensor) -> Tensor:
        nonlocal images_seen
        out = model.language_forward(
            step_embeds,
            step_ids,
            media,
            images_seen,
            hidden_states_only=head is not None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        if media is not None:
            images_seen = images_seen + (step_ids == model.image_token_id).sum(1)
        return out.logits[:, -1] if head is None else head(out.last_hidden_state[:, -1])

    def advance(step_ids: Tensor) -> Tensor:
        nonlocal attention_mask, position_ids
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        position_ids = position_ids[:, -1:] + 1
        return run(step_ids, model.language_model.get_input_embeddings()(step_ids))

    return run(input_ids, inputs_embeds), advance


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
