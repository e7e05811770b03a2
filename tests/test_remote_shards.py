"""Remote shard access (``datamodules.sources.shard_io``): HTTP range reads, retries that are counted,
``pipe:`` commands, byte ranges, the local cache and the errors after the last attempt. Shards are
served by a local HTTP server on 127.0.0.1 started by the tests themselves."""

from __future__ import annotations

import contextlib
import http.server
import pickle
import random
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules import Sample
from datamodules.shard_files import write_parquet
from datamodules.sources import expand_urls, iter_samples
from datamodules.sources.base import RecordStats
from datamodules.sources.shard_io import ShardIO, ShardReadError, ShardStamp
from datamodules.synthetic import write_shards

FAST = {"backoff_s": 0.001, "max_backoff_s": 0.01}


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``root`` with Range, HEAD, Content-Length and ETag; counts requests (``hits``), GETs and
    the bytes they sent; with
    ``fail_every=n`` GETs number 1, n+1, 2n+1... are answered by a 503 or a body cut in half, alternately.
    HEADs fail too (always with a 503, as do GETs then) only with ``fail_head``: fsspec falls back from
    HEAD to GET by itself, which would hide a failure;
    a connection closed without a response is not used: aiohttp re-sends such a request once by itself."""

    daemon_threads = True

    def __init__(self, root: Path, fail_every: int = 0, fail_head: bool = False, ranges: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.fail_every, self.fail_head, self.ranges = root, fail_every, fail_head, ranges
        self.hits = self.requests = self.gets = self.bytes_sent = self.failures = 0
        self.lock = threading.Lock()

    def url(self, path: Path) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path.relative_to(self.root).as_posix()}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def do_GET(self) -> None:
        self._respond(body=True)

    def _respond(self, body: bool) -> None:
        server = self.server
        with server.lock:
            server.hits += 1
            counted = body or server.fail_head
            server.requests += counted
            fail = counted and server.fail_every and (server.requests - 1) % server.fail_every == 0
            server.failures += bool(fail)
        if fail and (server.failures % 2 or server.fail_head):
            self.send_error(503)
            return
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        header = self.headers.get("Range")
        if header and server.ranges:
            first, last = header.removeprefix("bytes=").split("-")
            start, end, status = int(first), min(int(last) + 1 if last else len(data), len(data)), 206
        payload = data[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", f'"{len(data)}-{path.stat().st_mtime_ns}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            with server.lock:
                server.gets += 1
                server.bytes_sent += len(payload)
            self.wfile.write(payload[: len(payload) // 2] if fail else payload)


@contextlib.contextmanager
def serve(root: Path, **options) -> Iterator[_Server]:
    server = _Server(root, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _content(samples: list[Sample]) -> list:
    """What a sample holds, without its key (which contains the URL): texts, turns and image pixels."""
    return [
        (
            [part.tobytes() if not isinstance(part, str) else part for part in s.content],
            s.turns,
            [image.tobytes() for image in s.images],
        )
        for s in samples
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A folder with a LAION-COCO tar and a Cauldron parquet shard; returns (root, tar, parquet)."""
    root = tmp_path_factory.mktemp("shards")
    tar = next(p for p in write_shards("laion_coco", root / "laion", 8, seed=3) if p.suffix == ".tar")
    parquet = next(
        p for p in write_shards("cauldron", root / "cauldron", 8, seed=3) if p.suffix == ".parquet"
    )
    return root, tar, parquet


@pytest.mark.parametrize("which", ["tar", "parquet"])
def test_http_shards_yield_the_local_samples(shards, which):
    root, tar, parquet = shards
    source, path = ("laion_coco", tar) if which == "tar" else ("cauldron", parquet)
    local = list(iter_samples(source, str(path)))
    with serve(root) as server:
        remote = list(iter_samples(source, server.url(path)))
    assert len(local) >= 4 and _content(remote) == _content(local)
    assert server.gets > 0


@pytest.mark.parametrize("which", ["tar", "parquet"])
def test_flaky_server_loses_nothing_and_retries_are_counted(shards, which, monkeypatch):
    root, tar, parquet = shards
    source, path = ("laion_coco", tar) if which == "tar" else ("cauldron", parquet)
    monkeypatch.setattr("datamodules.sources.shard_io.DEFAULT_SHARD_IO", ShardIO(block_size=4096, **FAST))
    local = list(iter_samples(source, str(path)))
    with serve(root, fail_every=5) as server:
        stream = iter_samples(source, server.url(path))
        remote = list(stream)
    assert _content(remote) == _content(local)
    assert server.failures > 0
    assert sum(stream.stats.retries.values()) == server.failures
    assert not stream.stats.skipped  # a retry is not a bad record
    counts = stream.stats.as_dict()
    assert any(key.startswith("retry:") for key in counts)
    assert RecordStats.from_dict(counts).as_dict() == counts


