"""What every reader shares: skip accounting, shard opening, and the reader registry.

A reader is a function ``read(shard: str, stats: RecordStats, **options) -> Iterator[Sample]`` that
streams ONE shard (a local path or a URL) in a deterministic order. Bad records (corrupt images,
invalid JSON, null rows, missing members...) are skipped with ``stats.skip(reason)``; nothing else
is ever dropped silently (filters count their drops too, under ``filtered:<name>``). A shard that
cannot be opened at all raises ``FileNotFoundError`` with its path. Readers register themselves
with ``@register("name")`` so ``iter_samples(source, urls)`` can find them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO

import fsspec

from datamodules.sample import Sample

Reader = Callable[..., Iterator[Sample]]
READERS: dict[str, Reader] = {}


class RecordStats:
    """Counts of records read and skipped (by reason), shared by every reader of a stream."""

    def __init__(self) -> None:
        self.read = 0
        self.skipped: Counter[str] = Counter()

    def ok(self) -> None:
        """Count one record yielded."""
        self.read += 1

    def skip(self, reason: str) -> None:
        """Count one record dropped, under ``reason`` (e.g. ``"corrupt_image"``, ``"invalid_json"``)."""
        self.skipped[reason] += 1

    def as_dict(self) -> dict[str, int]:
        """``{"read": n, "<reason>": n, ...}``, e.g. for logging."""
        return {"read": self.read, **dict(self.skipped)}

    @classmethod
    def from_dict(cls, counts: dict[str, int]) -> RecordStats:
        """Inverse of ``as_dict`` (e.g. counts sent from a dataloader worker)."""
        stats = cls()
        stats.read = counts.get("read", 0)
        stats.skipped = Counter({reason: n for reason, n in counts.items() if reason != "read"})
        return stats

    def merge(self, other: RecordStats) -> None:
        """Add another stream's counts (e.g. from dataloader workers) to these."""
        self.read += other.read
        self.skipped.update(other.skipped)


def register(name: str) -> Callable[[Reader], Reader]:
    """Decorator: make ``reader`` available as ``iter_samples(name, ...)``."""

    def add(reader: Reader) -> Reader:
        READERS[name] = reader
        return reader

    return add


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for binary reading: local path, ``file://``, or any fsspec URL (``https://``, ``s3://``).

    Raises ``FileNotFoundError`` naming the shard when it does not exist.
    """
    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Shard not found: {url}") from error


def read_bytes(url: str) -> bytes:
    """The whole content of a (small) shard or side file."""
    with open_shard(url) as stream:
        return stream.read()


def get_reader(source: str) -> Reader:
    """The reader registered under ``source``; a clear error lists the known ones."""
    if source not in READERS:
        raise ValueError(f"Unknown source {source!r}; known sources: {', '.join(sorted(READERS))}.")
    return READERS[source]
