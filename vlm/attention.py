"""Attention implementation choice: one config value for the language model
(``language.attn_implementation``), one for the vision tower (``vision.attn_implementation``).

Choices: ``sdpa`` (the CPU default; transformers builds its boolean block mask from per-document
``position_ids``), ``eager``, ``flex_attention`` (a document ``BlockMask`` built once per batch),
``flash_attention_2`` / ``flash_attention_3`` (the flash-attn wheels), ``varlen`` (torch's in-tree
``torch.nn.attention.varlen``: CUDA, bf16/fp16, no extra wheel; registered here through transformers'
``AttentionInterface``) and ``auto``: on a CUDA machine the first available of flash_attention_3,
flash_attention_2, varlen (no GPU measurement has ranked them in this codebase yet: this is the kernels'
published order), else sdpa. A choice this machine cannot run fails when the model is built, naming the
key and what to install.

Packed sequences without ``cu_seq_lens`` keyword arguments: transformers' SigLIP attention forwards
only ``attention_mask`` to the attention function, so a packed vision tower hands the boundaries over
in its place: a document ``BlockMask`` for ``flex_attention``, a ``PackedSequences`` for the varlen
kernels, which then run under ``packed_implementation(kernel)`` (registered here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import varlen as torch_varlen
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "varlen")
VARLEN = "varlen"
#: Implementations that read ``cu_seq_lens`` (a padding-free batch is flattened to one row for them).
VARLEN_KERNELS = frozenset({"flash_attention_2", "flash_attention_3", VARLEN})


def _unavailable(choice: str) -> str | None:
    """Why ``choice`` cannot run on this machine (what to install or use), or ``None`` if it can."""
    if choice == "flash_attention_2" and not is_flash_attn_2_available():
        return "it needs the flash-attn wheel on a CUDA GPU: `pip install flash-attn --no-build-isolation`"
    if choice == "flash_attention_3" and not is_flash_attn_3_available():
        return (
            "it needs FlashAttention-3 (`flash_attn_interface`, built from flash-attn's hopper/ folder) "
            "on an H100/H200"
        )
    if choice == VARLEN and not torch.cuda.is_available():
        return (
            "torch.nn.attention.varlen runs on CUDA GPUs only (bf16/fp16): use sdpa or flex_attention on CPU"
        )
    return None


def fastest_available() -> str:
    """The ``auto`` choice: the first available of flash_attention_3, flash_attention_2, varlen on CUDA,
    else sdpa."""
    if torch.cuda.is_available():
        for choice in ("flash_attention_3", "flash_attention_2", VARLEN):
            if _unavailable(choice) is None:
                return choice
    return "sdpa"


def resolve_attention(choice: str, key: str) -> str:
    """The transformers ``attn_implementation`` for config value ``choice`` of config key ``key``."""
    if choice not in CHOICES:
        raise ValueError(
            f"{key}={choice!r} is not an attention implementation; choose one of {', '.join(CHOICES)}."
        )
    if choice == "auto":
        choice = fastest_available()
    reason = _unavailable(choice)
    if reason is not None:
        raise ValueError(f"{key}={choice!r} is not available here: {reason}; or set {key}: auto.")
    return choice


def varlen_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function over ``torch.nn.attention.varlen.varlen_attn``.

    ``query`` (batch, heads, seq, dim). A padding-free batch (``cu_seq_lens_*``) runs as its sequences;
    a batch without padding mask and with as many queries as keys runs as ``batch`` sequences of ``seq``;
    anything else (a padding mask, cached decoding) goes to transformers' sdpa with the mask built for it.
    """
    batch, heads, length, dim = query.shape
    if cu_seq_lens_q is None and (attention_mask is not None or key.shape[2] != length):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout > 0:
        raise ValueError("varlen attention has no dropout: set the model's attention dropout to 0.")
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        cu_seq_lens_k, max_length_q, max_length_k = cu_seq_lens_q, length, length
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    left = window - 1 if window else -1
    out = torch_varlen.varlen_attn(
        query.transpose(1, 2).reshape(-1, heads, dim),
        key.transpose(1, 2).reshape(-1, key.shape[1], dim),
        value.transpose(1, 2).reshape(-1, value.shape[1], dim),
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        scale=scaling,
        window_size=(left, 0) if causal else (left, left),
        enable_gqa=key.shape[1] != heads,
    )
    return out.reshape(batch, length, heads, dim), None


