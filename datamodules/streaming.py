"""Partitioned, packed, exactly and elastically resumable training batches, and their checkpointed loader.

The training stream is ``partitions`` independent row streams (canonical partitions, ``order.py``):
partition ``p`` draws samples from its mixture, packs each window of ``window`` samples into rows
(``RowPacker``) and hands its rows out in order. Optimizer step ``k`` trains on rows
``[k*q, (k+1)*q)`` of every partition, ``q = global batch / partitions`` rows, where the global batch
is ``batch_size x devices x accumulation`` rows. That is the whole contract, and it does not mention
devices or workers: rank ``r`` serves the partitions ``p % world_size == r`` (its ``q x
partitions/world_size = batch_size x accumulation`` rows per step, cut into ``accumulation``
micro-batches), and its dataloader workers share those partitions out. So a run resumed on another
number of devices or workers, with the same global batch and partitions, sees exactly the same
sequence of global batches.

Position: each partition's place is its current window (the mixture cursor where it starts, the
cursor where it ends once read) and the rows of it already trained on (``PartitionPosition``). Every
batch carries the positions it advances to (``PositionedBatch.data_position``); they count only once
the batch is trained on (``ResumableLoader.consumed``, called by
``VLMDataModule.on_before_batch_transfer`` for the batch Lightning is about to use), so batches
prefetched by workers or by Lightning never count. ``state_dict`` gathers the positions of all
ranks' partitions, so the state is the same on every rank and the copy Lightning writes from rank 0
is right for all. A resume seeks: each partition re-reads its current window from its start cursor
(a seek into each source's current block, see ``order.py``) and skips the rows already used; nothing
before that window is read or decoded.

Settings that change the stream (mixture weights, image resolution, row length: training stages and
resolution ramp-up) start a new *segment*: every partition continues from the end of its current
window (the rest of that window is not trained on), never from the beginning of the data. A
checkpoint taken in another segment than the one now configured resumes by that same rule.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.order import MixtureCursor, PartitionMixture, SourceStream
from datamodules.packing import RowPacker, TokenizedDocument
from datamodules.sources.base import RecordStats

Row = list[TokenizedDocument]


@dataclass
class PartitionPosition:
    """A partition's place: its window starts at ``start`` (and ends at ``end`` once it has been read),
    and ``row`` rows of it were trained on."""

    start: MixtureCursor
    end: MixtureCursor | None = None
    row: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        end = None if self.end is None else self.end.as_dict()
        return {"start": self.start.as_dict(), "end": end, "row": self.row}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartitionPosition:
        """Inverse of ``as_dict``."""
        end = None if data["end"] is None else MixtureCursor(**data["end"])
        return cls(MixtureCursor(**data["start"]), end, data["row"])

    def next_segment(self) -> PartitionPosition:
        """Where this partition starts when the stream's settings change: its current window's end if
        any of it was used, else its start."""
        return PartitionPosition(self.end if self.row and self.end is not None else self.start)


@dataclass
class StreamLayout:
    """How the canonical partitions are served: ``world_size`` ranks of ``workers`` dataloader workers,
    ``batch_size`` rows per micro-batch and ``accumulation`` micro-batches per optimizer step."""

    partitions: int
    world_size: int = 1
    rank: int = 0
    workers: int = 0
    batch_size: int = 1
    accumulation: int = 1

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all ranks."""
        return self.batch_size * self.world_size * self.accumulation

    @property
    def rows_per_step(self) -> int:
        """Rows each partition gives per optimizer step."""
        return self.global_batch // self.partitions

    def check(self) -> None:
        """Fail with what to set when this layout cannot serve the partitions exactly."""
        problems = []
        if self.partitions % self.world_size:
            problems.append(f"data.partitions={self.partitions} must be a multiple of the device count")
        if self.global_batch % self.partitions:
            problems.append(
                f"the global batch (data.batch_size {self.batch_size} x {self.world_size} devices x "
                f"trainer.accumulate_grad_batches {self.accumulation} = {self.global_batch} rows) must be a "
                f"multiple of data.partitions={self.partitions}"
            )
        if problems:
            raise ValueError(
                "The data stream cannot be served exactly with this layout: " + "; ".join(problems) + ". "
                "Keep the global batch of the run being resumed (adjust data.batch_size or "
                "trainer.accumulate_grad_batches), or start a new stream with other data.partitions."
            )

    def rank_partitions(self) -> list[int]:
        """The partitions this rank serves."""
        return list(range(self.rank, self.partitions, self.world_size))

    def worker_partitions(self, worker: int) -> list[int]:
        """The partitions dataloader worker ``worker`` of this rank produces."""
        return self.rank_partitions()[worker :: max(self.workers, 1)]


