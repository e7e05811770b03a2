"""Weighted mixture of source streams, each with its own sequence length and image resolution.

``MixtureStream`` draws the source of each next sample with the (normalised) weights, using an RNG
seeded by ``(seed, epoch, rank, worker)``; a source that runs out starts another pass over its
shards (reshuffled), so the mixture is endless and train length is set in steps. Each sample's
``meta`` gets ``max_seq_len`` and ``max_image_resolution`` (longest edge, pixels) of its source, for
the processor and the packer to apply. Resume is exact through ``ResumableLoader`` (replaying the
same draws); ``set_weights`` starts a new stage: a checkpoint of the previous stage, whose
fingerprint differs, restarts the data of the new one from its beginning.

The Idefics2 pretraining stages (Idefics2 paper, section 4.1: "Multi-stage pre-training"), in the
YAML schema of ``MixtureConfig`` (``configs/data/idefics2_stage{1,2}.yaml``)::

    # stage 1: max image resolution 384, global batch 2048
    sources:
      - {source: obelics, urls: ..., weight: 0.70, max_seq_len: 2048, max_image_resolution: 384}
      - {source: laion_coco, urls: ..., weight: 0.30, max_seq_len: 1536, max_image_resolution: 384}
    # stage 2: PDF documents added, max image resolution 980
    sources:
      - {source: obelics, urls: ..., weight: 0.45, max_seq_len: 2048, max_image_resolution: 980}
      - {source: laion_coco, urls: ..., weight: 0.35, max_seq_len: 1536, max_image_resolution: 980}
      - {source: pdfa, urls: ..., weight: 0.20, max_seq_len: 1024, max_image_resolution: 980}
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats
from datamodules.streaming import ResumableStream, ShardedSampleStream


@dataclass
class SourceConfig:
    """One source of a mixture (one YAML list item)."""

    source: str
    urls: str | list[str]
    weight: float
    max_seq_len: int
    max_image_resolution: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MixtureConfig:
    """A data mixture: its sources and the streaming settings they share."""

    sources: list[SourceConfig]
    seed: int = 0
    shuffle_buffer: int = 1000
    max_bad_record_rate: float | None = 0.05

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]

    def build(self, rank: int | None = None, world_size: int | None = None) -> MixtureStream:
        """The ``MixtureStream`` of these sources (each a ``ShardedSampleStream``)."""
        streams = [
            ShardedSampleStream(
                s.source,
                s.urls,
                s.options,
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer,
                rank=rank,
                world_size=world_size,
                max_bad_record_rate=self.max_bad_record_rate,
            )
            for s in self.sources
        ]
        return MixtureStream(
            streams,
            [s.weight for s in self.sources],
            max_seq_lens=[s.max_seq_len for s in self.sources],
            max_image_resolutions=[s.max_image_resolution for s in self.sources],
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )


class MixtureStream(ResumableStream):
    """Samples drawn from ``streams`` with probabilities ``weights`` (normalised), endlessly."""

    def __init__(
        self,
        streams: Sequence[ShardedSampleStream],
        weights: Sequence[float],
        *,
        max_seq_lens: Sequence[int | None] | None = None,
        max_image_resolutions: Sequence[int | None] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(rank, world_size)
        self.streams, self.seed = list(streams), seed
        self.max_seq_lens = list(max_seq_lens or [None] * len(self.streams))
        self.max_image_resolutions = list(max_image_resolutions or [None] * len(self.streams))
        if not len(self.streams) == len(self.max_seq_lens) == len(self.max_image_resolutions):
            raise ValueError("Give one max_seq_len and one max_image_resolution per stream.")
        self.set_weights(weights)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Change the source weights (e.g. for the next training stage); they are normalised."""
        if len(weights) != len(self.streams) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"Need {len(self.streams)} non-negative weights with a positive sum; got {list(weights)}."
            )
        self.weights = [w / sum(weights) for w in weights]

    def resume_from(self, items_per_worker: dict[int, int], rotation: int = 0) -> None:
        super().resume_from(items_per_worker, rotation)
        for stream in self.streams:
            stream.resume_from({}, rotation)

    def iter_epoch(self, epoch: int) -> Iterator[Sample]:
        rank, _, worker, _ = self.slot()
        rng = random.Random(f"mixture-{self.seed}-{epoch}-{rank}-{worker}")
        bounds = list(accumulate(self.weights))
        passes = [0] * len(self.streams)
        iterators = [stream.iter_epoch(epoch) for stream in self.streams]
        while True:
            index = min(bisect.bisect_right(bounds, rng.random() * bounds[-1]), len(bounds) - 1)
            sample = next(iterators[index], None)
            if sample is None:  # this source is exhausted: start its next pass
                passes[index] += 1
                iterators[index] = self.streams[index].iter_epoch(epoch, passes[index])
                sample = next(iterators[index], None)
                if sample is None:
                    raise RuntimeError(
                        f"Source {self.streams[index].source!r} yields no sample on rank {rank}, worker "
                        f"{worker}: it has no readable record in its shards {self.streams[index].shards}."
                    )
            meta = {
                **sample.meta,
                "max_seq_len": self.max_seq_lens[index],
                "max_image_resolution": self.max_image_resolutions[index],
            }
            yield dataclasses.replace(sample, meta=meta)

    def record_stats(self) -> dict[str, RecordStats]:
        stats: dict[str, RecordStats] = {}
        for stream in self.streams:
            for source, counts in stream.record_stats().items():
                stats.setdefault(source, RecordStats()).merge(counts)
        return stats

    def fingerprint(self) -> dict[str, Any]:
        return {
            "streams": [stream.fingerprint() for stream in self.streams],
            "weights": self.weights,
            "max_seq_lens": self.max_seq_lens,
            "max_image_resolutions": self.max_image_resolutions,
            "seed": self.seed,
        }
