"""Decoding helpers every reader shares: webdataset-style tar grouping, JSON, text, images.

Each raises ``BadRecord(reason)`` on bad data so a reader can skip the record and count the
reason in its ``RecordStats``; shard-level damage (unreadable or truncated tar) is counted here.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal, TypeVar

import pyarrow.parquet as pq
from PIL import Image

from datamodules.sources.base import RecordStats
from datamodules.sources.shard_io import DEFAULT_SHARD_IO, ShardIO
from vlm.processing.image import load_image

_WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
T = TypeVar("T")


class BadRecord(Exception):
    """Raised while building a record to skip it; ``reason`` is what ``RecordStats`` counts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes with ``load_image``; unreadable data raises ``BadRecord("corrupt_image")``."""
    try:
        return load_image(data)
    except ValueError as error:
        raise BadRecord("corrupt_image") from error


@dataclass
class RecordSpan:
    """Which records of a shard a reader yields, for seeking instead of reading from the start.

    Records ``[start, stop)`` (tar groups or parquet rows, in shard order) are read together (one
    ranged read: tar bytes ``[byte_start, byte_end)`` from the shard index, or the parquet row groups
    that hold them), then handed out in ``order`` (a permutation of ``range(stop - start)``; ``None``
    keeps shard order) from position ``skip`` on. ``position`` is the place in that order of the
    record the reader is working on, so a caller can tell which record each sample came from.
    ``compressed`` tars cannot seek: the shard is re-read from its start and records before
    ``byte_start`` are passed over without being decoded.
    """

    start: int
    stop: int
    byte_start: int = 0
    byte_end: int | None = None
    compressed: bool = False
    order: Sequence[int] | None = None
    skip: int = 0
    io: ShardIO = field(default_factory=ShardIO)
    position: int = -1

    def emit(self, shard: str, records: list[T]) -> Iterator[T]:
        """``records`` (those of ``[start, stop)`` in shard order) in this span's order, from ``skip``."""
        if len(records) != self.stop - self.start:
            raise RuntimeError(
                f"{shard}: expected records [{self.start}, {self.stop}) from the shard index but read "
                f"{len(records)}; the shard changed after it was indexed. Rebuild its index "
                "(python -m datamodules.index --rebuild ...)."
            )
        order = range(len(records)) if self.order is None else self.order
        for position in range(self.skip, len(records)):
            self.position = position
            yield records[order[position]]


def webdataset_key(name: str) -> tuple[str, str] | None:
    """``(key, lower-cased suffix)`` of a tar member name by webdataset's rule, ``None`` without a suffix."""
    match = _WEBDATASET_KEY.match(name.removeprefix("./"))
    return None if match is None else (match[1], match[2].lower())


def _tar_groups(
    members: Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]], stats: RecordStats
) -> Iterator[tuple[str, dict[str, bytes], bool]]:
    """``(key, {suffix: bytes}, duplicate)`` per webdataset record of a stream of tar members."""
    key, group, duplicate = None, {}, False
    for archive, info in members:
        parts = webdataset_key(info.name)
        if parts is None:
            stats.skip("unknown_schema")
            continue
        if parts[0] != key:
            if key is not None:
                yield key, group, duplicate
            key, group, duplicate = parts[0], {}, False
        suffix = parts[1]
        duplicate = duplicate or suffix in group
        group[suffix] = archive.extractfile(info).read()
    if key is not None:
        yield key, group, duplicate


