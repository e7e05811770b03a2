"""Flamingo-style gated cross-attention from text to image features (Idefics2 paper, section 3.2).

``GatedCrossAttentionBlock`` has open_flamingo's parameter names and shapes (open_flamingo
state dicts load with ``strict=True``) but takes the media flattened to ``(B, M, Dv)`` with a
per-token image index, so that images of one batch may have different numbers of tokens.
``CrossAttentionFusion`` inserts the blocks in front of decoder layers of an unmodified
transformers causal LM through forward pre-hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel

from vlm.config import CrossAttentionConfig


def text_image_index(media_locations: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Number of images at or before each text position, ``(B, T)``, from the image-marker mask ``(B, T)``.

    ``offset`` ``(B,)`` counts the images already seen before this chunk of text (the cached
    prefix during incremental generation).
    """
    index = media_locations.long().cumsum(dim=-1)
    return index if offset is None else index + offset[:, None]


@dataclass
class CrossAttentionMedia:
    """Visual tokens per sample for cross-attention (batch, tokens, dim) and each token's image."""

    media: torch.Tensor
    media_image_index: torch.Tensor


def media_by_sample(
    images_per_sample: torch.Tensor, image_features: torch.Tensor, tiles_per_image: torch.Tensor
) -> CrossAttentionMedia:
    """Group visual tokens (tiles, tokens_per_tile, dim) by sample: image i (its tiles' tokens together)
    follows the sample's i-th ``<image>`` marker; ``media_image_index`` is its 1-based ordinal, 0 on the
    padding of samples with fewer visual tokens."""
    _, tokens_per_tile, dim = image_features.shape
    device = images_per_sample.device
    batch = len(images_per_sample)
    image_sample = torch.repeat_interleave(torch.arange(batch, device=device), images_per_sample)
    first_image = torch.cumsum(images_per_sample, 0) - images_per_sample
    image_ordinal = torch.arange(len(image_sample), device=device) - first_image[image_sample] + 1
    image_tokens = tiles_per_image.to(device) * tokens_per_tile
    token_sample = torch.repeat_interleave(image_sample, image_tokens)
    sample_tokens = torch.zeros(batch, dtype=torch.long, device=device).index_add_(
        0, image_sample, image_tokens
    )
    first_token = torch.cumsum(sample_tokens, 0) - sample_tokens
    token_position = torch.arange(len(token_sample), device=device) - first_token[token_sample]
    width = max(int(sample_tokens.max()), 1)
    media = image_features.new_zeros(batch, width, dim)
    media[token_sample, token_position] = image_features.reshape(-1, dim)
    media_image_index = torch.zeros(batch, width, dtype=torch.long, device=device)
    media_image_index[token_sample, token_position] = torch.repeat_interleave(image_ordinal, image_tokens)
    return CrossAttentionMedia(media, media_image_index)


