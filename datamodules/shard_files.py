"""Writing shards in the layouts the hub and m4 use: webdataset tars and HF-schema parquet files.

Shared by the synthetic writers (``synthetic_web``, ``synthetic_docs``) and by tests that craft
bad shards.
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


def write_tar(path: Path, records: Iterable[tuple[str, dict[str, bytes]]], dot_slash: bool = False) -> Path:
    """A webdataset tar of ``(key, {suffix: bytes})`` records, suffixes sorted as ``TarWriter`` does.

    ``dot_slash`` reproduces m4's ``tar --sort=name -C dir .``: a ``./`` directory entry first and
    ``./``-prefixed member names, all sorted by name.
    """
    members = [
        (f"{key}.{suffix}", data) for key, record in records for suffix, data in sorted(record.items())
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        if dot_slash:
            tar.addfile(_dir_info())
            members = sorted((f"./{name}", data) for name, data in members)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            tar.addfile(info, io.BytesIO(data))
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