def _regular_members(
    archive: tarfile.TarFile, first: int = 0, end: int | None = None
) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The regular files of ``archive`` whose headers start in ``[first, end)``."""
    for info in archive:
        if end is not None and info.offset >= end:
            return
        if info.isreg() and info.offset >= first:
            yield archive, info


def iter_tar_groups(
    shard: str, stats: RecordStats, span: RecordSpan | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The records of a (possibly compressed) tar shard as ``(key, {suffix: bytes})``, in tar order, or
    the records of ``span`` in its order.

    Follows webdataset: a leading ``./`` is dropped, the key ends at the first dot of the basename,
    suffixes are lower-cased, directories are skipped. A record whose suffix repeats is skipped as
    ``duplicate_member``; a member without a suffix as ``unknown_schema``. A tar that cannot be read
    from the start counts as ``corrupt_tar``; damage later counts once as ``truncated_tar`` and ends
    the shard (the incomplete record is lost). A tar cut exactly between two members cannot be told
    from a complete one; its last record then usually fails its reader's missing-member check.
    """
    if span is None:
        groups = _read_tar(shard, stats, DEFAULT_SHARD_IO, 0, None, compressed=True)
    else:
        read = _read_tar(shard, stats, span.io, span.byte_start, span.byte_end, span.compressed)
        groups = span.emit(shard, list(read))
    for key, members, duplicate in groups:
        if duplicate:
            stats.skip("duplicate_member")
        else:
            yield key, members


def _read_tar(
    shard: str, stats: RecordStats, io: ShardIO, byte_start: int, byte_end: int | None, compressed: bool
) -> Iterator[tuple[str, dict[str, bytes], bool]]:
    """Groups of the tar records whose headers lie in ``[byte_start, byte_end)``: a ranged read of an
    uncompressed tar, or the whole (compressed) stream with the records outside passed over."""
    ranged = not compressed
    started = False
    try:
        stream = io.open(shard, byte_start, byte_end, stats) if ranged else io.open(shard, stats=stats)
        with stream, tarfile.open(fileobj=stream, mode="r|" if ranged else "r|*") as archive:
            started = True
            first, end = (0, None) if ranged else (byte_start, byte_end)
            yield from _tar_groups(_regular_members(archive, first, end), stats)
    except (tarfile.TarError, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        stats.skip("truncated_tar" if started else "corrupt_tar")


@contextmanager
def open_parquet(
    shard: str, span: RecordSpan | None = None, stats: RecordStats | None = None
) -> Iterator[pq.ParquetFile]:
    """A ``pyarrow`` ``ParquetFile`` over the shard (only the footer and the row groups read are
    fetched); read retries are counted in ``stats``."""
    with (span.io if span is not None else DEFAULT_SHARD_IO).open(shard, stats=stats) as stream:
        yield pq.ParquetFile(stream)


def parquet_rows(
    file: pq.ParquetFile, shard: str, span: RecordSpan | None = None, columns: Sequence[str] | None = None
) -> Iterator[tuple[int, dict]]:
    """``(row index in the shard, row)`` of every row, one row group in memory at a time, or of the
    rows of ``span`` in its order (only the row groups that hold them are read)."""
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
    bounds = [0, *accumulate(sizes)]
    if span is None:
        for group, first in enumerate(bounds[:-1]):
            yield from enumerate(file.read_row_group(group, columns=columns).to_pylist(), start=first)
        return
    groups = [g for g in range(len(sizes)) if bounds[g] < span.stop and bounds[g + 1] > span.start]
    rows: list[dict] = []
    for group in groups:
        rows += file.read_row_group(group, columns=columns).to_pylist()
    offset = span.start - (bounds[groups[0]] if groups else span.start)
    selected = rows[offset : offset + span.stop - span.start]
    yield from span.emit(shard, list(enumerate(selected, start=span.start)))


def shard_format(shard: str, format: str | None) -> Literal["tar", "parquet"]:
    """``format`` if given, else ``"parquet"`` or ``"tar"`` from the shard's extension (``.tar.gz`` too)."""
    format = format or (
        "parquet" if shard.endswith(".parquet") else "tar" if re.search(r"\.tar(\.\w+)?$", shard) else None
    )
    if format not in ("tar", "parquet"):
        raise ValueError(
            f"{shard}: cannot tell the format from the extension; pass format='tar' or 'parquet'."
        )
    return format


def parse_json(data: bytes | str | None, default: object = None) -> object:
    """The JSON value of ``data`` (``default`` for ``None``); bad JSON raises ``BadRecord("invalid_json")``"""
    if data is None:
        return default
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRecord("invalid_json") from error


def decode_text(data: bytes) -> str:
    """UTF-8 text of a tar member; undecodable bytes raise ``BadRecord("corrupt_text")``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord("corrupt_text") from error
