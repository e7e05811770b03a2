"""Streaming at scale: shard index and seeks, the partitioned order, elastic exact resume, segments,
mixtures, bad records. Lightning-level kill-and-resume runs are in test_resume.py."""

import gzip
import hashlib
import io
import shutil
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from datamodules.index import build_index, checked_index, index_path, load_index
from datamodules.mixture import MixtureConfig
from datamodules.order import MixtureCursor, PartitionSource, SourceStream, check_bad_rate
from datamodules.packing import RowPacker, TokenizedDocument
from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.records import RecordSpan, iter_tar_groups
from datamodules.sources.shard_io import ShardIO
from datamodules.streaming import PartitionedStream, ResumableLoader, StreamLayout

RECORDS = 23  # per shard: not a multiple of the block sizes used below


@register("keys")
def read_keys(shard: str, stats: RecordStats, span: RecordSpan | None = None):
    """Tar records ``{key}.txt``: ``bad...`` is a bad record, ``drop...`` one a filter drops, and
    ``a|b|c`` gives one sample per part (as OBELICS documents split at END_OF_DOCUMENT)."""
    for key, members in iter_tar_groups(shard, stats, span):
        text = members["txt"].decode()
        if text.startswith("bad"):
            stats.skip("invalid_json")
            continue
        if text.startswith("drop"):
            stats.skip("filtered:test")
            continue
        for part in text.split("|"):
            stats.ok()
            yield Sample(source="keys", key=f"{key}/{part}", content=[part])


def write_tar(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            data = text.encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_key_shards(folder: Path, n_shards: int, name: str = "k", bad: int = 1, split_every: int = 5) -> str:
    """Shards of ``RECORDS`` records: ``bad`` bad ones each, every ``split_every``-th record two samples."""
    for s in range(n_shards):
        texts = [
            f"{name}{s}.{i}" + (f"|{name}{s}.{i}b" if i % split_every == 0 else "") for i in range(RECORDS)
        ]
        texts[2 : 2 + bad] = [f"bad{s}.{i}" for i in range(bad)]
        write_tar(folder / f"{name}-{s:03d}.tar", texts)
    return str(folder / f"{name}-*.tar")


def all_samples(urls: str) -> list[str]:
    from datamodules.sources import iter_samples

    return [s.content[0] for s in iter_samples("keys", urls)]


def order_of(urls: str, partitions: int, block_size: int = 4, seed: int = 3) -> SourceStream:
    return MixtureConfig(
        [{"source": "keys", "urls": urls, "weight": 1, "max_seq_len": 64}],
        seed=seed,
        shuffle_block=block_size,
    ).streams(partitions)[0]


# --- index and seeks ------------------------------------------------------------------------------


def test_index_seeks_to_every_record_of_tars_and_parquet(tmp_path):
    from datamodules.synthetic import write_shards

    tar = Path(write_key_shards(tmp_path / "t", 1).replace("*", "000"))
    gz = tmp_path / "t" / "k-000.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    parquet = write_shards("cauldron", tmp_path / "c", 80, seed=0)[0]
    for shard, reader_name in ((tar, "keys"), (gz, "keys"), (parquet, "cauldron")):
        from datamodules.sources.base import get_reader

        reader = get_reader(reader_name)
        index = load_index(str(shard))
        sequential = [s.key for s in reader(str(shard), RecordStats())]
        assert index.compressed == (shard == gz)
        by_record = []
        for record in range(index.records):
            span = index.span(record, record + 1, None, 0, ShardIO())
            by_record.append([s.key for s in reader(str(shard), RecordStats(), span=span)])
        assert [key for keys in by_record for key in keys] == sequential
        span = index.span(2, 7, [4, 0, 3, 1, 2], 2, ShardIO())  # shuffled, the first two passed over
        picked = [(span.position, s.key) for s in reader(str(shard), RecordStats(), span=span)]
        expected = [
            (position, key) for position, record in ((2, 5), (3, 3), (4, 4)) for key in by_record[record]
        ]
        assert picked == expected


def test_index_is_cached_beside_the_shard_and_rebuilt_when_the_shard_changes(tmp_path):
    urls = write_key_shards(tmp_path, 1)
    shard = urls.replace("*", "000")
    index = load_index(shard)
    assert index.records == RECORDS and index_path(shard).exists()
    assert index_path(shard).parent.name == ".shard-index"
    index_path(shard).write_text(index_path(shard).read_text().replace(f'"records":{RECORDS}', '"records":5'))
    assert load_index(shard).records == 5  # served from the cache (stamp unchanged)
    write_tar(Path(shard), [f"new{i}" for i in range(7)])
    assert load_index(shard).records == 7  # the shard changed: rebuilt


def test_a_shard_changed_during_a_run_is_an_error_naming_it(tmp_path):
    urls = write_key_shards(tmp_path, 2)
    stream = order_of(urls, partitions=1)
    reader = PartitionSource(stream, 0, (0, 0, 0), RecordStats())
    reader.next()
    shard = urls.replace("*", "001")
    write_tar(Path(shard), ["x"] * RECORDS)
    url, _, size, stamp = stream.order.shards[1]
    with pytest.raises(RuntimeError, match=r"k-001\.tar changed after the data stream was planned"):
        checked_index(url, None, size, stamp, ShardIO())


def test_truncated_tar_yields_its_complete_records_and_counts_once(tmp_path):
    shard = write_tar(tmp_path / "cut.tar", [f"r{i}" * 200 for i in range(6)])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 700])  # inside the data of a member
    index = build_index(str(shard))
    assert index.damage == "truncated_tar" and 0 < index.records < 6
    sequential = list(iter_tar_groups(str(shard), RecordStats()))
    assert index.records == len(sequential)
    stream = order_of(str(shard), partitions=1, block_size=100)
    stats = RecordStats()
    reader = PartitionSource(stream, 0, (0, 0, 0), stats)
    got = [reader.next().content[0] for _ in range(index.records)]
    assert sorted(got) == sorted(members["txt"].decode() for _, members in sequential)
    assert stats.skipped == {"truncated_tar": 1}


