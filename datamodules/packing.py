"""Packing processed documents into fixed-length rows, without attention or loss across documents.

A ``TokenizedDocument`` is one processed sample: token ids, labels and its image tiles. ``split_document``
cuts a long one into windows of at most ``max_len`` tokens at text positions only: an image's
token run (from the ``<fake_token_around_image>`` before its first ``<image>`` to the one after
its last, Idefics3 tile tags and row breaks included) is never cut, and a document holding a run
that cannot fit a window is dropped and counted (``too_long_image_span``), never misaligned.
``pack`` fills rows of ``max_seq_len`` tokens and at most ``max_tiles`` tiles by best-fit
decreasing; ``RowPacker`` does it window by window of a sample stream. ``collate_rows`` makes the
batch ``VisionLanguageModel.forward`` takes, padding-free by default (transformers' contract): per-
document ``position_ids`` restarting at 0, ``cu_seq_lens_q/k`` (int32 document boundaries over the
batch flattened to one row) and ``max_length_q/k`` (ints), computed here on the CPU (in the loader
workers), and no attention mask; ``document_ids`` (1, 2, ... per row; 0 = padding) only says which
tokens are real. The padding at the end of a row is one more sequence of its own (positions 0, 1,
...; labels -100), so ``cu_seq_lens`` covers the whole flattened batch. ``padding_free=False`` makes
the dense baseline instead: a padding ``attention_mask`` and ``document_ids``, from which the model
builds a (batch, 1, seq, seq) block-diagonal mask. The first token of every document gets label
-100: it would be predicted from the previous document's last token.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats
from vlm.config import IGNORE_INDEX


@dataclass
class TokenizedDocument:
    """One processed sample: ``input_ids`` and ``labels`` (same length) and its tiles in text order."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: Tensor | None = None  # (n_tiles, 3, H, W)
    pixel_attention_mask: Tensor | None = None  # (n_tiles, H, W)
    tiles_per_image: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tiles(self) -> int:
        return sum(self.tiles_per_image)


def image_spans(
    doc: TokenizedDocument, image_token_id: int, placeholder_ids: Sequence[int]
) -> list[tuple[int, int]]:
    """``[start, end)`` of each image's token run: its ``<image>`` tokens, what lies between them and
    the placeholder tokens (``<fake_token_around_image>``, tile tags) directly around them."""
    if not doc.tiles_per_image:
        return []
    placeholders = set(placeholder_ids)
    positions = [i for i, token in enumerate(doc.input_ids) if token == image_token_id]
    per_tile, rest = divmod(len(positions), doc.n_tiles)
    if rest:
        raise ValueError(f"{len(positions)} <image> tokens cannot be split evenly over {doc.n_tiles} tiles.")
    spans, first = [], 0
    for tiles in doc.tiles_per_image:
        start, end = positions[first], positions[first + tiles * per_tile - 1] + 1
        first += tiles * per_tile
        while (
            start > 0
            and doc.input_ids[start - 1] in placeholders
            and doc.input_ids[start - 1] != image_token_id
        ):
            start -= 1
        while end < len(doc) and doc.input_ids[end] in placeholders and doc.input_ids[end] != image_token_id:
            end += 1
        spans.append((start, end))
    return spans


def split_document(
    doc: TokenizedDocument, max_len: int, image_token_id: int, placeholder_ids: Sequence[int]
) -> list[TokenizedDocument] | None:
    """Windows of at most ``max_len`` tokens cut outside image runs; ``None`` if an image run is too long.

    Adjacent images may share a ``<fake_token_around_image>``: their runs overlap, and are kept together.
    """
    spans = image_spans(doc, image_token_id, placeholder_ids)
    inside = [False] * (len(doc) + 1)  # inside[p]: cutting before token p would split an image run
    for start, end in spans:
        for p in range(start + 1, end):
            inside[p] = True
    windows, start = [], 0
    while start < len(doc):
        cut = min(start + max_len, len(doc))
        while cut > start and inside[cut]:
            cut -= 1
        if cut == start:
            return None
        windows.append((start, cut))
        start = cut
    tile_starts = [0]
    for tiles in doc.tiles_per_image:
        tile_starts.append(tile_starts[-1] + tiles)
    result = []
    for start, end in windows:
        images = [i for i, (s, _) in enumerate(spans) if start <= s < end]
        tiles = slice(tile_starts[images[0]], tile_starts[images[-1] + 1]) if images else slice(0, 0)
        result.append(
            TokenizedDocument(
                doc.input_ids[start:end],
                doc.labels[start:end],
                None if doc.pixel_values is None or not images else doc.pixel_values[tiles],
                None if doc.pixel_attention_mask is None or not images else doc.pixel_attention_mask[tiles],
                [doc.tiles_per_image[i] for i in images],
            )
        )
    return result


def pack(
    docs: Sequence[TokenizedDocument], max_seq_len: int, max_tiles: int | None = None
) -> list[list[TokenizedDocument]]:
    """Best-fit decreasing: longest documents first, each into the fullest row it fits (tokens and tiles)."""
    rows: list[list[TokenizedDocument]] = []
    free: list[int] = []
    tiles_free: list[float] = []
    tile_budget = float("inf") if max_tiles is None else max_tiles
    for doc in sorted(docs, key=len, reverse=True):
        if len(doc) > max_seq_len or doc.n_tiles > tile_budget:
            raise ValueError(
                f"A document of {len(doc)} tokens and {doc.n_tiles} tiles exceeds a row "
                f"({max_seq_len} tokens, {max_tiles} tiles): split it first (split_document)."
            )
        fits = [r for r in range(len(rows)) if free[r] >= len(doc) and tiles_free[r] >= doc.n_tiles]
        if fits:
            best = min(fits, key=free.__getitem__)
            rows[best].append(doc)
            free[best] -= len(doc)
            tiles_free[best] -= doc.n_tiles
        else:
            rows.append([doc])
            free.append(max_seq_len - len(doc))
            tiles_free.append(tile_budget - doc.n_tiles)
    return rows


