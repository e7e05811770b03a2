"""Shard index: how many records each shard holds and where each one starts, so streams can seek.

Per shard (``ShardIndex``): the format, the size and a content stamp (mtime, ETag) taken when it was
indexed, the record count and, for tars, the byte offset of each record's first member header plus
the end of the last complete record (a record is a webdataset key group, as ``iter_tar_groups``
groups them); for parquet, the row count of each row group (from the footer only). Damage found
while scanning (``truncated_tar``, ``corrupt_tar``) is kept so readers count it once per pass.

Indexes are cached as JSON: next to a local shard (``<folder>/.shard-index/<name>.json``) when the
folder is writable, else under ``$IDEFICS_LIGHTNING_CACHE/shard-index`` (default
``~/.cache/idefics-lightning``) by a hash of the URL. A cached index whose stamp no longer matches the
shard is rebuilt (the shard changed: positions saved against the old one are refused by the stream,
see ``datamodules.streaming``). Build indexes ahead of a run, with a progress bar::

    python -m datamodules.index 'obelics/{00000..01234}.tar' --workers 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from datamodules.sources import expand_urls
from datamodules.sources.records import RecordSpan, shard_format, webdataset_key
from datamodules.sources.shard_io import ShardIO

INDEX_VERSION = 1
CACHE_ENV = "IDEFICS_LIGHTNING_CACHE"
INDEX_FOLDER = ".shard-index"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_BLOCK = 512
_checked: dict[str, ShardIndex] = {}  # per process: indexes already checked against their shard


@dataclass
class ShardIndex:
    """What a stream needs to address one shard's records without reading the records before them."""

    url: str
    format: Literal["tar", "parquet"]
    size: int | None
    stamp: str | None
    records: int
    offsets: list[int] = field(default_factory=list)  # tar: start of each record, then end of the last
    compressed: bool = False
    row_groups: list[int] = field(default_factory=list)  # parquet: rows per row group
    damage: str | None = None

    def span(self, start: int, stop: int, order: Sequence[int] | None, skip: int, io: ShardIO) -> RecordSpan:
        """The ``RecordSpan`` making a reader yield records ``[start, stop)`` in ``order`` from ``skip``."""
        if self.format == "tar":
            byte_start, byte_end = self.offsets[start], self.offsets[stop]
        else:
            byte_start, byte_end = 0, None
        return RecordSpan(start, stop, byte_start, byte_end, self.compressed, order, skip, io)


def _scan_tar(url: str, io: ShardIO) -> tuple[list[int], bool, str | None]:
    """Record start offsets (+ end of the last complete record), compression, damage of a tar shard."""
    with io.open(url, 0, 6) as stream:  # the magic bytes only (a remote open reads by blocks)
        head = stream.read(6)
    compressed = head.startswith(_COMPRESSED_MAGIC)
    starts: list[int] = []
    key, end, started, damage = None, 0, False, None
    try:
        with io.open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            started = True
            for info in archive:
                parts = webdataset_key(info.name) if info.isreg() else None
                if parts is not None and parts[0] != key:
                    key = parts[0]
                    starts.append(info.offset)
                if info.isreg():
                    end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
    except (tarfile.TarError, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        damage = "truncated_tar" if started else "corrupt_tar"
        if starts:  # the record being read when the damage came is incomplete: it is not a record
            end = starts.pop()
    return [*starts, end] if starts else [], compressed, damage


def build_index(url: str, format: str | None = None, io: ShardIO | None = None) -> ShardIndex:
    """Scan one shard (a tar once, end to end; a parquet file's footer only) into its ``ShardIndex``."""
    io = io or ShardIO()
    kind = shard_format(url, format)
    stamp = io.stamp(url)
    if kind == "parquet":
        with io.open(url) as stream:
            metadata = pq.ParquetFile(stream).metadata
        groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        return ShardIndex(url, kind, stamp.size, stamp.stamp, sum(groups), row_groups=groups)
    offsets, compressed, damage = _scan_tar(url, io)
    records = max(len(offsets) - 1, 0)
    return ShardIndex(url, kind, stamp.size, stamp.stamp, records, offsets, compressed, damage=damage)


def cache_root() -> Path:
    """Where indexes of remote or read-only shards go (``$IDEFICS_LIGHTNING_CACHE/shard-index``)."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/idefics-lightning")).expanduser() / "shard-index"


def index_path(url: str) -> Path:
    """The cache file of ``url``'s index: beside a local shard in a writable folder, else in cache_root."""
    path = url.removeprefix("file://")
    if "://" not in path and not path.startswith("pipe:"):
        folder = Path(path).resolve().parent
        if os.access(folder, os.W_OK):
            return folder / INDEX_FOLDER / f"{Path(path).name}.json"
    return cache_root() / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"


def _read_cached(path: Path, url: str) -> ShardIndex | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.pop("version", None) != INDEX_VERSION or data.get("url") != url:
        return None
    return ShardIndex(**data)


def _write_cached(path: Path, index: ShardIndex) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"version": INDEX_VERSION, **asdict(index)}, separators=(",", ":")))
    os.replace(tmp, path)  # atomic: concurrent builders of the same shard never leave half a file


