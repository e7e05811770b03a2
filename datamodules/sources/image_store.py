"""Image stores: where readers of URL-only datasets (OBELICS and LAION-COCO parquet) get image bytes.

The hub parquet files of OBELICS and LAION-COCO hold image URLs, not bytes. A reader resolves each
URL with ``store.get(url)``, which returns the bytes or ``None`` when the image is not available
(never downloaded, dead link, timeout); the reader counts ``None`` as ``missing_image``.

- ``LocalImageStore(root)``: the output directory of an img2dataset run over those URLs (shards
  ``00000.tar`` + ``00000.parquet``, docs/DATA_FORMATS.md §2) -- the reproducible way to train.
- ``HttpImageStore(...)``: fetch on the fly with timeouts, retries and an on-disk cache.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageStore(Protocol):
    """Anything that maps an image URL to its bytes, or ``None`` when it has no such image."""

    def get(self, url: str) -> bytes | None: ...


class LocalImageStore:
    """Image bytes from an img2dataset output directory, looked up by the URL they were downloaded from.

    The url -> (tar, key) index is built on first use from the ``*.parquet`` files next to the tars
    (rows with ``status == "success"``), so constructing a store is free and each dataloader worker
    builds its own. Tar member offsets are indexed per tar on first access, then read directly.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image store directory not found: {self.root}")
        self._index: dict[str, tuple[Path, str]] | None = None
        self._tars: dict[Path, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def __getstate__(self) -> dict:
        """Pickle (e.g. to spawned dataloader workers) without the open tars and the index."""
        return {**self.__dict__, "_index": None, "_tars": {}}

    def _build_index(self) -> dict[str, tuple[Path, str]]:
        index: dict[str, tuple[Path, str]] = {}
        for parquet in sorted(self.root.glob("*.parquet")):
            table = pq.read_table(parquet, columns=["url", "key", "status"]).to_pydict()
            tar = parquet.with_suffix(".tar")
            for url, key, status in zip(table["url"], table["key"], table["status"]):
                if status == "success" and url is not None:
                    index.setdefault(url, (tar, key))
        return index

    def _members(self, tar: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if tar not in self._tars:
            archive = tarfile.open(tar)  # noqa: SIM115 -- kept open for the next lookups
            images = {}
            for info in archive.getmembers():
                key, _, extension = info.name.rpartition(".")
                if info.isreg() and extension.lower() in IMAGE_EXTENSIONS:
                    images[key] = info
            self._tars[tar] = (archive, images)
        return self._tars[tar]

    def get(self, url: str) -> bytes | None:
        """The bytes of the image downloaded from ``url``, or ``None`` if img2dataset did not get it."""
        if self._index is None:
            self._index = self._build_index()
        if url not in self._index:
            return None
        tar, key = self._index[url]
        try:
            archive, images = self._members(tar)
        except (OSError, tarfile.TarError) as error:
            logger.warning("Image store tar %s unreadable: %r", tar, error)
            return None
        if key not in images:
            return None
        return archive.extractfile(images[key]).read()


class HttpImageStore:
    """Image bytes fetched over HTTP(S), with a timeout, retries with exponential backoff, and a cache.

    A 4xx answer (except 408/429) is final: the image is missing. Timeouts, connection errors and
    5xx answers are retried ``retries`` times, waiting ``backoff * 2**attempt`` seconds. Successful
    downloads are kept in ``cache_dir`` (file name = sha256 of the URL), so a second epoch or a
    restarted run does not download again. Only ``http``/``https`` URLs are fetched.
    """

    def __init__(
        self,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.5,
        cache_dir: str | os.PathLike | None = None,
        user_agent: str = "vlm-datamodules/1.0",
    ) -> None:
        self.timeout, self.retries, self.backoff, self.user_agent = timeout, retries, backoff, user_agent
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def cache_path(self, url: str) -> Path | None:
        """Where the image of ``url`` is cached (``None`` without a cache)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / hashlib.sha256(url.encode()).hexdigest()

    def get(self, url: str) -> bytes | None:
        """The bytes at ``url`` (from the cache if there), or ``None`` when it cannot be fetched."""
        cached = self.cache_path(url)
        if cached is not None and cached.exists():
            return cached.read_bytes()
        if not url.startswith(("http://", "https://")):
            return None
        data = self._download(url)
        if data is not None and cached is not None:
            with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, cached)  # atomic: concurrent workers never read a partial file
        return data

    def _download(self, url: str) -> bytes | None:
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                if 400 <= error.code < 500 and error.code not in (408, 429):
                    return None
                failure: Exception = error
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
                failure = error
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        logger.debug("Giving up on %s after %d attempts: %r", url, self.retries + 1, failure)
        return None