# --- the partitioned order -----------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_each_pass_reads_every_record_once_over_the_partitions(tmp_path, partitions):
    urls = write_key_shards(tmp_path, 3)
    stream = order_of(urls, partitions)
    blocks = stream.order.block_count
    seen = []
    for p in range(partitions):
        reader = PartitionSource(stream, p, (0, 0, 0), RecordStats())
        ordinals = len(range(p, blocks, partitions))  # this partition's share of pass 0
        while True:
            sample = reader.next()
            if reader.ordinal == ordinals:  # the first sample of the next pass
                break
            seen.append(sample.content[0])
    assert Counter(seen) == Counter(all_samples(urls))
    # a new pass reshuffles: other blocks first
    first = [PartitionSource(stream, 0, (0, 0, 0), RecordStats()).next() for _ in range(1)]
    later = PartitionSource(stream, 0, (blocks, 0, 0), RecordStats())
    assert later.next().key != first[0].key or blocks == 1


def test_a_cursor_resumes_inside_a_record_that_gave_several_samples(tmp_path):
    urls = write_key_shards(tmp_path, 2, split_every=2)
    stream = order_of(urls, partitions=2, block_size=5)
    reader = PartitionSource(stream, 1, (0, 0, 0), RecordStats())
    reference = [reader.next().content[0] for _ in range(30)]
    for cut in (1, 4, 7, 12):
        reader = PartitionSource(stream, 1, (0, 0, 0), RecordStats())
        for _ in range(cut):
            reader.next()
        resumed = PartitionSource(stream, 1, reader.cursor, RecordStats())
        assert [resumed.next().content[0] for _ in range(30 - cut)] == reference[cut:]


def test_mixture_proportions_and_per_source_limits(tmp_path):
    sources = [
        {
            "source": "keys",
            "urls": write_key_shards(tmp_path / n, 2, n, bad=0, split_every=10**9),
            "weight": w,
            "max_seq_len": length,
        }
        for n, w, length in (("a", 5, 2048), ("b", 3, 1536), ("c", 2, 1024))
    ]
    samples = list(islice(MixtureConfig(sources, seed=1, shuffle_block=8).samples(), 10_000))
    counts = Counter(s.content[0][0] for s in samples)
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[name] / 10_000 - weight) < 0.02
    assert {s.meta["max_seq_len"] for s in samples if s.content[0].startswith("c")} == {1024}