def load_index(
    url: str, format: str | None = None, io: ShardIO | None = None, rebuild: bool = False
) -> ShardIndex:
    """The index of ``url``: from its cache file when the shard's stamp still matches, else built and cached.

    Shards without a stamp (``pipe:`` URLs) keep their cached index until ``rebuild``.
    """
    io = io or ShardIO()
    path = index_path(url)
    cached = None if rebuild else _read_cached(path, url)
    if cached is not None:
        stamp = io.stamp(url)
        if stamp.stamp is None or (stamp.size, stamp.stamp) == (cached.size, cached.stamp):
            return cached
    index = build_index(url, format, io)
    _write_cached(path, index)
    return index


def checked_index(
    url: str, format: str | None, size: int | None, stamp: str | None, io: ShardIO
) -> ShardIndex:
    """The index of a shard a stream is about to read, checked against the stamp the stream was planned
    with (once per shard and process): a shard changed since is an error naming it, never a wrong seek."""
    index = _checked.get(url)
    if index is None or (index.size, index.stamp) != (size, stamp):
        index = _checked[url] = load_index(url, format, io)
        while len(_checked) > 64:  # a few open shards per worker: keep the memo small
            _checked.pop(next(iter(_checked)))
    if (index.size, index.stamp) != (size, stamp):
        raise RuntimeError(
            f"Shard {url} changed after the data stream was planned (size/stamp {size}/{stamp} then, "
            f"{index.size}/{index.stamp} now): its record positions are no longer valid. Restore the "
            "shard, or start the data stream anew (a new run, or a checkpoint without data position)."
        )
    return index


def index_shards(
    urls: str | Sequence[str],
    format: str | None = None,
    io: ShardIO | None = None,
    workers: int = 4,
    rebuild: bool = False,
    progress: bool = True,
) -> list[ShardIndex]:
    """The indexes of every shard of ``urls`` (patterns expanded), built in ``workers`` threads if missing."""
    shards = expand_urls(urls)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        jobs = pool.map(lambda url: load_index(url, format, io, rebuild), shards)
        return list(tqdm(jobs, total=len(shards), desc="indexing shards", unit="shard", disable=not progress))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m datamodules.index PATTERN...``: build (or check) the indexes of shard sets."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.index", description=__doc__.split("\n")[0])
    parser.add_argument("patterns", nargs="+", help="shard paths, globs, brace patterns or URLs")
    parser.add_argument("--format", choices=["tar", "parquet"], help="when the extension does not say")
    parser.add_argument("--workers", type=int, default=8, help="shards indexed at the same time")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when a valid index is cached")
    args = parser.parse_args(argv)
    indexes = index_shards(args.patterns, args.format, workers=args.workers, rebuild=args.rebuild)
    damaged = [index for index in indexes if index.damage]
    print(f"{len(indexes)} shards, {sum(index.records for index in indexes)} records")
    for index in damaged:
        print(f"  {index.url}: {index.damage} ({index.records} complete records)")


if __name__ == "__main__":
    main()
