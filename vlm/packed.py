"""Packed rows (several documents per row) inside the model: the padding-free layout and its baseline.

Padding-free (transformers' contract, what ``datamodules.packing.collate_rows`` makes): per-document
``position_ids`` restarting at 0 plus ``cu_seq_lens_q/k`` and ``max_length_q/k`` over the batch
flattened to one row, and no attention mask. For varlen kernels (flash attention, torch's varlen) the
model flattens the rows and hands them those; for ``flex_attention`` (a document ``BlockMask``) and
``sdpa`` (a boolean block mask) it keeps the rows, and transformers builds the masks from ``position_ids``
(flattened, sdpa would compute and mask every cross-row block too). No (seq x seq) tensor is built
here, except by ``document_attention_mask``: the dense baseline that packed rows used before (kept to
measure against, ``collate_rows(padding_free=False)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

PADDING_FREE_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def document_attention_mask(document_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive (batch, 1, seq, seq) mask: token i attends to token j <= i of its own document.

    The dense baseline. Padding (document 0) only attends to padding, so no row is fully masked. Used
    as is by the language model's eager and sdpa attention (transformers passes 4-D masks through).
    """
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    allowed = causal & (document_ids[:, :, None] == document_ids[:, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def padding_free_kwargs(
    cu_seq_lens_q: Tensor | None,
    cu_seq_lens_k: Tensor | None,
    max_length_q: int | None,
    max_length_k: int | None,
) -> dict[str, Tensor | int] | None:
    """The varlen keyword arguments of a padding-free batch, or ``None`` when the batch is not one.

    All four are given together or not at all (a clear error otherwise): a partial set would let a
    varlen kernel fall back to inferring the boundaries, or attend across documents.
    """
    values = dict(zip(PADDING_FREE_KEYS, (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)))
    missing = [key for key, value in values.items() if value is None]
    if len(missing) == len(values):
        return None
    if missing:
        raise ValueError(
            f"A padding-free batch needs all of {', '.join(PADDING_FREE_KEYS)}; {', '.join(missing)} "
            "missing. Collate packed rows with datamodules.packing.collate_rows."
        )
    return {key: int(value) if key.startswith("max_") else value for key, value in values.items()}


def first_image_of_document(image_markers: Tensor, document_starts: Tensor) -> Tensor:
    """(batch, seq) 1-based ordinal, counted along the row, of the first image of each token's document.

    Images with a lower ordinal belong to earlier documents of the row: cross-attention must not let
    the token see them. ``document_starts`` is True on the first token of every document.
    """
    images_before = image_markers.long().cumsum(-1) - image_markers.long()
    at_starts = torch.where(document_starts, images_before + 1, 0)
    return at_starts.cummax(-1).values