@dataclass
class Piece:
    """What a worker produces per optimizer step: ``rows_per_step`` rows of each of its partitions, the
    positions they lead to, and the worker's record statistics so far."""

    rows: dict[int, list[Row]]
    positions: dict[int, PartitionPosition]
    stats: dict[str, dict[str, int]]


class PartitionRows:
    """The rows of one partition, window after window, from a ``PartitionPosition`` on."""

    def __init__(
        self,
        mixture: Callable[[MixtureCursor], PartitionMixture],
        packer: RowPacker,
        window: int,
        partition: int,
        position: PartitionPosition,
        seed: int,
    ) -> None:
        self.packer, self.window, self.partition, self.seed = packer, window, partition, seed
        self.mixture = mixture(position.start)
        self._read_window()
        if position.end is not None and position.end != self.end:
            raise RuntimeError(
                f"Partition {partition}: re-reading its window gave another end cursor than the checkpoint "
                f"recorded ({self.end} instead of {position.end}); the data changed since it was saved."
            )
        self.row = position.row

    def _read_window(self) -> None:
        self.start = self.mixture.cursor
        samples = [self.mixture.next() for _ in range(self.window)]
        self.end = self.mixture.cursor
        rng = random.Random(f"rows-{self.seed}-{self.partition}-{self.start.draws}")
        self.rows, self.row = self.packer.rows(samples, rng), 0

    @property
    def position(self) -> PartitionPosition:
        """The place after the rows taken so far."""
        if self.row == len(self.rows):
            return PartitionPosition(self.end)
        return PartitionPosition(self.start, self.end, self.row)

    def take(self, n: int) -> list[Row]:
        """The next ``n`` rows."""
        taken = []
        while len(taken) < n:
            if self.row == len(self.rows):
                self._read_window()
                continue
            taken.append(self.rows[self.row])
            self.row += 1
        return taken


