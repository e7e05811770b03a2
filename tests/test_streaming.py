"""Streaming: exactly-once over ranks x workers, exact resume in a new process, mixtures, bad records."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datamodules.mixture import MixtureConfig
from datamodules.sample import Sample
from datamodules.sources.base import register
from datamodules.streaming import ResumableLoader, ShardedSampleStream

SHARD_SIZE = 25  # records per shard, one of them bad


@register("fake")
def read_fake(shard: str, stats, fail_every: int = 0):
    """JSON lines ``{"key": ...}``; a line ``{"bad": true}`` is a bad record."""
    for line in Path(shard).read_text().splitlines():
        record = json.loads(line)
        if record.get("bad"):
            stats.skip("invalid_json")
            continue
        yield Sample(source="fake", key=f"{shard}#{record['key']}", content=[record["key"]])


def write_shards(folder: Path, n_shards: int, name: str = "fake", bad_per_shard: int = 1) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        lines = [{"key": f"{name}-{s}-{i}"} for i in range(SHARD_SIZE - bad_per_shard)]
        lines[3:3] = [{"bad": True}] * bad_per_shard
        (folder / f"{name}-{s:03d}.jsonl").write_text("\n".join(map(json.dumps, lines)))
    return str(folder / f"{name}-*.jsonl")


def keys(batch: list[Sample]) -> list[str]:
    return [sample.content[0] for sample in batch]


def loader(urls: str, rank: int = 0, world_size: int = 1, **kwargs) -> ResumableLoader:
    stream = ShardedSampleStream("fake", urls, seed=7, shuffle_block=8, rank=rank, world_size=world_size)
    return ResumableLoader(stream, batch_size=3, collate_fn=keys, num_workers=2, **kwargs)


@pytest.mark.parametrize("n_shards", [9, 3])  # >= and < 2 ranks x 2 workers
def test_exactly_once_over_ranks_and_workers(tmp_path, n_shards):
    urls = write_shards(tmp_path, n_shards)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            data = loader(urls, rank, 2)
            data.set_epoch(epoch)
            seen += [key for batch in data for key in batch]
        assert sorted(seen) == sorted(f"fake-{s}-{i}" for s in range(n_shards) for i in range(SHARD_SIZE - 1))
    # the shuffle changes with the epoch, deterministically
    first = [k for b in loader(urls, 0, 2) for k in b]
    assert first == [k for b in loader(urls, 0, 2) for k in b]
    again = loader(urls, 0, 2)
    again.set_epoch(1)
    assert first != [k for b in again for k in b]


def test_record_stats_count_each_bad_record_once(tmp_path):
    urls = write_shards(tmp_path, 3)
    read, skipped = 0, Counter()
    for rank in (0, 1):
        data = loader(urls, rank, 2)
        list(data)
        stats = data.record_stats()["fake"]
        read, skipped = read + stats.read, skipped + stats.skipped
    assert read == 3 * (SHARD_SIZE - 1) and skipped == {"invalid_json": 3}


RESUME_SCRIPT = """
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import torch
from test_streaming import loader
data = loader({urls!r}, 1, 2, prefetched=1)
data.load_state_dict(torch.load({state!r}))
batches = iter(data)
print(json.dumps([next(batches) for _ in range(6)]))
"""


def test_resume_in_a_new_process_continues_exactly(tmp_path):
    import torch

    urls = write_shards(tmp_path / "shards", 9)
    reference = [b for b in loader(urls, 1, 2)]
    data = loader(urls, 1, 2, prefetched=1)  # the consumer fetched one batch it did not use yet
    batches = iter(data)
    consumed = [next(batches) for _ in range(5)]
    next(batches)  # prefetched, not consumed
    assert consumed == reference[:5]
    torch.save(data.state_dict(), tmp_path / "state.pt")
    script = RESUME_SCRIPT.format(
        tests=str(Path(__file__).parent),
        root=str(Path(__file__).parents[1]),
        urls=urls,
        state=str(tmp_path / "state.pt"),
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == reference[5:11]


def test_mixture_proportions_and_stage_change(tmp_path):
    sources = [
        {"source": "fake", "urls": write_shards(tmp_path / n, 4, n), "weight": w, "max_seq_len": L}
        for n, w, L in (("a", 5, 2048), ("b", 3, 1536), ("c", 2, 1024))
    ]
    config = MixtureConfig(sources, seed=1, shuffle_block=16)
    stream = config.build(rank=0, world_size=1)
    samples = [s for _, s in zip(range(10_000), stream)]
    counts = Counter(s.content[0].split("-")[0] for s in samples)
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[name] / 10_000 - weight) < 0.02
    assert {s.meta["max_seq_len"] for s in samples if s.content[0].startswith("c")} == {1024}
    data = ResumableLoader(stream, batch_size=4, collate_fn=keys)
    it = iter(data)
    for _ in range(3):
        next(it)
    state = data.state_dict()
    resumed = ResumableLoader(config.build(rank=0, world_size=1), batch_size=4, collate_fn=keys)
    resumed.load_state_dict(state)
    assert next(iter(resumed)) == next(it)
    stage2 = [config.build(rank=0, world_size=1) for _ in range(2)]
    for stream in stage2:
        stream.set_weights([0.45, 0.35, 0.2])
    fresh = ResumableLoader(stage2[0], batch_size=4, collate_fn=keys)
    fresh.load_state_dict(state)  # a checkpoint of another stage: the new stage starts from its beginning
    assert next(iter(fresh)) == next(iter(ResumableLoader(stage2[1], batch_size=4, collate_fn=keys)))


def test_bad_record_rate_threshold_raises_with_counts(tmp_path):
    urls = write_shards(tmp_path, 4, bad_per_shard=5)  # 5 of 25 bad: 20%
    ok = ShardedSampleStream("fake", urls, max_bad_record_rate=0.3, min_records=40)
    assert len(list(ok)) == 4 * 20
    strict = ShardedSampleStream("fake", urls, max_bad_record_rate=0.1, min_records=10)
    with pytest.raises(RuntimeError, match=r"Source 'fake'.*max_bad_record_rate=0.1.*'invalid_json': \d+"):
        list(strict)


@register("fake_filtered")
def read_fake_filtered(shard: str, stats):
    """Like ``fake``, but its bad lines are records a configured filter drops (``filtered:...``)."""
    for line in Path(shard).read_text().splitlines():
        record = json.loads(line)
        if record.get("bad"):
            stats.skip("filtered:nsfw")
            continue
        yield Sample(source="fake_filtered", key=f"{shard}#{record['key']}", content=[record["key"]])


def test_filter_drops_do_not_count_as_bad_records(tmp_path):
    urls = write_shards(tmp_path, 2, bad_per_shard=10)  # 40% dropped, all by a filter
    stream = ShardedSampleStream("fake_filtered", urls, max_bad_record_rate=0.01, min_records=5)
    assert len(list(stream)) == 2 * 15
    assert stream.stats.skipped == {"filtered:nsfw": 20}
