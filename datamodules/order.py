"""The global sample order: which record comes where, as a pure function of the data and a few integers.

Nothing here depends on the number of devices or dataloader workers: the order is cut into a fixed
number of *canonical partitions* (``partitions``), and only the assignment of partitions to
consumers changes with the layout (``datamodules.streaming``).

- ``SourceOrder``: one source's records, cut into blocks of at most ``block_size`` consecutive records
  of a shard. Pass ``e`` permutes the blocks (seeded by ``(seed, source, e)``); the passes follow each
  other endlessly and block ``J`` of that endless sequence goes to partition ``J % partitions``. Inside
  a block the records come in a seeded permutation too (shard-block shuffle + in-block shuffle). A
  block is one ranged read (tar bytes from the shard index, or the parquet row groups holding it).
- ``SourceCursor``: where a partition stands in one source, ``(block ordinal k, record position t in
  the block's order, samples u already taken from that record)``: a resume opens block ``k``, skips
  ``t`` records without decoding them and drops ``u`` samples.
- ``PartitionMixture``: a partition's sample stream. Draw ``g`` picks its source from a counter-based
  RNG keyed by ``(seed, partition, g)``, so the mixture state is only counters (``MixtureCursor``).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np

from datamodules.index import ShardIndex, checked_index
from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, get_reader, read_shard, shard_names
from datamodules.sources.shard_io import ShardIO


@dataclass(frozen=True)
class Block:
    """Records ``[start, stop)`` of shard number ``shard``; ``damage`` is counted when it is read."""

    shard: int
    start: int
    stop: int
    damage: str | None = None


def _seed_words(*parts: object) -> list[int]:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return list(np.frombuffer(digest, dtype=np.uint32))


class SourceOrder:
    """The endless, partitioned record order of one source (see the module docstring)."""

    def __init__(
        self,
        name: str,
        indexes: Sequence[ShardIndex],
        *,
        seed: int,
        partitions: int,
        block_size: int,
        shuffle: bool = True,
    ) -> None:
        if block_size < 1 or partitions < 1:
            raise ValueError(f"block_size and partitions must be >= 1; got {block_size}, {partitions}.")
        self.name, self.seed, self.partitions, self.shuffle = name, seed, partitions, shuffle
        self.shards = [(index.url, index.format, index.size, index.stamp) for index in indexes]
        self.names = shard_names([index.url for index in indexes])  # in sample keys (read_shard)
        self.records = sum(index.records for index in indexes)
        if self.records == 0:
            urls = [index.url for index in indexes]
            raise ValueError(
                f"Source {name!r} has no readable record in its {len(urls)} shards {urls[:3]}..."
            )
        # (shard, start, stop) per block, as one array: a web-scale source has millions of blocks
        cuts = []
        for number, index in enumerate(indexes):
            starts = np.arange(0, index.records, block_size)
            if index.records == 0 and index.damage:
                starts = np.zeros(1, dtype=np.int64)  # an empty block, read only to count the damage
            stops = np.minimum(starts + block_size, index.records)
            cuts.append(np.stack([np.full_like(starts, number), starts, stops], axis=1))
        self._blocks = np.concatenate(cuts).astype(np.int64)
        self._damage = [(index.records, index.damage) for index in indexes]
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def block_count(self) -> int:
        """Blocks per pass."""
        return len(self._blocks)

    def _permutation(self, pass_number: int) -> np.ndarray:
        if pass_number not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng(_seed_words("blocks", self.seed, self.name, pass_number))
            count = self.block_count
            self._permutations[pass_number] = rng.permutation(count) if self.shuffle else np.arange(count)
        return self._permutations[pass_number]

    def block(self, partition: int, ordinal: int) -> tuple[Block, list[int] | None]:
        """The ``ordinal``-th block of ``partition`` and the order of its records (``None``: shard order)."""
        pass_number, slot = divmod(partition + ordinal * self.partitions, self.block_count)
        number = int(self._permutation(pass_number)[slot])
        shard, start, stop = (int(value) for value in self._blocks[number])
        records, damage = self._damage[shard]
        block = Block(shard, start, stop, damage if stop == records else None)
        size = stop - start
        if not self.shuffle or size < 2:
            return block, None
        return block, random.Random(f"records-{self.seed}-{self.name}-{pass_number}-{number}").sample(
            range(size), size
        )

    def fingerprint(self) -> list[Any]:
        """What fixes this order: shards (URL, size, stamp), block cut, seed and shuffle."""
        return [self.name, self.shards, self.block_count, self.seed, self.shuffle]


SourceCursor = tuple[int, int, int]  # (block ordinal, record position in the block's order, samples taken)


def check_bad_rate(source: str, stats: RecordStats, max_rate: float | None, min_records: int) -> None:
    """Raise when more than ``max_rate`` of the records read were bad (filter drops are not bad records)."""
    bad = sum(n for reason, n in stats.skipped.items() if not reason.startswith("filtered:"))
    total = stats.read + bad
    if max_rate is None or total < min_records or bad / total <= max_rate:
        return
    raise RuntimeError(
        f"Source {source!r}: {bad} of {total} records were bad ({bad / total:.1%}), above "
        f"max_bad_record_rate={max_rate}; skipped by reason: {dict(stats.skipped)} (read {stats.read})."
    )


@dataclass
class SourceStream:
    """One source of a partitioned stream: its order, reader options and the limits it puts in ``meta``."""

    order: SourceOrder
    options: dict[str, Any]
    max_seq_len: int | None = None
    max_image_resolution: int | None = None
    io: ShardIO = dataclasses.field(default_factory=ShardIO)
    max_bad_record_rate: float | None = None
    min_records: int = 100


class PartitionSource:
    """One source's samples for one partition, from a ``SourceCursor`` on (decoding nothing before it)."""

    def __init__(
        self, source: SourceStream, partition: int, cursor: Sequence[int], stats: RecordStats
    ) -> None:
        self.source, self.partition, self.stats = source, partition, stats
        self.reader = get_reader(source.order.name)
        self.ordinal, self.position, self.taken = (int(value) for value in cursor)
        self._samples = None

    @property
    def cursor(self) -> SourceCursor:
        """Where the next sample comes from."""
        return self.ordinal, self.position, self.taken

    def _open(self) -> None:
        block, order = self.source.order.block(self.partition, self.ordinal)
        url, _, size, stamp = self.source.order.shards[block.shard]
        index = checked_index(url, self.source.options.get("format"), size, stamp, self.source.io)
        if block.damage and self.position == 0 and self.taken == 0:
            self.stats.skip(block.damage)
        self._span = index.span(block.start, block.stop, order, self.position, self.source.io)
        name = self.source.order.names[block.shard]
        self._samples = read_shard(self.reader, url, name, self.stats, span=self._span, **self.source.options)
        self._drop = self.taken
        self.taken = 0

    def next(self) -> Sample:
        """The next sample (blocks follow each other endlessly; a source without samples raises)."""
        empty_records = 0
        while True:
            if self._samples is None:
                self._open()
            read, skipped = self.stats.read, self.stats.skipped.total()
            sample = next(self._samples, None)
            if sample is not None and self.stats.read == read:
                self.stats.ok()  # readers may or may not count their own yields
            if self.stats.skipped.total() != skipped:
                check_bad_rate(
                    self.source.order.name,
                    self.stats,
                    self.source.max_bad_record_rate,
                    self.source.min_records,
                )
            if sample is None:
                empty_records += self._span.stop - self._span.start
                if empty_records > self.source.order.records:
                    raise RuntimeError(
                        f"Source {self.source.order.name!r} yields no sample in partition {self.partition}: "
                        f"none of its records is readable ({self.stats.as_dict()})."
                    )
                self.ordinal, self.position, self.taken, self._samples = self.ordinal + 1, 0, 0, None
                continue
            if self._span.position != self.position:
                self.position, self.taken, self._drop = self._span.position, 0, 0
            self.taken += 1
            if self._drop:
                self._drop -= 1
                continue
            return sample