def test_bad_record_rate_threshold_and_filter_drops(tmp_path):
    stats = RecordStats()
    stats.read, stats.skipped = 80, Counter({"invalid_json": 20})
    check_bad_rate("keys", stats, 0.3, 40)
    with pytest.raises(RuntimeError, match=r"Source 'keys'.*max_bad_record_rate=0.1.*'invalid_json': 20"):
        check_bad_rate("keys", stats, 0.1, 40)
    stats.skipped = Counter({"filtered:nsfw": 60})
    check_bad_rate("keys", stats, 0.01, 5)  # filter drops are wanted, not bad records
    urls = write_key_shards(tmp_path, 2, bad=10)
    stream = order_of(urls, partitions=1)
    stream.max_bad_record_rate, stream.min_records = 0.1, 10
    reader = PartitionSource(stream, 0, (0, 0, 0), RecordStats())
    with pytest.raises(RuntimeError, match=r"max_bad_record_rate=0\.1"):
        for _ in range(40):
            reader.next()


# --- the loader: elastic, exact, seeking -----------------------------------------------------------


class KeyDocument:
    """A stand-in for the processor: a sample becomes a document of 3..18 tokens derived from its key."""

    stats = RecordStats()

    def __call__(self, sample: Sample) -> TokenizedDocument:
        digest = hashlib.sha256(sample.content[0].encode()).digest()
        tokens = [1000 + b for b in digest[: 3 + digest[-1] % 16]]
        return TokenizedDocument(tokens, tokens)


def rows_of(batch: list) -> dict[str, list[tuple]]:
    return {"rows": [tuple(token for doc in row for token in doc.input_ids) for row in batch]}


def make_loader(urls: str, layout: StreamLayout, window: int = 6, **options) -> ResumableLoader:
    sources = [{"source": "keys", "urls": urls, "weight": 1, "max_seq_len": 32}]
    streams = MixtureConfig(sources, seed=5, shuffle_block=4).streams(layout.partitions)
    packer = RowPacker(KeyDocument(), max_seq_len=32, image_token_id=-1, placeholder_ids=[])
    dataset = PartitionedStream(streams, [1.0], packer, window=window, seed=5)
    return ResumableLoader(dataset, layout, rows_of, num_workers=layout.workers, **options)


def global_batches(loaders: list[ResumableLoader], steps: int, consume: bool = True) -> list[Counter]:
    """The rows of each optimizer step over all ranks' loaders (a multiset per step)."""
    iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        step = Counter()
        for loader, batches in zip(loaders, iterators):
            for _ in range(loader.layout.accumulation):
                batch = next(batches)
                if consume:
                    loader.consumed(batch)
                step.update(batch["rows"])
        out.append(step)
    return out


def gathered_state(loaders: list[ResumableLoader]) -> dict:
    """The state ``state_dict`` returns under torch.distributed: every rank's partitions (all_gather)."""
    states = [loader.state_dict() for loader in loaders]
    merged = {
        key: {p: position for state in states for p, position in state[key].items()}
        for key in ("positions", "segment_start")
    }
    assert all(len(positions) == loaders[0].layout.partitions for positions in merged.values())
    return {**states[0], **merged}


def ranks(urls: str, world_size: int, workers: int, batch_size: int, accumulation: int = 1, **kw):
    return [
        make_loader(urls, StreamLayout(4, world_size, rank, workers, batch_size, accumulation), **kw)
        for rank in range(world_size)
    ]


LAYOUTS = {  # (devices, workers, batch size, accumulation): all 8 rows per step, 4 partitions
    "1dev": (1, 0, 8, 1),
    "1dev-2workers": (1, 2, 8, 1),
    "2dev-2workers": (2, 2, 4, 1),
    "4dev-accum2": (4, 1, 1, 2),
    "2dev-3workers-accum4": (2, 3, 1, 4),
}


def test_global_batches_do_not_depend_on_devices_workers_or_accumulation(tmp_path):
    urls = write_key_shards(tmp_path, 4)
    reference = global_batches(ranks(urls, *LAYOUTS["1dev"]), 6)
    assert all(sum(step.values()) == 8 for step in reference)
    for name, layout in LAYOUTS.items():
        assert global_batches(ranks(urls, *layout), 6) == reference, name