def _varlen_mask(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """No mask for the varlen kernel (``cu_seq_lens`` or whole rows say it all); sdpa's for a padding mask."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, _varlen_mask)


@dataclass(frozen=True)
class PackedSequences:
    """The boundaries of sequences packed into one row, passed where a model forwards only a mask.

    ``cu_seq_lens`` (int32, ``n + 1`` offsets from 0 to the row length) and the longest sequence: what the
    varlen kernels take as ``cu_seq_lens_q/k`` and ``max_length_q/k`` (queries and keys are the same
    tokens: self-attention within each sequence)."""

    cu_seq_lens: Tensor
    max_length: int

    @classmethod
    def from_lengths(cls, lengths: Tensor) -> PackedSequences:
        """Boundaries of sequences of ``lengths`` tokens (1-D, all > 0) laid end to end."""
        cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(cu_seq_lens, int(lengths.max()))

    def varlen_kwargs(self) -> dict[str, Tensor | int]:
        """The keyword arguments of transformers' varlen attention functions."""
        return {
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


_PACKED_PREFIX = "packed_"


def _reading_packed_sequences(kernel: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    def attention_forward(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(attention_mask, PackedSequences):
            kwargs |= attention_mask.varlen_kwargs()
            attention_mask = None
        return ALL_ATTENTION_FUNCTIONS[kernel](module, query, key, value, attention_mask, **kwargs)

    return attention_forward


def packed_implementation(kernel: str) -> str:
    """The attention implementation that runs varlen ``kernel`` with ``PackedSequences`` as its mask.

    Registered with transformers on first use under ``packed_<kernel>``; any other mask goes to ``kernel``
    unchanged, and masks are built as for ``kernel``."""
    if kernel not in VARLEN_KERNELS:
        raise ValueError(
            f"{kernel!r} is not a varlen kernel; choose one of {', '.join(sorted(VARLEN_KERNELS))}."
        )
    name = _PACKED_PREFIX + kernel
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _reading_packed_sequences(kernel))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[kernel])
    return name


def runs_packed_sequences(implementation: str) -> bool:
    """Whether attention under ``implementation`` can keep sequences packed into one row apart when the
    model forwards only ``attention_mask`` (see ``packed_sequences_mask``)."""
    return implementation == "flex_attention" or implementation.startswith(_PACKED_PREFIX)


def packed_sequences_mask(implementation: str, lengths: Tensor) -> BlockMask | PackedSequences:
    """What to pass as ``attention_mask`` so that sequences of ``lengths`` tokens, packed into one row,
    attend only within themselves (bidirectionally): a ``BlockMask`` under flex attention (built once per
    batch, no (seq x seq) tensor), the ``PackedSequences`` under a ``packed_implementation``."""
    if not runs_packed_sequences(implementation):
        raise ValueError(
            f"Attention implementation {implementation!r} cannot run packed sequences without a dense mask; "
            "use flex_attention or a varlen kernel (flash_attention_2/3, varlen)."
        )
    if implementation != "flex_attention":
        return PackedSequences.from_lengths(lengths)
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    total = int(sequence.numel())

    def same_sequence(batch: Tensor, head: Tensor, q_index: Tensor, kv_index: Tensor) -> Tensor:
        return sequence[q_index] == sequence[kv_index]

    return create_block_mask(same_sequence, None, None, total, total, device=lengths.device)