class PartitionedStream(IterableDataset):
    """The worker side: the ``Piece`` of every optimizer step for the partitions of this worker.

    ``sources`` (with their weights) make each partition's mixture; ``packer`` encodes and packs.
    The loader sets ``layout`` and ``positions`` before each iteration.
    """

    def __init__(
        self,
        sources: Sequence[SourceStream],
        weights: Sequence[float],
        packer: RowPacker,
        *,
        window: int,
        seed: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError(f"The packing window must hold at least one sample; got {window}.")
        self.sources, self.weights, self.packer = list(sources), list(weights), packer
        self.window, self.seed = window, seed
        self.layout = StreamLayout(1)
        self.positions: dict[int, PartitionPosition] = {}
        self.stats = {source.order.name: RecordStats() for source in self.sources}

    def serve(self, layout: StreamLayout, positions: dict[int, PartitionPosition]) -> None:
        """Serve ``layout`` from ``positions`` at the next iteration (set in the main process)."""
        self.layout, self.positions = layout, positions
        for source in self.sources:
            source.order.partitions = layout.partitions

    def start_position(self) -> PartitionPosition:
        """The position of a partition that has not read anything yet."""
        return PartitionPosition(MixtureCursor.start(len(self.sources)))

    def _mixture(self, partition: int) -> Callable[[MixtureCursor], PartitionMixture]:
        stats = [self.stats[source.order.name] for source in self.sources]
        return lambda cursor: PartitionMixture(
            self.sources, self.weights, partition, cursor, stats, self.seed
        )

    def __iter__(self) -> Iterator[Piece]:
        layout = self.layout
        info = get_worker_info()
        partitions = layout.worker_partitions(0 if info is None else info.id)
        streams = {
            p: PartitionRows(
                self._mixture(p),
                self.packer,
                self.window,
                p,
                self.positions.get(p, self.start_position()),
                self.seed,
            )
            for p in partitions
        }
        while True:
            rows = {p: stream.take(layout.rows_per_step) for p, stream in streams.items()}
            positions = {p: stream.position for p, stream in streams.items()}
            yield Piece(rows, positions, self.record_stats())

    def record_stats(self) -> dict[str, dict[str, int]]:
        """Records read and skipped in this process, by source, plus ``encoding`` and ``packing``."""
        encoding = getattr(self.packer.encode, "stats", None)
        stats = {name: s.as_dict() for name, s in self.stats.items()}
        return {
            **stats,
            **({"encoding": encoding.as_dict()} if encoding else {}),
            "packing": self.packer.stats.as_dict(),
        }

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the sample order (not the segment settings): sources, shards, seeds, window."""
        return {"sources": [source.order.fingerprint() for source in self.sources], "seed": self.seed}


@dataclass
class DataPosition:
    """The stream position a micro-batch leads to: ``micro`` of ``micros`` micro-batches of the step
    that starts at ``before`` and ends at ``after`` (this rank's partitions)."""

    before: dict[int, PartitionPosition]
    after: dict[int, PartitionPosition]
    micro: int
    micros: int


class PositionedBatch(dict):
    """A collated batch (the usual keys, so ``model(**batch)`` works) that also carries the
    ``DataPosition`` it leads to, as an attribute rather than a key."""

    data_position: DataPosition | None = None


def _as_is(item: Any) -> Any:
    return item


@dataclass
class ResumableLoader:
    """The main-process side: steps assembled from the workers' pieces, cut into micro-batches, with
    a ``state_dict`` that is the exact, elastic data position (see the module docstring).

    Lightning saves and restores it with the checkpoint (any train loader with ``state_dict`` and
    ``load_state_dict``). Each iteration starts its own workers at the current position (a worker's
    copy of the stream cannot see positions or settings changed in this process), so
    ``persistent_workers`` is accepted and has no effect on which batches come.
    """

    dataset: PartitionedStream
    layout: StreamLayout
    collate_fn: Callable[[list[Row]], dict[str, Any]]
    num_workers: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    dataloader_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layout.workers = self.num_workers
        self.positions = {p: self.dataset.start_position() for p in range(self.layout.partitions)}
        self.micro = 0
        self.segment_start = dict(self.positions)
        self._positions_key = _settings_key(self.settings)  # the settings the positions belong to
        self._worker_stats: dict[int, dict[str, dict[str, int]]] = {}

    def update_settings(self, **settings: Any) -> None:
        """Change the stream's settings (a new segment starts at the next iteration)."""
        self.settings.update(settings)

    def _start_segment_if_changed(self) -> None:
        if _settings_key(self.settings) == self._positions_key:
            return
        if self.micro:
            raise RuntimeError("The data settings changed in the middle of an optimizer step.")
        self.positions = {p: position.next_segment() for p, position in self.positions.items()}
        self.segment_start = dict(self.positions)
        self._positions_key = _settings_key(self.settings)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.layout.check()
        self._start_segment_if_changed()
        own = self.layout.rank_partitions()
        self.dataset.serve(self.layout, {p: self.positions[p] for p in own})
        options = dict(self.dataloader_options)
        if not self.num_workers:
            options.pop("persistent_workers", None)
        pieces = iter(
            DataLoader(
                self.dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers, **options
            )
        )
        workers, batch, micros = max(self.num_workers, 1), self.layout.batch_size, self.layout.accumulation
        skip, before = self.micro, {p: self.positions[p] for p in own}
        while True:
            step_pieces = [next(pieces) for _ in range(workers)]
            after = {p: pos for piece in step_pieces for p, pos in piece.positions.items()}
            rows_by_partition = {p: rows for piece in step_pieces for p, rows in piece.rows.items()}
            rows = [row for p in sorted(rows_by_partition) for row in rows_by_partition[p]]
            for worker, piece in enumerate(step_pieces):
                self._worker_stats[worker] = piece.stats
            for micro in range(skip, micros):
                out = PositionedBatch(self.collate_fn(rows[micro * batch : (micro + 1) * batch]))
                out.data_position = DataPosition(before, after, micro, micros)
                yield out
            skip, before = 0, after

    def consumed(self, batch: dict[str, Any]) -> None:
        """Record that ``batch`` (one of this loader's) is being trained on."""
        position: DataPosition | None = getattr(batch, "data_position", None)
        if position is None:
            return
        done = position.micro + 1 == position.micros
        self.positions.update(position.after if done else position.before)
        self.micro = 0 if done else position.micro + 1

    def record_stats(self) -> dict[str, RecordStats]:
        """Records read and skipped by source, summed over this rank's workers (latest piece of each)."""
        total: dict[str, RecordStats] = {}
        for per_source in self._worker_stats.values():
            for source, counts in per_source.items():
                total.setdefault(source, RecordStats()).merge(RecordStats.from_dict(counts))
        return total

    def state_dict(self) -> dict[str, Any]:
        """The position of every partition (gathered over ranks: the same on each), and what it belongs to."""
        return {
            "version": 2,
            "partitions": self.layout.partitions,
            "global_batch": self.layout.global_batch,
            "positions": self._gathered(self.positions),
            "micro": self.micro,
            "layout": [self.layout.world_size, self.layout.batch_size, self.layout.accumulation],
            "settings": self._positions_key,
            "segment_start": self._gathered(self.segment_start),
            "fingerprint": self.dataset.fingerprint(),
        }

    def _gathered(self, positions: dict[int, PartitionPosition]) -> dict[str, Any]:
        """``positions`` of each rank's own partitions, from every rank (only the rank serving a
        partition knows where it stands)."""
        own = {str(p): positions[p].as_dict() for p in self.layout.rank_partitions()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
            own = {p: position for rank_positions in gathered for p, position in rank_positions.items()}
        return own

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's position, on this layout (elastic; ``StreamLayout.check``)."""
        if state.get("version") != 2:
            raise ValueError(
                "This checkpoint holds a data position of an older format (a replayed per-worker count) "
                "that cannot be converted; resume without it (a new data stream) or with the version "
                "that wrote it."
            )
        saved = state["fingerprint"]
        if saved != self.dataset.fingerprint():
            raise ValueError(_fingerprint_difference(saved, self.dataset.fingerprint()))
        self.layout.partitions = state["partitions"]
        if self.layout.global_batch != state["global_batch"]:
            raise ValueError(
                f"The checkpoint's data stream trains {state['global_batch']} rows per optimizer step; "
                f"this run would train {self.layout.global_batch} (data.batch_size x devices x "
                "trainer.accumulate_grad_batches). Keep the global batch to resume the stream exactly."
            )
        self.layout.check()
        layout = [self.layout.world_size, self.layout.batch_size, self.layout.accumulation]
        if state["micro"] and state["layout"] != layout:
            raise ValueError(
                "The checkpoint was taken in the middle of an optimizer step; it resumes only on the layout "
                f"(devices, batch_size, accumulation) = {state['layout']} that saved it."
            )
        self.positions = {int(p): PartitionPosition.from_dict(pos) for p, pos in state["positions"].items()}
        self.segment_start = {
            int(p): PartitionPosition.from_dict(pos) for p, pos in state["segment_start"].items()
        }
        self.micro = state["micro"]
        self._positions_key = state["settings"]


def _settings_key(settings: dict[str, Any]) -> str:
    return repr(sorted(settings.items()))


def _fingerprint_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """An error message that names what changed between the saved and the current data order."""
    changed = []
    for old, new in zip(saved["sources"], now["sources"]):
        if old[0] != new[0]:
            continue
        old_shards, new_shards = {s[0]: s for s in old[1]}, {s[0]: s for s in new[1]}
        changed += [url for url in old_shards if url in new_shards and old_shards[url] != new_shards[url]]
    if changed:
        return (
            f"Shard(s) changed since the checkpoint was saved (size/stamp differ): {changed[:5]}. Their "
            "record positions are no longer valid: restore them, or start a new data stream."
        )
    return (
        "The checkpoint's data stream has other sources, shards, seed or shuffle settings than this "
        f"configuration (saved {saved!r:.300}, now {now!r:.300}); resume with the same data settings."
    )