class MaskedCrossAttention(nn.Module):
    """Multi-head attention from text tokens to the media tokens of the image(s) before them."""

    def __init__(
        self,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.only_attend_immediate_media = only_attend_immediate_media
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_image_index: torch.Tensor,
        text_image_index: torch.Tensor,
        text_first_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` ``(B, T, D)`` to ``media`` ``(B, M, Dv)``; see ``GatedCrossAttentionBlock``."""
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))

        media_index = media_image_index[:, None, :]
        text_index = text_image_index[:, :, None]
        if self.only_attend_immediate_media:
            allowed = media_index == text_index
        else:
            allowed = media_index <= text_index
        allowed = allowed & (media_index > 0)  # (B, T, M); index 0 marks padding media tokens
        if text_first_image is not None:  # packed rows: only the images of the token's own document
            allowed = allowed & (media_index >= text_first_image[:, :, None])
        has_media = allowed.any(dim=-1, keepdim=True)
        # Rows with nothing to attend to (text before any image) attend to everything, which keeps
        # the softmax finite, and are zeroed below.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(allowed | ~has_media)[:, None])
        out = rearrange(out, "b h n d -> b n (h d)").masked_fill(~has_media, 0.0)
        return self.to_out(out)


class GatedCrossAttentionBlock(nn.Module):
    """Tanh-gated cross-attention then tanh-gated feed-forward, as open_flamingo's block of that name.

    Both gates start at 0, so a freshly inserted block is the identity and the language model's
    behaviour is untouched at the start of training.
    """

    def __init__(
        self,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head, heads, only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        inner_dim = int(dim * ff_mult)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim, bias=False),
            nn.GELU(),
            nn.Linear(inner_dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_image_index: torch.Tensor,
        text_image_index: torch.Tensor,
        text_first_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Condition text ``x`` ``(B, T, D)`` on ``media`` ``(B, M, Dv)``; returns ``(B, T, D)``.

        ``media_image_index`` ``(B, M)``: 1-based ordinal of the image each media token belongs to
        within its sample, 0 for padding tokens. ``text_image_index`` ``(B, T)``: number of images
        at or before each text position (see ``text_image_index()``). A text token attends to the
        tokens of image ``t`` only, or of images ``1..t`` when ``only_attend_immediate_media`` is
        off; text before any image (``t == 0``) gets no cross-attention output. ``text_first_image``
        ``(B, T)``, for rows packing several documents: the ordinal of the first image of each text
        token's document; images before it belong to earlier documents and are never attended to.
        """
        attended = self.attn(x, media, media_image_index, text_image_index, text_first_image)
        x = attended * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


# Where the decoder layers live in the common transformers causal LMs (Llama/Mistral/Qwen2, GPT-2).
_DECODER_LAYER_PATHS = ("model.layers", "transformer.h")


def find_decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM, in order.

    Known layouts are looked up by path; any other model must have exactly one ``nn.ModuleList``
    of ``config.num_hidden_layers`` modules.
    """
    for path in _DECODER_LAYER_PATHS:
        try:
            layers = language_model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    num_layers = getattr(getattr(language_model, "config", None), "num_hidden_layers", None)
    candidates = [
        name
        for name, module in language_model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"Cannot find the decoder layers of {type(language_model).__name__}: expected one nn.ModuleList "
            f"of config.num_hidden_layers={num_layers} modules, found {candidates or 'none'}."
        )
    return language_model.get_submodule(candidates[0])


class CrossAttentionFusion(nn.Module):
    """Gated cross-attention blocks run in front of some decoder layers of a language model.

    The language model is neither wrapped nor registered as a submodule (its owner keeps it, and
    its state-dict keys stay unchanged): a forward pre-hook on each chosen decoder layer replaces
    the layer's input hidden states by the block's output. The media are given for the duration
    of a forward pass by ``condition()``; outside of it the hooks do nothing, so the language model
    runs as text-only.
    """

    def __init__(self, language_model: PreTrainedModel, cfg: CrossAttentionConfig, dim_visual: int) -> None:
        super().__init__()
        config = language_model.config
        dim = getattr(config, "hidden_size", None) or config.n_embd
        layers = find_decoder_layers(language_model)
        self.layer_indices = tuple(i for i in range(len(layers)) if (i + 1) % cfg.every_n_layers == 0)
        if not self.layer_indices:
            raise ValueError(
                f"every_n_layers={cfg.every_n_layers} selects none of the {len(layers)} decoder layers."
            )
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(
                dim,
                dim_visual,
                dim_head=cfg.dim_head,
                heads=cfg.heads,
                ff_mult=cfg.ff_mult,
                only_attend_immediate_media=cfg.only_attend_immediate_media,
            )
            for _ in self.layer_indices
        )
        self._conditioning: tuple[torch.Tensor, ...] | None = None
        self._hook_handles = [
            layers[i].register_forward_pre_hook(partial(self._run_block, block), with_kwargs=True)
            for i, block in zip(self.layer_indices, self.blocks)
        ]

    @contextmanager
    def condition(
        self,
        media: torch.Tensor,
        media_image_index: torch.Tensor,
        text_image_index: torch.Tensor,
        text_first_image: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Within this context, the language model's forward passes attend to ``media``.

        Arguments as ``GatedCrossAttentionBlock.forward``; ``text_image_index`` covers the text of
        the forward pass (only the new tokens when decoding with a KV cache: use the ``offset``
        of ``text_image_index()``), while ``media`` holds all the images of the samples.
        """
        previous = self._conditioning
        self._conditioning = (media, media_image_index, text_image_index, text_first_image)
        try:
            yield
        finally:
            self._conditioning = previous

    def repeated_blocks(self) -> list[nn.Module]:
        """The gated cross-attention blocks, in order (FSDP2 and activation-checkpointing units)."""
        return list(self.blocks)

    def remove(self) -> None:
        """Unregister the hooks from the language model, which then runs as if the fusion never existed."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _run_block(
        self, block: GatedCrossAttentionBlock, layer: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        if self._conditioning is None:
            return None
        media, *indices = self._conditioning
        media = media.to(block.attn_gate.dtype)
        if args:
            return (block(args[0], media, *indices), *args[1:]), kwargs
        hidden_states = block(kwargs["hidden_states"], media, *indices)
        return args, {**kwargs, "hidden_states": hidden_states}
