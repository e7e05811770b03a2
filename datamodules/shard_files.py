"""Writing shards in the layouts the hub and m4 use: webdataset tars and HF-schema parquet files.

Shared by the synthetic writers (``synthetic_web``, ``synthetic_docs``), the Docmatix-style
generation pipeline (``datamodules.docmatix``) and by tests that craft bad shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset
from PIL import Image

_VALUE = {"dtype": "string", "_type": "Value"}
_TEXTS_FEATURE = [{"user": _VALUE, "assistant": _VALUE, "source": _VALUE}]
# ``huggingface`` features metadata of the Cauldron/Docmatix configs, as written in 2024
# (docs/DATA_FORMATS.md §4-5).
HF_FEATURES = {
    "conversation": {"images": {"feature": {"_type": "Image"}, "_type": "Sequence"}, "texts": _TEXTS_FEATURE},
    "docmatix_pdf": {"pdf": {"dtype": "binary", "_type": "Value"}, "texts": _TEXTS_FEATURE},
}


def write_tar(path: Path, records: Iterable[tuple[str, dict[str, bytes]]], dot_slash: bool = False) -> Path:
    """A webdataset tar of ``(key, {suffix: bytes})`` records, written by webdataset's ``TarWriter``
    (members ``{key}.{suffix}``, suffixes sorted; mtime 0 and no owner names, so the same records
    always give the same bytes).

    ``dot_slash`` reproduces m4's ``tar --sort=name -C dir .``: a ``./`` directory entry first and
    ``./``-prefixed member names, all sorted by name (records sorted by ``key + "."`` then suffix).
    """
    if dot_slash:
        records = sorted(((f"./{key}", record) for key, record in records), key=lambda item: item[0] + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as stream,
        webdataset.TarWriter(stream, user="", group="", mtime=0, encoder=False, format="PAX_FORMAT") as tar,
    ):
        if dot_slash:
            tar.tarstream.addfile(_dir_info())  # TarWriter writes only files; m4's tars begin with "./"
        for key, record in records:
            tar.write({"__key__": key, **record})
    return path


def _dir_info() -> tarfile.TarInfo:
    info = tarfile.TarInfo("./")
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    return info


def write_parquet(
    path: Path, rows: list[dict], schema: pa.Schema, features: dict, rows_per_group: int = 4
) -> Path:
    """A parquet file of ``rows`` with the exact Arrow ``schema`` and the 2024 ``huggingface`` metadata."""
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def hub_parquet_name(folder: Path, index: int, total: int, seed: int) -> Path:
    """``{folder}/train-{i:05d}-of-{n:05d}-{16 hex}.parquet`` as on the hub (hash deterministic here)."""
    digest = hashlib.md5(f"{folder.name}-{index}-{seed}".encode()).hexdigest()[:16]
    return folder / f"train-{index:05d}-of-{total:05d}-{digest}.parquet"


def encode_image(image: Image.Image, image_format: str = "PNG") -> bytes:
    """``image`` encoded as ``image_format`` (``"PNG"``, ``"JPEG"``...): the bytes of an HF ``Image`` cell."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


class ParquetShardWriter:
    """Streams rows into hub-named parquet shards ``{folder}/train-{i:05d}-of-{n:05d}-{16 hex}.parquet``.

    Every ``rows_per_shard`` rows are written to a hidden ``.part-{i:05d}.parquet.tmp`` file (so a
    ``train-*`` glob never sees a partial run); ``close()`` renames the parts once ``n`` is known and
    returns the final paths. A writer that got no row writes one empty shard, so the layout exists.
    """

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        features: dict,
        seed: int = 0,
        rows_per_shard: int = 16,
        rows_per_group: int = 4,
    ) -> None:
        if rows_per_shard < 1 or rows_per_group < 1:
            raise ValueError(
                f"rows_per_shard={rows_per_shard} and rows_per_group={rows_per_group}: both >= 1"
            )
        self.folder, self.schema, self.features, self.seed = Path(folder), schema, features, seed
        self.rows_per_shard, self.rows_per_group = rows_per_shard, rows_per_group
        self._rows: list[dict] = []
        self._parts: list[Path] = []

    def add(self, row: dict) -> None:
        """Buffer one row; a full buffer is written out as the next part."""
        self._rows.append(row)
        if len(self._rows) == self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        part = self.folder / f".part-{len(self._parts):05d}.parquet.tmp"
        self._parts.append(write_parquet(part, self._rows, self.schema, self.features, self.rows_per_group))
        self._rows = []

    def close(self) -> list[Path]:
        """Write the last part (or the one empty shard) and rename every part to its hub name."""
        if self._rows or not self._parts:
            self._flush()
        total = len(self._parts)
        paths = [hub_parquet_name(self.folder, i, total, self.seed) for i in range(total)]
        for part, path in zip(self._parts, paths):
            part.replace(path)
        self._parts = []
        return paths


def write_parquet_shards(
    folder: Path,
    rows: Iterable[dict],
    seed: int,
    schema: pa.Schema,
    features: dict,
    rows_per_shard: int = 16,
    rows_per_group: int = 4,
) -> list[Path]:
    """``rows`` as hub-named parquet shards of ``rows_per_shard`` rows under ``folder`` (see
    ``ParquetShardWriter``); at least one file, empty when ``rows`` is."""
    writer = ParquetShardWriter(folder, schema, features, seed, rows_per_shard, rows_per_group)
    for row in rows:
        writer.add(row)
    return writer.close()
