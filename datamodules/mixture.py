"""Mixture configuration: the sources of a data mixture, their weights and per-source limits.

Each source has its own sequence length (``max_seq_len``) and image resolution
(``max_image_resolution``, longest edge in pixels), which every sample of it carries in ``meta`` for
the processor and the packer. The sample order itself, and how the weights draw sources, is in
``datamodules.order`` (a counter-based draw per sample of each canonical partition); the weights
can change between training stages without replaying earlier data (``datamodules.streaming``).

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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from datamodules.index import index_shards
from datamodules.order import MixtureCursor, PartitionMixture, SourceOrder, SourceStream
from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, get_reader
from datamodules.sources.shard_io import ShardIO


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
    """A data mixture: its sources and the streaming settings they share.

    ``shuffle_block``: records read together (one seek or ranged read) and shuffled among themselves;
    blocks are shuffled too (``datamodules.order``). ``partitions``: canonical partitions of the order.
    """

    sources: list[SourceConfig]
    seed: int = 0
    shuffle_block: int = 64
    max_bad_record_rate: float | None = 0.05
    io: ShardIO = field(default_factory=ShardIO)

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        for source in self.sources:
            get_reader(source.source)  # an unknown source fails here, naming the known ones

    @property
    def weights(self) -> list[float]:
        """The configured weight of each source."""
        return [s.weight for s in self.sources]

    def streams(self, partitions: int, progress: bool = False) -> list[SourceStream]:
        """The ``SourceStream`` of each source (shards indexed on first use, then read from the cache)."""
        return [
            SourceStream(
                SourceOrder(
                    s.source,
                    index_shards(s.urls, s.options.get("format"), self.io, progress=progress),
                    seed=self.seed,
                    partitions=partitions,
                    block_size=self.shuffle_block,
                ),
                dict(s.options),
                s.max_seq_len,
                s.max_image_resolution,
                self.io,
                self.max_bad_record_rate,
            )
            for s in self.sources
        ]

    def samples(self, partition: int = 0, partitions: int = 1) -> Iterator[Sample]:
        """The endless sample stream of one partition (e.g. to look at the mixture in a notebook)."""
        streams = self.streams(partitions)
        stats = [RecordStats() for _ in streams]
        mixture = PartitionMixture(
            streams, self.weights, partition, MixtureCursor.start(len(streams)), stats, self.seed
        )
        while True:
            yield mixture.next()
