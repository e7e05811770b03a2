"""The partitioned training stream over remote shards: indexes built over HTTP, seeks as range
requests, the same global batches as from local paths, through a server that fails every fifth
request (retried and counted), and from ``pipe:`` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_remote_shards import FAST, serve
from test_streaming import LAYOUTS, KeyDocument, global_batches, rows_of, write_key_shards

from datamodules.mixture import MixtureConfig
from datamodules.packing import RowPacker
from datamodules.sources.shard_io import ShardIO
from datamodules.streaming import PartitionedStream, ResumableLoader, StreamLayout

SHARDS = 3


def loaders(urls: str, io: ShardIO, layout: tuple[int, int, int, int]) -> list[ResumableLoader]:
    devices, workers, batch, accumulation = layout
    out = []
    for rank in range(devices):
        stream_layout = StreamLayout(4, devices, rank, workers, batch, accumulation)
        mixture = MixtureConfig([{"source": "keys", "urls": urls, "weight": 1, "max_seq_len": 32}], seed=5,
                                shuffle_block=4, io=io)  # fmt: skip
        packer = RowPacker(KeyDocument(), max_seq_len=32, image_token_id=-1, placeholder_ids=[])
        dataset = PartitionedStream(mixture.streams(4), [1.0], packer, window=6, seed=5)
        out.append(ResumableLoader(dataset, stream_layout, rows_of, num_workers=workers))
    return out


@pytest.fixture()
def shards(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IDEFICS_LIGHTNING_CACHE", str(tmp_path / "cache"))  # remote shards' indexes
    write_key_shards(tmp_path / "data", SHARDS)
    return tmp_path / "data"


def test_http_stream_equals_the_local_stream_even_when_requests_fail(shards):
    local = global_batches(loaders(f"{shards}/k-{{000..002}}.tar", ShardIO(), LAYOUTS["1dev"]), 6)
    with serve(shards) as server:
        urls = server.url(shards / "k-{000..002}.tar")
        assert global_batches(loaders(urls, ShardIO(**FAST), LAYOUTS["1dev"]), 6) == local
    with serve(shards, fail_every=5) as server:
        urls = server.url(shards / "k-{000..002}.tar")
        remote = loaders(urls, ShardIO(**FAST), LAYOUTS["2dev-2workers"])
        assert global_batches(remote, 6) == local
        assert server.failures > 0
        retries = sum(
            n for loader in remote for stats in loader.record_stats().values()
            for reason, n in stats.retries.items()
        )  # fmt: skip
        assert retries > 0


def test_pipe_stream_equals_the_local_stream(shards):
    local = global_batches(loaders(f"{shards}/k-{{000..002}}.tar", ShardIO(), LAYOUTS["1dev"]), 4)
    piped = loaders(f"pipe:cat {shards}/k-{{000..002}}.tar", ShardIO(**FAST), LAYOUTS["1dev-2workers"])
    assert global_batches(piped, 4) == local
