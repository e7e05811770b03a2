"""Sharded, shuffled, exactly-resumable streaming of one source, and the DataLoader that checkpoints it.

Work split: every (rank, dataloader worker) pair is one *consumer*; there are ``world_size x
num_workers`` of them. Each epoch the shard list is shuffled with ``(seed, epoch)`` (the same order
on every consumer). With at least as many shards as consumers, consumer ``c`` reads shards
``c, c + n, c + 2n, ...`` of that order. With fewer shards, consumer ``c`` shares shard ``c %
n_shards`` with the other consumers mapped to it and takes every k-th sample of it (sample-level
round robin, k = number of sharers): the shard is read k times but each sample is yielded once.
Either way every sample is yielded exactly once per epoch. A seeded shuffle buffer then mixes
samples, deterministically given ``(seed, epoch, rank, worker)``.

Resume: everything a consumer yields is a pure function of ``(config, epoch, rank, worker)``, so a
position is just the number of items each worker has delivered. ``ResumableLoader`` counts the
batches it got from each worker and puts them (and the epoch) in its ``state_dict``, which
Lightning stores in the checkpoint (``fit_loop`` saves the state of every loader with
``state_dict``/``load_state_dict``). On resume each worker re-reads deterministically and discards
what was already delivered, so the restarted run yields exactly the items it would have yielded.
Fast-forwarding costs re-reading (not re-processing images if the reader is lazy); it is exact for
any deterministic pipeline built on ``ResumableStream`` (mixture, packing), which is why position
is tracked at the loader's output rather than inside each stage. It needs the same world size,
``num_workers`` and batch size on resume; ``persistent_workers`` is not supported.

Bad records: each reader counts its skips in the stream's ``RecordStats``; past
``max_bad_record_rate`` (after ``min_records`` records on that consumer) the stream raises a
``RuntimeError`` naming the source, the counts by reason and the threshold. Batches carry the
worker's latest counts to the main process: ``ResumableLoader.record_stats()`` aggregates them.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from datamodules.sample import Sample
from datamodules.sources import expand_urls
from datamodules.sources.base import RecordStats, get_reader


def consumer_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` of the calling process.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised, else 0 / 1.
    """
    if world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialised else 1
        rank = dist.get_rank() if initialised else 0
    if rank is None or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) when world_size is given; got {rank}.")
    info = get_worker_info()
    return rank, world_size, 0 if info is None else info.id, 1 if info is None else info.num_workers


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Yield ``items`` in a shuffled order using a buffer of ``size`` (0 or 1 = unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class ResumableStream(IterableDataset):
    """Base of the streams ``ResumableLoader`` can checkpoint: deterministic per (epoch, consumer).

    Subclasses implement ``iter_epoch``. ``__iter__`` runs the current epoch and discards the items
    this worker already delivered before a resume (``resume_from``).
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip: dict[int, int] = {}
        self._rotation = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffles change with it)."""
        self.epoch = epoch

    def resume_from(self, items_per_worker: dict[int, int], rotation: int = 0) -> None:
        """Make the next ``__iter__`` skip that many items on each (logical) worker, and let
        dataloader worker ``w`` play logical worker ``(w + rotation) % num_workers`` (set by
        ``ResumableLoader`` so that the DataLoader's round robin resumes at the right worker)."""
        self._skip, self._rotation = dict(items_per_worker), rotation

    def slot(self) -> tuple[int, int, int, int]:
        """``(rank, world_size, logical worker, num_workers)`` of the calling process."""
        rank, world_size, worker, num_workers = consumer_slot(self.rank, self.world_size)
        return rank, world_size, (worker + self._rotation) % num_workers, num_workers

    def __iter__(self) -> Iterator[Any]:
        worker = self.slot()[2]
        return islice(self.iter_epoch(self.epoch), self._skip.get(worker, 0), None)

    def iter_epoch(self, epoch: int) -> Iterator[Any]:
        raise NotImplementedError

    def record_stats(self) -> dict[str, RecordStats]:
        """Records read and skipped so far in this process, by source."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What determines the item order; a checkpoint made with another fingerprint is not resumed."""
        raise NotImplementedError


class ShardedSampleStream(ResumableStream):
    """The ``Sample``s of one source's shards, split across ranks and workers, shuffled, resumable.

    ``options`` go to the reader. ``shuffle_buffer`` = 0 keeps the reading order (after the shard
    shuffle, itself off with ``shuffle_shards=False``).
    """

    def __init__(
        self,
        source: str,
        urls: str | Sequence[str],
        options: dict[str, Any] | None = None,
        *,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_bad_record_rate: float | None = None,
        min_records: int = 100,
    ) -> None:
        super().__init__(rank, world_size)
        self.source, self.options, self.seed = source, dict(options or {}), seed
        self.reader = get_reader(source)
        self.shards = expand_urls(urls)
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.max_bad_record_rate, self.min_records = max_bad_record_rate, min_records
        self.stats = RecordStats()

    def iter_epoch(self, epoch: int, repeat: int = 0) -> Iterator[Sample]:
        """This consumer's samples of ``epoch`` (``repeat`` > 0: another pass, e.g. in a mixture)."""
        rank, world_size, worker, num_workers = self.slot()
        consumers, consumer = world_size * num_workers, rank * num_workers + worker
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"shards-{self.seed}-{epoch}-{repeat}").shuffle(order)
        if len(order) >= consumers:
            samples = self._read(order[consumer::consumers], self.stats)
        else:
            sharers = len(range(consumer % len(order), consumers, len(order)))
            # Only the first sharer counts the shard's skips: each bad record is counted once.
            stats = self.stats if consumer < len(order) else RecordStats()
            samples = islice(
                self._read([order[consumer % len(order)]], stats), consumer // len(order), None, sharers
            )
        rng = random.Random(f"buffer-{self.seed}-{epoch}-{repeat}-{rank}-{worker}")
        return shuffle_buffer(samples, self.shuffle_buffer, rng)

    def _read(self, shards: list[str], stats: RecordStats) -> Iterator[Sample]:
        for shard in shards:
            records = self.reader(shard, stats, **self.options)
            while True:
                read_before, skipped_before = stats.read, stats.skipped.total()
                sample = next(records, None)
                if sample is not None and stats.read == read_before:
                    stats.ok()  # readers may or may not count their own yields
                if stats.skipped.total() != skipped_before:
                    self._check_bad_rate(stats)
                if sample is None:
                    break
                yield sample

    def _check_bad_rate(self, stats: RecordStats) -> None:
        # Drops by the configured filters (``filtered:<name>``) are wanted, not bad records.
        bad = sum(n for reason, n in stats.skipped.items() if not reason.startswith("filtered:"))
        total = stats.read + bad
        if self.max_bad_record_rate is None or total < self.min_records:
            return
        if bad / total > self.max_bad_record_rate:
            raise RuntimeError(
                f"Source {self.source!r}: {bad} of {total} records were bad ({bad / total:.1%}), "
                f"above max_bad_record_rate={self.max_bad_record_rate}; skipped by reason: "
                f"{dict(stats.skipped)} (read {stats.read})."
            )

    def record_stats(self) -> dict[str, RecordStats]:
        return {self.source: self.stats}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shards": self.shards,
            "options": repr(sorted(self.options.items())),
            "seed": self.seed,
            "shuffle": [self.shuffle_shards, self.shuffle_buffer],
        }