def test_pipe_url_reads_the_same_samples_and_reruns_failed_commands(shards, tmp_path):
    _, tar, _ = shards
    local = list(iter_samples("laion_coco", str(tar)))
    assert _content(list(iter_samples("laion_coco", f"pipe:cat {tar}"))) == _content(local)
    # A command that dies halfway on its first run only: the reader re-runs it and skips what it had.
    marker = tmp_path / "failed-once"
    half = tar.stat().st_size // 2
    command = (
        f"pipe:if [ -e {marker} ]; then cat {tar}; else touch {marker}; head -c {half} {tar}; exit 1; fi"
    )
    shard_io = ShardIO(**FAST)
    stats = RecordStats()
    with shard_io.open(command, stats=stats) as stream:
        assert stream.read() == tar.read_bytes()
    assert stats.retries == {"pipe": 1} and shard_io.retries == {"pipe": 1}
    # Forward-only byte ranges, and output ending before ``end`` is retried as truncated.
    with shard_io.open(f"pipe:cat {tar}", 100, 700) as stream:
        assert stream.read() == tar.read_bytes()[100:700]
    with pytest.raises(ShardReadError, match=r"pipe:head -c 10 .*output ended"):
        shard_io.open(f"pipe:head -c 10 {tar}", 0, 20).read()
    # Closing before the command ends stops it instead of waiting for it.
    started = time.monotonic()
    with shard_io.open("pipe:printf 0123456789; exec sleep 30", 2, 5) as stream:
        assert stream.read() == b"234"
    assert time.monotonic() - started < 10


def test_byte_ranges_local_and_http(shards):
    root, tar, _ = shards
    data = tar.read_bytes()
    shard_io = ShardIO(block_size=1000, **FAST)
    with serve(root) as server:
        for url in (str(tar), f"file://{tar}", server.url(tar)):
            for start, end in ((0, None), (0, 10), (700, 5300), (len(data) - 3, None), (5, 5)):
                with shard_io.open(url, start, end) as stream:
                    assert stream.read() == data[start:end], (url, start, end)
            with shard_io.open(url, 512, 4096) as stream:  # seek and tell are relative to ``start``
                stream.seek(100)
                assert stream.read(50) == data[612:662] and stream.tell() == 150
                assert stream.seek(0, 2) == 4096 - 512
            # A tar member read straight from its offset, as a shard index does.
            with tarfile.open(tar) as archive:
                member = next(info for info in archive if info.isreg())
            with (
                shard_io.open(url, member.offset, member.offset_data + member.size) as stream,
                tarfile.open(fileobj=stream, mode="r|") as archive,
            ):
                info = next(iter(archive))
                assert archive.extractfile(info).read() == data[member.offset_data :][: member.size]


def test_parquet_reads_only_the_footer_and_chosen_row_group(tmp_path):
    # Big enough that the footer (pyarrow reads the last 64 KiB at once) is a small part of the file.
    rows = [{"texts": f"row {i}", "blob": random.Random(i).randbytes(20_000)} for i in range(64)]
    schema = pa.schema([("texts", pa.string()), ("blob", pa.binary())])
    parquet = write_parquet(tmp_path / "big.parquet", rows, schema, features={}, rows_per_group=8)
    size = parquet.stat().st_size
    with serve(tmp_path) as server, ShardIO(block_size=4096).open(server.url(parquet)) as stream:
        file = pq.ParquetFile(stream)
        assert file.num_row_groups > 2
        footer_bytes = server.bytes_sent
        table = file.read_row_group(file.num_row_groups - 1, columns=["texts"])
    assert table.num_rows > 0
    assert footer_bytes < size / 4
    assert server.bytes_sent < size / 2, (server.bytes_sent, size)


def test_cache_serves_second_open_from_disk_and_keeps_under_its_cap(shards, tmp_path):
    root, tar, parquet = shards
    cache = tmp_path / "cache"
    with serve(root) as server:
        shard_io = ShardIO(cache_dir=str(cache), **FAST)
        with shard_io.open(server.url(tar)) as stream:
            assert stream.read() == tar.read_bytes()
        hits = server.hits
        with shard_io.open(server.url(tar)) as stream:
            assert stream.read() == tar.read_bytes()
        assert server.hits == hits  # served from disk, not even a HEAD
        assert [p.name.endswith(tar.name) for p in cache.iterdir()] == [True]

        # A cap that holds one of the two shards: opening the other evicts the least recently used.
        capped = ShardIO(
            cache_dir=str(cache), cache_max_bytes=max(tar.stat().st_size, parquet.stat().st_size), **FAST
        )
        with capped.open(server.url(parquet)) as stream:
            assert stream.read() == parquet.read_bytes()
        assert [p.name.endswith(parquet.name) for p in cache.iterdir()] == [True]
        # A shard bigger than the cap is streamed, not cached.
        tiny = ShardIO(cache_dir=str(cache), cache_max_bytes=100, **FAST)
        gets = server.gets
        with tiny.open(server.url(tar)) as stream:
            assert stream.read() == tar.read_bytes()
        assert server.gets > gets and not any(p.name.endswith(tar.name) for p in cache.iterdir())
    assert sum(p.stat().st_size for p in cache.iterdir()) <= capped.cache_max_bytes


