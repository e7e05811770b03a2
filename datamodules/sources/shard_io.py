"""Reading shards wherever they live: local files, fsspec URLs (``https://``, ``s3://``, ``hf://``...) and
``pipe:`` commands, with retries on transient errors, byte ranges, and an optional local cache.

``ShardIO`` is a small picklable dataclass (it travels to DataLoader workers). ``ShardIO().open(url,
start, end)`` returns a binary file object over bytes ``[start, end)`` of the shard; positions in it
are relative to ``start``. Remote files are read by range requests of ``block_size`` bytes, so
``pyarrow.parquet.ParquetFile`` reads only the footer and the row groups it needs. A transient
error (connection reset/refused, timeout, HTTP 429/5xx) sleeps with exponential backoff and retries
the same range; every retry is counted in ``ShardIO.retries`` and, when given, the stream's
``RecordStats``. Missing files and 403/404 fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import fsspec
import webdataset
from fsspec.implementations.local import LocalFileSystem

from datamodules.sources.base import RecordStats

T = TypeVar("T")
# ``retrying(url, what, call)``: ``call()`` with retries; ``what`` ("info", "bytes 0-100") names the step.
Retrying = Callable[[str, str, Callable[[], Any]], Any]

# HTTP statuses worth retrying: rate limiting and server-side failures.
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Keys of ``fs.info`` that identify a version of a remote file, best first (HTTP, S3, GCS, HF, others).
_STAMP_KEYS = (
    "ETag",
    "etag",
    "ETAG",
    "blob_id",
    "md5Hash",
    "Last-Modified",
    "LastModified",
    "last_modified",
    "mtime",
)


class ShardReadError(RuntimeError):
    """A shard (or a byte range of it) could not be read after every attempt.

    Not an ``OSError`` on purpose: tar readers count ``OSError`` as a damaged tar and move on, while
    a shard that the network did not deliver must stop the stream rather than vanish from it.
    """


@dataclass(frozen=True)
class ShardStamp:
    """What identifies one version of a shard: its size and a version stamp (ETag, mtime...), if known."""

    size: int | None
    stamp: str | None


class PipeFailedError(Exception):
    """A ``pipe:`` command failed or its output ended early; the reader re-runs it (retry reason ``pipe``)."""


def transient_reason(error: BaseException) -> str | None:
    """The retry reason for a transient error (``"connection"``, ``"timeout"``, ``"http_503"``...), else None.

    Missing files, permission errors and HTTP 4xx other than 408/425/429 are not transient.
    """
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return None
    if isinstance(error, PipeFailedError):
        return "pipe"
    status = getattr(error, "status", None) or getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return f"http_{status}" if status in _TRANSIENT_STATUS else None
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, fsspec.exceptions.FSTimeoutError)):
        return "timeout"
    if isinstance(error, (ConnectionError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return "connection"
    if isinstance(error, aiohttp.ClientError):
        return "client_error"
    return None


class RangeReader(io.RawIOBase):
    """A seekable, read-only file over ``length`` bytes that ``fetch(lo, hi)`` returns piece by piece.

    Reads are served from one block of at least ``block_size`` bytes fetched at the read position, so a
    forward scan costs one fetch per block and a seek to the end (a parquet footer) fetches only the tail.
    """

    def __init__(
        self,
        name: str,
        fetch: Callable[[int, int], bytes],
        length: int,
        block_size: int,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.name, self._fetch, self._length, self._block_size = name, fetch, length, block_size
        self._pos, self._block_start, self._block, self._on_close = 0, 0, b"", on_close

    def close(self) -> None:
        if not self.closed and self._on_close is not None:
            self._on_close()
        self._block = b""
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.name}: negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._length or not len(view):
            return 0
        offset = self._pos - self._block_start
        if not 0 <= offset < len(self._block):
            want = min(max(len(view), self._block_size), self._length - self._pos)
            self._block_start, self._block, offset = self._pos, self._fetch(self._pos, self._pos + want), 0
        count = min(len(view), len(self._block) - offset)
        view[:count] = self._block[offset : offset + count]
        self._pos += count
        return count


class PipeReader(io.RawIOBase):
    """Forward-only reader of a ``pipe:`` command's output (bytes ``[start, end)``), through webdataset's
    ``gopen``. A failed command (non-zero exit, or output shorter than ``end``) is re-run and its output
    discarded up to where it failed, each re-run counted as a retry; after ``max_attempts`` runs it
    raises ``ShardReadError``."""

    def __init__(self, url: str, start: int, end: int | None, retrying: Retrying) -> None:
        super().__init__()
        self.name, self._end, self._retrying = url, end, retrying
        self._pos, self._pipe = start, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        limit = len(view) if self._end is None else min(len(view), self._end - self._pos)
        if limit <= 0:
            return 0
        data = self._retrying(self.name, f"bytes {self._pos}-", lambda: self._read(limit))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _read(self, limit: int) -> bytes:
        try:
            if self._pipe is None:
                self._pipe = webdataset.gopen(self.name, "rb")
                _discard(self._pipe, self._pos, self.name)
            data = self._pipe.read(limit)
            if not data:
                pipe, self._pipe = self._pipe, None
                pipe.close()  # raises OSError on a non-zero exit status
                if self._end is not None and self._pos < self._end:
                    raise ConnectionError(
                        f"{self.name}: output ended at byte {self._pos}, before {self._end}"
                    )
            return data
        except OSError as error:
            self._drop_pipe()
            raise PipeFailedError(f"{self.name}: {error}") from error

    def _drop_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.ignore_errors = True  # the command is abandoned: its exit status no longer matters
            if pipe.proc.poll() is None:
                pipe.proc.kill()  # else closing waits for it (webdataset's Pipe waits up to two hours)
            pipe.close()

    def close(self) -> None:
        if not self.closed:
            self._drop_pipe()
        super().close()


def _discard(stream: IO[bytes], count: int, name: str) -> None:
    """Read and drop the first ``count`` bytes of a forward-only ``stream``."""
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError(f"{name}: output ended with {count} bytes still to skip")
        count -= len(chunk)


@dataclass
class ShardIO:
    """How shards are opened: retry policy, range-read block size and an optional local cache.

    ``retries`` counts this process's retries by reason: each DataLoader worker counts its own. With
    ``cache_dir``, remote shards opened whole are downloaded there once (at most ``cache_max_bytes``
    in all, least recently used evicted first; a bigger shard is streamed).
    """

    max_attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    cache_dir: str | None = None
    cache_max_bytes: int | None = None
    block_size: int = 8 << 20
    _retries: Counter[str] = field(default_factory=Counter, init=False, compare=False, repr=False)
    _pid: int | None = field(default_factory=os.getpid, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.block_size < 1:
            raise ValueError(f"max_attempts={self.max_attempts} and block_size={self.block_size}: both >= 1")

    @property
    def retries(self) -> Counter[str]:
        """Retries by reason in this process (a forked or unpickled copy starts from zero)."""
        if self._pid != os.getpid():
            self._retries, self._pid = Counter(), os.getpid()
        return self._retries

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None}

    def open(
        self, url: str, start: int = 0, end: int | None = None, stats: RecordStats | None = None
    ) -> IO[bytes]:
        """A binary file over bytes ``[start, end)`` of the shard ``url`` (to its end when ``end`` is None).

        Local and fsspec files are seekable (positions relative to ``start``); ``pipe:`` commands are
        forward-only. Retries are counted in ``self.retries`` and in ``stats`` when given. Raises
        ``FileNotFoundError`` naming the shard when it does not exist, ``ShardReadError`` when it could
        not be read after ``max_attempts`` tries.
        """
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"{url}: bad byte range [{start}, {end})")
        retrying = self._retrier(stats)
        if url.startswith("pipe:"):
            return PipeReader(url, start, end, retrying)
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            return self._open_local(url, path, start, end)
        if self.cache_dir is not None and start == 0 and end is None:
            cached = self._cached(url, lambda: self._remote_range(url, fs, path, 0, None, retrying))
            if cached is not None:
                return cached
        return self._remote_range(url, fs, path, start, end, retrying)

    def stamp(self, url: str) -> ShardStamp:
        """Size and version stamp of a shard: local mtime_ns; remote ETag, else Last-Modified/mtime;
        ``pipe:`` neither (``ShardStamp(None, None)``)."""
        if url.startswith("pipe:"):
            return ShardStamp(None, None)
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            try:
                status = os.stat(path)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"Shard not found: {url}") from error
            return ShardStamp(status.st_size, str(status.st_mtime_ns))
        info = self._retrier(None)(url, "info", lambda: _info(fs, path, url))
        stamp = next((info[key] for key in _STAMP_KEYS if info.get(key) is not None), None)
        return ShardStamp(info.get("size"), None if stamp is None else str(stamp))

    def _retrier(self, stats: RecordStats | None) -> Retrying:
        def retrying(url: str, what: str, call: Callable[[], T]) -> T:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    return call()
                except Exception as error:
                    reason = transient_reason(error)
                    if reason is None:
                        raise
                    if attempt == self.max_attempts:
                        raise ShardReadError(
                            f"{url} ({what}): still failing after {attempt} attempts; last error: "
                            f"{error!r}. Check that the URL is reachable, or raise ShardIO.max_attempts."
                        ) from error
                    self.retries[reason] += 1
                    if stats is not None:
                        stats.count_retry(reason)
                    time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            raise AssertionError("unreachable")

        return retrying

    def _open_local(self, url: str, path: str, start: int, end: int | None) -> IO[bytes]:
        try:
            file = open(path, "rb")  # noqa: SIM115 -- returned to the caller
        except FileNotFoundError as error:
            raise FileNotFoundError(f"Shard not found: {url}") from error
        if start == 0 and end is None:
            return file
        size = os.fstat(file.fileno()).st_size
        end = size if end is None else min(end, size)

        def fetch(lo: int, hi: int) -> bytes:
            return os.pread(file.fileno(), hi - lo, start + lo)

        return RangeReader(url, fetch, max(end - start, 0), min(self.block_size, 1 << 20), file.close)

    def _remote_range(
        self, url: str, fs: Any, path: str, start: int, end: int | None, retrying: Retrying
    ) -> RangeReader:
        """Bytes ``[start, end)`` of a remote file, read by retried range requests (its size first)."""
        size = retrying(url, "info", lambda: _info(fs, path, url)).get("size")
        if size is None:
            raise ShardReadError(
                f"{url}: the server does not report the file size; cannot read it by ranges."
            )
        end = size if end is None else min(end, size)

        def fetch(lo: int, hi: int) -> bytes:
            lo, hi = start + lo, start + hi
            return retrying(url, f"bytes {lo}-{hi}", lambda: _cat(fs, path, url, lo, hi))

        return RangeReader(url, fetch, max(end - start, 0), self.block_size)

    def _cached(self, url: str, remote_file: Callable[[], RangeReader]) -> IO[bytes] | None:
        """The local copy of ``url`` (downloaded from ``remote_file()`` if missing: no request when it
        is not), or None when the shard is bigger than the cap."""
        folder = Path(self.cache_dir)
        local = folder / (hashlib.sha256(url.encode()).hexdigest()[:32] + "-" + url.rsplit("/", 1)[-1])
        with contextlib.suppress(FileNotFoundError):
            file = open(local, "rb")  # noqa: SIM115 -- returned to the caller
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: the open file still reads
                _touch(local)
            return file
        remote = remote_file()
        size = remote.seek(0, io.SEEK_END)
        remote.seek(0)
        if self.cache_max_bytes is not None and size > self.cache_max_bytes:
            remote.close()
            return None
        folder.mkdir(parents=True, exist_ok=True)
        if self.cache_max_bytes is not None:
            _evict(folder, self.cache_max_bytes - size)
        temporary = folder / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(temporary, "wb") as out:
                shutil.copyfileobj(remote, out, self.block_size)
            os.replace(temporary, local)
            _touch(local)
        finally:
            temporary.unlink(missing_ok=True)
            remote.close()
        return open(local, "rb")


DEFAULT_SHARD_IO = ShardIO()
"""What readers use when no ``RecordSpan`` names a ``ShardIO``: default retries, no cache."""


def _touch(path: Path) -> None:
    """Mark a cached shard most recently used: its mtime is the LRU clock. ``time.time_ns()``, not the
    kernel's file-time clock, which only ticks every few milliseconds (two opens would tie)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _evict(folder: Path, budget: int) -> None:
    """Delete the least recently used cached shards until the rest take at most ``budget`` bytes."""
    entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".tmp-")]
    files = sorted((stat.st_mtime_ns, stat.st_size, Path(e.path)) for e in entries for stat in [e.stat()])
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= budget:
            break
        path.unlink(missing_ok=True)
        total -= size


