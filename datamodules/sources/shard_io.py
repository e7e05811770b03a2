"""Placeholder of the shard I/O API (replaced by the remote-shards branch): ranged opens and stamps."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO

import fsspec


@dataclass(frozen=True)
class ShardStamp:
    """Size and content stamp (mtime, ETag) of a shard; ``None`` where unknown (``pipe:``)."""

    size: int | None
    stamp: str | None


@dataclass
class ShardIO:
    """How shards are opened."""

    def open(self, url: str, start: int = 0, end: int | None = None, stats=None) -> IO[bytes]:
        stream = fsspec.open(url, "rb").open()
        stream.seek(start)
        if end is None:
            return stream
        data = stream.read(end - start)
        stream.close()
        return io.BytesIO(data)

    def stamp(self, url: str) -> ShardStamp:
        path = url.removeprefix("file://")
        info = os.stat(path)
        return ShardStamp(info.st_size, str(info.st_mtime_ns))
