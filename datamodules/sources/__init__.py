"""Dataset readers (one module per on-disk format) and ``iter_samples``, the way to stream any of them.

``iter_samples(source, urls, **options)`` expands ``urls`` (paths, globs, brace patterns such as
``shard-{0000..0099}.tar``, URLs, ``pipe:`` commands) into shards and streams their ``Sample``s in
order; skipped records and retried reads are counted on the returned iterator's ``.stats``. Sample
keys are ``"<shard name>#<record key>"``, the shard named relative to the shards' root (``shard_names``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import braceexpand
import fsspec

from datamodules.sample import Sample
from datamodules.sources.base import READERS, RecordStats, get_reader, read_shard, register, shard_names

_GLOB_CHARS = set("*?[")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from paths, globs, brace patterns, URLs and ``pipe:`` commands, in the given order
    (globs sorted; their wildcards do not match hidden names).

    A local pattern that matches nothing, or a local path that does not exist, raises
    ``FileNotFoundError`` with the pattern: a typo fails fast instead of streaming nothing. Remote URLs
    (``https://``, ``s3://``, ``hf://``...) without a glob and ``pipe:`` commands (brace patterns
    expanded, globs left to the shell) are kept as they are: they are checked when opened.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    shards: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            scheme = url.split("://", 1)[0] if "://" in url else ""
            if url.startswith("pipe:") or (
                scheme not in ("", "file") and (scheme in ("http", "https") or not _GLOB_CHARS & set(url))
            ):
                shards.append(url)  # remote: existence is checked when the shard is opened
                continue
            fs, path = fsspec.core.url_to_fs(url)
            if _GLOB_CHARS & set(path):
                # like a shell, wildcards skip hidden names (e.g. the .shard-index folders)
                written = set(path.split("/"))
                matches = sorted(
                    match
                    for match in fs.glob(path)
                    if not any(part.startswith(".") and part not in written for part in match.split("/"))
                )
                if not matches:
                    raise FileNotFoundError(f"No shard matches {url!r}.")
                protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
                shards += [protocol + match if protocol else match for match in matches]
            elif not fs.exists(path):
                raise FileNotFoundError(f"Shard not found: {url}")
            else:
                shards.append(url)
    return shards


class SampleStream(Iterator[Sample]):
    """An iterator of ``Sample`` with the ``stats`` (``RecordStats``) of what it read and skipped."""

    def __init__(self, source: str, shards: list[str], options: dict) -> None:
        self.source, self.shards, self.stats = source, shards, RecordStats()
        reader = get_reader(source)
        self._samples = (
            sample
            for shard, name in zip(shards, shard_names(shards))
            for sample in read_shard(reader, shard, name, self.stats, **options)
        )

    def __next__(self) -> Sample:
        return next(self._samples)


def iter_samples(source: str, urls: str | Sequence[str], **options) -> SampleStream:
    """Stream the ``Sample``s of ``source`` (see ``READERS``) from ``urls``; ``options`` go to the reader."""
    get_reader(source)
    return SampleStream(source, expand_urls(urls), options)


# Importing the reader modules registers them in READERS.
from datamodules.sources import (  # noqa: E402, F401
    conversations,
    laion_coco,
    obelics,
    pdf_documents,
    questions,
    rendered_text,
)

__all__ = [
    "READERS",
    "RecordStats",
    "Sample",
    "SampleStream",
    "expand_urls",
    "iter_samples",
    "read_shard",
    "register",
    "shard_names",
]