def _info(fs: Any, path: str, url: str) -> dict[str, Any]:
    try:
        return fs.info(path)
    except FileNotFoundError as error:
        # fsspec's HTTP ``info`` reports every failure as FileNotFoundError, from the real error.
        if error.__cause__ is not None and transient_reason(error.__cause__) is not None:
            raise error.__cause__  # noqa: B904 -- the transient cause is what the retry loop judges
        raise FileNotFoundError(f"Shard not found: {url}") from error


def _cat(fs: Any, path: str, url: str, lo: int, hi: int) -> bytes:
    """Bytes ``[lo, hi)`` of a remote file; a response of another length is an error (retried when short)."""
    try:
        data = fs.cat_file(path, start=lo, end=hi)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Shard not found: {url}") from error
    if len(data) < hi - lo:
        raise ConnectionError(f"short read: {len(data)} of {hi - lo} bytes")
    if len(data) > hi - lo:
        raise ShardReadError(
            f"{url}: the server ignored the Range request (sent {len(data)} bytes for {hi - lo}); "
            "serve the shards from a server with HTTP range support, or read them through a pipe: URL."
        )
    return data


__all__ = [
    "DEFAULT_SHARD_IO",
    "PipeFailedError",
    "PipeReader",
    "RangeReader",
    "ShardIO",
    "ShardReadError",
    "ShardStamp",
    "transient_reason",
]