class _TaggedCollate:
    """Runs in the worker: collate and tag the batch with its worker id and the worker's record stats."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> tuple[int, dict[str, dict[str, int]] | None, Any]:
        info = get_worker_info()
        if info is None:
            return 0, None, self.collate_fn(items)
        stats = {source: s.as_dict() for source, s in info.dataset.record_stats().items()}
        return info.id, stats, self.collate_fn(items)


def _as_record_stats(counts: dict[str, int]) -> RecordStats:
    stats = RecordStats()
    stats.read = counts.get("read", 0)
    stats.skipped = Counter({reason: n for reason, n in counts.items() if reason != "read"})
    return stats


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableStream`` whose ``state_dict`` is the exact data position.

    Lightning saves/restores it with the checkpoint (any loader with ``state_dict`` and
    ``load_state_dict``). The loader counts epochs itself (one per full pass). ``prefetched`` is how
    many batches the consumer fetches ahead of using them: Lightning's training loop prefetches 1,
    which must not count as consumed when it checkpoints. Under torch.distributed the state holds
    every rank's position (gathered in ``state_dict``, which every rank calls when checkpointing).
    """

    def __init__(
        self,
        dataset: ResumableStream,
        batch_size: int | None = 1,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        prefetched: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "ResumableLoader cannot resume persistent workers; leave persistent_workers off."
            )
        super().__init__(
            dataset, batch_size=batch_size, collate_fn=_TaggedCollate(collate_fn or default_collate), **kwargs
        )
        self.prefetched = prefetched
        self._delivered: Counter[int] = Counter()
        self._in_flight: deque[int] = deque()
        self._worker_stats: dict[int, dict[str, dict[str, int]]] = {}

    def __iter__(self) -> Iterator[Any]:
        dataset: ResumableStream = self.dataset
        items_per_batch = self.batch_size or 1
        workers = max(self.num_workers, 1)
        # the DataLoader polls workers round robin from worker 0: make it the one that is next
        rotation = min(range(workers), key=lambda w: (self._delivered[w], w))
        dataset.resume_from({w: n * items_per_batch for w, n in self._delivered.items()}, rotation)
        for physical, stats, batch in super().__iter__():
            worker = (physical + rotation) % workers
            self._delivered[worker] += 1
            self._in_flight.append(worker)
            while len(self._in_flight) > self.prefetched:
                self._in_flight.popleft()
            self._worker_stats[worker] = stats or {s: r.as_dict() for s, r in dataset.record_stats().items()}
            yield batch
        dataset.set_epoch(dataset.epoch + 1)
        self._delivered.clear()
        self._in_flight.clear()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.dataset.set_epoch(epoch)
        self._delivered.clear()

    def record_stats(self) -> dict[str, RecordStats]:
        """Records read and skipped by source, summed over this rank's workers (latest batch of each)."""
        total: dict[str, RecordStats] = {}
        for per_source in self._worker_stats.values():
            for source, counts in per_source.items():
                total.setdefault(source, RecordStats()).merge(_as_record_stats(counts))
        return total

    def state_dict(self) -> dict[str, Any]:
        dataset: ResumableStream = self.dataset
        rank, world_size = dataset.slot()[:2]
        consumed = self._delivered - Counter(self._in_flight)
        position = {str(worker): n for worker, n in consumed.items()}
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, position)
            positions = {str(r): p for r, p in enumerate(gathered)}
        else:
            positions = {str(rank): position}
        return {
            "epoch": dataset.epoch,
            "positions": positions,
            "layout": [world_size, self.num_workers, self.batch_size],
            "fingerprint": dataset.fingerprint(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        dataset: ResumableStream = self.dataset
        if state_dict["fingerprint"] != dataset.fingerprint():
            return  # another data configuration (e.g. the next training stage): start it from scratch
        rank, world_size = dataset.slot()[:2]
        layout = [world_size, self.num_workers, self.batch_size]
        if state_dict["layout"] != layout or str(rank) not in state_dict["positions"]:
            raise ValueError(
                "Exact data resume needs the same (world_size, num_workers, batch_size) as the checkpoint "
                f"and this rank's position: saved {state_dict['layout']} for ranks "
                f"{sorted(state_dict['positions'])}, now {layout} on rank {rank}."
            )
        dataset.set_epoch(state_dict["epoch"])
        self._delivered = Counter({int(w): n for w, n in state_dict["positions"][str(rank)].items()})
        self._in_flight.clear()