@dataclass
class MixtureCursor:
    """A partition's place in its sample stream: draws made so far and each source's ``SourceCursor``."""

    draws: int
    sources: list[list[int]]

    @classmethod
    def start(cls, n_sources: int) -> MixtureCursor:
        """The beginning of the stream."""
        return cls(0, [[0, 0, 0] for _ in range(n_sources)])

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {"draws": self.draws, "sources": [list(cursor) for cursor in self.sources]}


class PartitionMixture:
    """One partition's endless sample stream: draw ``g`` picks a source with the weights, keyed by
    ``(seed, partition, g)``; each sample's ``meta`` gets its source's ``max_seq_len`` and
    ``max_image_resolution``."""

    def __init__(
        self,
        sources: Sequence[SourceStream],
        weights: Sequence[float],
        partition: int,
        cursor: MixtureCursor,
        stats: Sequence[RecordStats],
        seed: int = 0,
    ) -> None:
        if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"Need {len(sources)} non-negative weights with a positive sum; got {list(weights)}."
            )
        self.sources, self.partition, self.seed = list(sources), partition, seed
        self.bounds = list(accumulate(weights))
        self.draws = cursor.draws
        self.readers = [
            PartitionSource(source, partition, position, source_stats)
            for source, position, source_stats in zip(self.sources, cursor.sources, stats)
        ]

    @property
    def cursor(self) -> MixtureCursor:
        """Where the next draw starts."""
        return MixtureCursor(self.draws, [list(reader.cursor) for reader in self.readers])

    def next(self) -> Sample:
        """The sample of the next draw."""
        u = random.Random(f"draw-{self.seed}-{self.partition}-{self.draws}").random()
        index = min(bisect.bisect_right(self.bounds, u * self.bounds[-1]), len(self.bounds) - 1)
        self.draws += 1
        sample = self.readers[index].next()
        source = self.sources[index]
        limits = {"max_seq_len": source.max_seq_len, "max_image_resolution": source.max_image_resolution}
        return dataclasses.replace(sample, meta={**sample.meta, **limits})