def _stack_tiles(tiles: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenate tiles of possibly different sizes, zero-padded bottom/right to the largest."""
    height = max(t.shape[-2] for t in tiles)
    width = max(t.shape[-1] for t in tiles)
    n = sum(len(t) for t in tiles)
    pixel_values = tiles[0].new_zeros(n, tiles[0].shape[1], height, width)
    mask = masks[0].new_zeros(n, height, width)
    first = 0
    for t, m in zip(tiles, masks):
        pixel_values[first : first + len(t), :, : t.shape[-2], : t.shape[-1]] = t
        mask[first : first + len(t), : m.shape[-2], : m.shape[-1]] = m
        first += len(t)
    return pixel_values, mask


def collate_rows(
    rows: Sequence[Sequence[TokenizedDocument]],
    pad_token_id: int,
    seq_len: int | None = None,
    *,
    padding_free: bool = True,
) -> dict:
    """The batch of packed ``rows`` (padded on the right to ``seq_len``, default the longest row).

    Padding-free (default): ``position_ids``, ``cu_seq_lens_q/k``, ``max_length_q/k`` and ``document_ids``,
    no ``attention_mask``; ``padding_free=False``: the dense-mask baseline (``attention_mask`` and
    ``document_ids``, padding at position 0). See the module docstring.
    """
    length = seq_len or max(sum(map(len, row)) for row in rows)
    too_long = [r for r, row in enumerate(rows) if sum(map(len, row)) > length]
    if too_long:
        raise ValueError(
            f"Rows {too_long} hold more than seq_len={length} tokens: pack with max_seq_len <= seq_len."
        )
    batch = {
        "input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "document_ids": torch.zeros(len(rows), length, dtype=torch.long),
    }
    sequence_lengths: list[int] = []  # every document, then the row's padding, row after row
    tiles, masks, tiles_per_image, tiles_per_sample = [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for d, doc in enumerate(row, start=1):
            end = start + len(doc)
            batch["input_ids"][r, start:end] = torch.tensor(doc.input_ids)
            batch["labels"][r, start:end] = torch.tensor(doc.labels)
            batch["labels"][r, start] = IGNORE_INDEX  # never predicted from the previous document
            batch["position_ids"][r, start:end] = torch.arange(len(doc))
            batch["document_ids"][r, start:end] = d
            if doc.pixel_values is not None:
                tiles.append(doc.pixel_values)
                masks.append(doc.pixel_attention_mask)
            tiles_per_image += doc.tiles_per_image
            sequence_lengths += [len(doc)] if len(doc) else []
            start = end
        if start < length:
            sequence_lengths.append(length - start)
            if padding_free:
                batch["position_ids"][r, start:] = torch.arange(length - start)
        tiles_per_sample.append(sum(doc.n_tiles for doc in row))
    if padding_free:
        cu_seq_lens = torch.zeros(len(sequence_lengths) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.tensor(sequence_lengths).cumsum(0)
        longest = max(sequence_lengths)
        batch.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens.clone())
        batch.update(max_length_q=longest, max_length_k=longest)
    else:
        batch["attention_mask"] = (batch["document_ids"] > 0).long()
    if tiles:
        batch["pixel_values"], batch["pixel_attention_mask"] = _stack_tiles(tiles, masks)
        batch["tiles_per_sample"] = torch.tensor(tiles_per_sample)
        batch["tiles_per_image"] = torch.tensor(tiles_per_image)
    return batch


def packing_efficiency(batch: dict) -> float:
    """Fraction of the batch's token slots that hold a real token (not padding)."""
    return float((batch["document_ids"] > 0).float().mean())


@dataclass
class RowPacker:
    """Samples -> ``TokenizedDocument``s -> packed rows, one window of samples at a time (in the workers).

    ``encode`` turns a ``Sample`` into a ``TokenizedDocument`` (the processor step), or ``None`` for a
    sample it skips (counted in its own stats). Documents longer than the sample's
    ``meta["max_seq_len"]`` (at most ``max_seq_len``) are split; a document with a window over
    ``max_tiles`` is dropped (``too_many_tiles``). A window's documents are packed by best-fit
    decreasing into rows that depend on that window only, so a resume re-reads at most one window.
    """

    encode: Callable[[Sample], TokenizedDocument | None]
    max_seq_len: int
    image_token_id: int
    placeholder_ids: list[int]
    max_tiles: int | None = None
    stats: RecordStats = field(default_factory=RecordStats)

    def documents(self, sample: Sample) -> list[TokenizedDocument]:
        """The row-sized pieces of one sample (none if it is skipped, counted)."""
        doc = self.encode(sample)
        if doc is None:
            return []
        max_len = min(sample.meta.get("max_seq_len") or self.max_seq_len, self.max_seq_len)
        windows = split_document(doc, max_len, self.image_token_id, self.placeholder_ids)
        if windows is None:
            self.stats.skip("too_long_image_span")
            return []
        if self.max_tiles is not None and any(w.n_tiles > self.max_tiles for w in windows):
            self.stats.skip("too_many_tiles")
            return []
        self.stats.ok()
        return windows

    def rows(
        self, samples: Iterable[Sample], rng: random.Random | None = None
    ) -> list[list[TokenizedDocument]]:
        """The packed rows of one window of samples, shuffled by ``rng`` (best-fit sorts them by size)."""
        rows = pack(
            [doc for sample in samples for doc in self.documents(sample)], self.max_seq_len, self.max_tiles
        )
        if rng is not None:
            rng.shuffle(rows)
        return rows
