"""What every reader shares: skip accounting and the reader registry.

A reader is a function ``read(shard: str, stats: RecordStats, *, span=None, **options) ->
Iterator[Sample]`` that streams ONE shard (a local path, an fsspec URL or a ``pipe:`` command) in a
deterministic order, or only the records of ``span`` (``records.RecordSpan``), each ``Sample.key``
naming the record inside its shard. ``read_shard`` prefixes the shard's ``shard_names`` name, so a
key never says where the data sits (encodings are seeded by it). Bad records (corrupt
images, invalid JSON, null rows, missing members...) are skipped with ``stats.skip(reason)``; nothing
else is ever dropped silently (filters count their drops too, under ``filtered:<name>``). A shard that
cannot be opened at all raises ``FileNotFoundError`` with its path. Readers read through the
primitives of ``records`` (tar groups, parquet rows), which open shards with ``ShardIO`` and count
its retries in ``stats``. Readers register themselves with ``@register("name")`` so
``iter_samples(source, urls)`` can find them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from datamodules.sample import Sample

Reader = Callable[..., Iterator[Sample]]
READERS: dict[str, Reader] = {}


_RETRY = "retry:"


class RecordStats:
    """Counts of records read and skipped (by reason), shared by every reader of a stream, and of the
    transient read errors retried while streaming (by reason; retries lose no record, so they are
    never counted as skips)."""

    def __init__(self) -> None:
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()

    def ok(self) -> None:
        """Count one record yielded."""
        self.read += 1

    def skip(self, reason: str) -> None:
        """Count one record dropped, under ``reason`` (e.g. ``"corrupt_image"``, ``"invalid_json"``)."""
        if reason == "read" or reason.startswith(_RETRY):
            raise ValueError(
                f"{reason!r} is reserved in RecordStats.as_dict(); name the skip reason otherwise."
            )
        self.skipped[reason] += 1

    def count_retry(self, reason: str) -> None:
        """Count one retried read (e.g. ``"connection"``, ``"http_503"``): nothing was lost."""
        self.retries[reason] += 1

    def as_dict(self) -> dict[str, int]:
        """``{"read": n, "<skip reason>": n, ..., "retry:<reason>": n, ...}``, e.g. for logging;
        ``RecordStats.from_dict`` turns it back into the same counts."""
        return {"read": self.read, **dict(self.skipped), **{_RETRY + r: n for r, n in self.retries.items()}}

    @classmethod
    def from_dict(cls, counts: dict[str, int]) -> RecordStats:
        """The ``RecordStats`` whose ``as_dict()`` is ``counts`` (e.g. sent back by a dataloader worker)."""
        stats = cls()
        for key, count in counts.items():
            if key == "read":
                stats.read = count
            elif key.startswith(_RETRY):
                stats.retries[key.removeprefix(_RETRY)] = count
            else:
                stats.skipped[key] = count
        return stats

    def merge(self, other: RecordStats) -> None:
        """Add another stream's counts (e.g. from dataloader workers) to these."""
        self.read += other.read
        self.skipped.update(other.skipped)
        self.retries.update(other.retries)


def register(name: str) -> Callable[[Reader], Reader]:
    """Decorator: make ``reader`` available as ``iter_samples(name, ...)``."""

    def add(reader: Reader) -> Reader:
        READERS[name] = reader
        return reader

    return add


def get_reader(source: str) -> Reader:
    """The reader registered under ``source``; a clear error lists the known ones."""
    if source not in READERS:
        raise ValueError(f"Unknown source {source!r}; known sources: {', '.join(sorted(READERS))}.")
    return READERS[source]


def shard_names(shards: Sequence[str]) -> list[str]:
    """Each shard's name relative to the deepest folder holding all of ``shards`` (a lone shard's
    name is its file name).

    Sample keys and the random choices seeded by them use these names, so the same shards give
    the same samples wherever they are stored (another folder, a copy on a web server). The names
    are unique when the shards are. Paths, ``file://``/``https://``... URLs and ``pipe:`` commands
    are all split at ``/``: ``https://host/data/a/0.tar`` next to ``.../data/b/0.tar`` is ``a/0.tar``.
    """
    parts = [shard.rstrip("/").split("/") for shard in shards]
    folders = [part[:-1] for part in parts]
    depth = 0
    while folders and all(len(folder) > depth and folder[depth] == folders[0][depth] for folder in folders):
        depth += 1
    return ["/".join(part[depth:]) for part in parts]


def read_shard(reader: Reader, shard: str, name: str, stats: RecordStats, **options) -> Iterator[Sample]:
    """``reader``'s samples of ``shard``, keyed ``"<name>#<record key>"`` (``name`` from ``shard_names``)."""
    for sample in reader(shard, stats, **options):
        yield dataclasses.replace(sample, key=f"{name}#{sample.key}")