@pytest.mark.parametrize(
    "saved,resumed", [("1dev", "2dev-2workers"), ("2dev-3workers-accum4", "1dev-2workers")]
)
def test_resume_on_another_layout_twice_continues_exactly(tmp_path, saved, resumed):
    urls = write_key_shards(tmp_path, 4)
    reference = global_batches(ranks(urls, *LAYOUTS["1dev"]), 9)
    first = ranks(urls, *LAYOUTS[saved])
    assert global_batches(first, 3) == reference[:3]
    second = ranks(urls, *LAYOUTS[resumed], dataloader_options={"persistent_workers": True})
    for loader in second:
        loader.load_state_dict(gathered_state(first))  # rank 0's copy on every rank, as Lightning does
    assert global_batches(second, 3) == reference[3:6]
    third = ranks(urls, *LAYOUTS[saved])
    for loader in third:
        loader.load_state_dict(gathered_state(second))
    assert global_batches(third, 3) == reference[6:9]


def test_prefetched_batches_do_not_count_and_a_resume_reads_one_window(tmp_path):
    urls = write_key_shards(tmp_path, 4)
    reference = global_batches(ranks(urls, *LAYOUTS["1dev"]), 30)
    loader = make_loader(urls, StreamLayout(4, batch_size=8))
    batches = iter(loader)
    for _ in range(25):
        loader.consumed(next(batches))
    next(batches)  # fetched ahead (Lightning's prefetch), never trained on
    state = loader.state_dict()
    resumed = make_loader(urls, StreamLayout(4, batch_size=8))
    resumed.load_state_dict(state)
    assert global_batches([resumed], 5) == reference[25:]
    seek = make_loader(urls, StreamLayout(4, batch_size=8))
    seek.load_state_dict(state)
    global_batches([seek], 1)

    def samples_read(data: ResumableLoader) -> int:
        return data.record_stats()["keys"].read

    # the first step after the resume re-read one window (6 samples) per partition, plus the windows the
    # step itself needs (2 rows of ~3 documents per partition); a replay would have re-read all 25 steps
    assert samples_read(seek) <= 4 * 3 * 6 < samples_read(loader) / 5


def test_a_new_segment_continues_after_the_current_windows(tmp_path):
    urls = write_key_shards(tmp_path, 4)
    loader = make_loader(urls, StreamLayout(4, batch_size=8))
    before = global_batches([loader], 3)
    positions = dict(loader.positions)
    loader.update_settings(weights=[1.0], stage=2)
    stage2 = global_batches([loader], 3)
    assert loader.segment_start == {p: position.next_segment() for p, position in positions.items()}
    seen = {row for step in before for row in step}
    assert not seen & {row for step in stage2 for row in step}  # nothing of stage 1 replayed
    # a checkpoint of stage 1 resumed with stage 2's settings starts stage 2 at the same place
    fresh = make_loader(urls, StreamLayout(4, batch_size=8), settings={"weights": [1.0], "stage": 2})
    state = make_loader(urls, StreamLayout(4, batch_size=8))
    global_batches([state], 3)
    fresh.load_state_dict(state.state_dict())
    assert global_batches([fresh], 3) == stage2


def test_layouts_that_cannot_serve_the_stream_fail_with_what_to_set(tmp_path):
    urls = write_key_shards(tmp_path, 1)
    with pytest.raises(ValueError, match="multiple of the device count"):
        iter(make_loader(urls, StreamLayout(4, world_size=3, batch_size=4))).__next__()
    loader = make_loader(urls, StreamLayout(4, batch_size=8))
    state = loader.state_dict()
    other = make_loader(urls, StreamLayout(4, batch_size=4))
    with pytest.raises(ValueError, match="Keep the global batch"):
        other.load_state_dict(state)
    shutil.rmtree(tmp_path / ".shard-index")
    write_tar(Path(urls.replace("*", "000")), ["x"] * 3)
    changed = make_loader(urls, StreamLayout(4, batch_size=8))
    with pytest.raises(ValueError, match=r"changed since the checkpoint.*k-000\.tar"):
        changed.load_state_dict(state)
    assert MixtureCursor.start(2).as_dict() == {"draws": 0, "sources": [[0, 0, 0], [0, 0, 0]]}
