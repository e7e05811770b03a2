"""Decoding helpers every reader shares: webdataset-style tar grouping, JSON, text, images.

Each raises ``BadRecord(reason)`` on bad data so a reader can skip the record and count the
reason in its ``RecordStats``; shard-level damage (unreadable or truncated tar) is counted here.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from typing import Literal

from PIL import Image

from datamodules.sources.base import RecordStats, open_shard
from vlm.processing.image import load_image

_WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class BadRecord(Exception):
    """Raised while building a record to skip it; ``reason`` is what ``RecordStats`` counts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes with ``load_image``; unreadable data raises ``BadRecord("corrupt_image")``."""
    try:
        return load_image(data)
    except ValueError as error:
        raise BadRecord("corrupt_image") from error


def iter_tar_groups(shard: str, stats: RecordStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The records of a (possibly compressed) tar shard as ``(key, {suffix: bytes})``, in tar order.

    Follows webdataset: a leading ``./`` is dropped, the key ends at the first dot of the basename,
    suffixes are lower-cased, directories are skipped. A record whose suffix repeats is skipped as
    ``duplicate_member``; a member without a suffix as ``unknown_schema``. A tar that cannot be read
    from the start counts as ``corrupt_tar``; damage later counts once as ``truncated_tar`` and ends
    the shard (the incomplete record is lost). A tar cut exactly between two members cannot be told
    from a complete one; its last record then usually fails its reader's missing-member check.
    """
    with open_shard(shard) as stream:
        key, members, duplicate, started = None, {}, False, False
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as archive:
                started = True
                for info in archive:
                    if not info.isreg():
                        continue
                    match = _WEBDATASET_KEY.match(info.name.removeprefix("./"))
                    if match is None:
                        stats.skip("unknown_schema")
                        continue
                    if match[1] != key:
                        if key is not None:
                            yield from _close_group(key, members, duplicate, stats)
                        key, members, duplicate = match[1], {}, False
                    suffix = match[2].lower()
                    duplicate = duplicate or suffix in members
                    members[suffix] = archive.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError):
            stats.skip("truncated_tar" if started else "corrupt_tar")
            return
        if key is not None:
            yield from _close_group(key, members, duplicate, stats)


def _close_group(
    key: str, members: dict[str, bytes], duplicate: bool, stats: RecordStats
) -> Iterator[tuple[str, dict[str, bytes]]]:
    if duplicate:
        stats.skip("duplicate_member")
    else:
        yield key, members


def shard_format(shard: str, format: str | None) -> Literal["tar", "parquet"]:
    """``format`` if given, else ``"parquet"`` or ``"tar"`` from the shard's extension (``.tar.gz`` too)."""
    format = format or (
        "parquet" if shard.endswith(".parquet") else "tar" if re.search(r"\.tar(\.\w+)?$", shard) else None
    )
    if format not in ("tar", "parquet"):
        raise ValueError(
            f"{shard}: cannot tell the format from the extension; pass format='tar' or 'parquet'."
        )
    return format


def parse_json(data: bytes | str | None, default: object = None) -> object:
    """The JSON value of ``data`` (``default`` for ``None``); bad JSON raises ``BadRecord("invalid_json")``"""
    if data is None:
        return default
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRecord("invalid_json") from error


def decode_text(data: bytes) -> str:
    """UTF-8 text of a tar member; undecodable bytes raise ``BadRecord("corrupt_text")``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord("corrupt_text") from error