def test_cache_evicts_the_least_recently_used(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in "abc":
        (served / f"{name}.tar").write_bytes(name.encode() * 1000)
    shard_io = ShardIO(cache_dir=str(tmp_path / "cache"), cache_max_bytes=2500, **FAST)
    with serve(served) as server:
        for name in "aba":  # b is now the least recently used
            with shard_io.open(server.url(served / f"{name}.tar")) as stream:
                assert stream.read() == name.encode() * 1000
        assert server.gets == 2  # the second open of a came from the cache
        with shard_io.open(server.url(served / "c.tar")) as stream:
            assert stream.read() == b"c" * 1000
    assert sorted(p.name[-5:] for p in (tmp_path / "cache").iterdir()) == ["a.tar", "c.tar"]


def test_errors_name_the_url(shards):
    root, tar, _ = shards
    shard_io = ShardIO(max_attempts=3, **FAST)
    with (
        serve(root, fail_every=1, fail_head=True) as server,
        pytest.raises(ShardReadError, match=rf"{server.url(tar)} \(info\).*3 attempts"),
    ):
        shard_io.open(server.url(tar))
    assert shard_io.retries.total() == 2
    with (
        serve(root, fail_every=1) as server,
        pytest.raises(ShardReadError, match=rf"{server.url(tar)} \(bytes 0-1000\).*3 attempts"),
    ):
        ShardIO(max_attempts=3, block_size=1000, **FAST).open(server.url(tar)).read(10)
    with serve(root) as server, pytest.raises(FileNotFoundError, match=r"missing\.tar"):
        shard_io.open(server.url(root / "missing.tar"))
    with serve(root, ranges=False) as server, pytest.raises(ShardReadError, match="Range"):
        ShardIO(block_size=1000).open(server.url(tar)).read()
    with pytest.raises(FileNotFoundError, match=r"missing\.tar"):
        shard_io.open(str(root / "missing.tar"))


def test_stamp_and_pickling(shards):
    root, tar, _ = shards
    shard_io = ShardIO(**FAST)
    local = shard_io.stamp(str(tar))
    assert local == ShardStamp(tar.stat().st_size, str(tar.stat().st_mtime_ns))
    with serve(root) as server:
        assert shard_io.stamp(server.url(tar)) == ShardStamp(
            tar.stat().st_size, f'"{local.size}-{local.stamp}"'
        )
    assert shard_io.stamp(f"pipe:cat {tar}") == ShardStamp(None, None)
    shard_io.retries["connection"] += 1
    copy = pickle.loads(pickle.dumps(shard_io))
    assert copy == shard_io and not copy.retries  # each worker counts its own retries


class _RangeDataset(IterableDataset):
    def __init__(self, shard_io: ShardIO, url: str) -> None:
        self.shard_io, self.url = shard_io, url

    def __iter__(self):
        worker = get_worker_info().id
        with self.shard_io.open(self.url, worker * 100, worker * 100 + 50) as stream:
            yield worker, stream.read(), self.shard_io.retries.total()


def test_dataloader_workers_read_http_ranges_and_count_their_own_retries(shards):
    root, tar, _ = shards
    data = tar.read_bytes()
    with serve(root, fail_every=2) as server:
        shard_io = ShardIO(**FAST)
        assert shard_io.open(server.url(tar)).read(10) == data[:10]  # the parent used HTTP before forking
        assert shard_io.retries.total() == 1
        loader = DataLoader(
            _RangeDataset(shard_io, server.url(tar)),
            batch_size=None,
            num_workers=2,
            multiprocessing_context="fork",  # the copy of the parent's counts must not count twice
            timeout=60,
        )
        results = sorted(loader)
    assert [(worker, chunk) for worker, chunk, _ in results] == [(0, data[0:50]), (1, data[100:150])]
    failures = server.failures
    assert sum(retries for *_, retries in results) == failures - 1 > 0  # the parent's one not included


def test_expand_urls_keeps_remote_and_pipe_urls(tmp_path):
    assert expand_urls("pipe:cat /data/shard-{0..2}.tar") == [
        f"pipe:cat /data/shard-{i}.tar" for i in range(3)
    ]
    remote = [
        "hf://datasets/org/name/train-{00000..00001}.parquet",
        "s3://bucket/x.tar",
        "https://h/a.tar?sig=1",
    ]
    assert expand_urls(remote) == [
        "hf://datasets/org/name/train-00000.parquet",
        "hf://datasets/org/name/train-00001.parquet",
        "s3://bucket/x.tar",
        "https://h/a.tar?sig=1",
    ]
    with pytest.raises(FileNotFoundError, match=r"nope\.tar"):
        expand_urls(str(tmp_path / "nope.tar"))


def test_record_stats_round_trip_and_merge():
    stats = RecordStats()
    stats.ok()
    stats.skip("corrupt_image")
    stats.count_retry("http_503")
    other = RecordStats.from_dict(stats.as_dict())
    assert other.as_dict() == {"read": 1, "corrupt_image": 1, "retry:http_503": 1}
    other.merge(stats)
    assert other.retries == {"http_503": 2} and other.skipped == {"corrupt_image": 2}
    with pytest.raises(ValueError, match="reserved"):
        stats.skip("retry:x")
