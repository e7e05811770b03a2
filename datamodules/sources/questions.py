"""Reader of a question file: JSON lines ``{"id", "images": [paths], "question", "answer"?}``.

The data of ``python -m lightning predict`` (``VLMDataModule.predict_sources``) when the questions are
not in a training format: one line per question, images by path (relative paths are relative to the
file's folder), the ``answer`` an optional reference. Each line becomes a one-turn ``Sample`` keyed by
its ``id``. A malformed line raises ``ValueError`` naming the file and line rather than being skipped:
a prediction run answers every question it was given or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.shard_io import DEFAULT_SHARD_IO
from vlm.processing.image import load_image


def _image_path(shard: str, path: str) -> str:
    if os.path.isabs(path) or "://" in shard:
        return path
    return os.path.join(os.path.dirname(shard), path)


@register("questions")
def read_questions(shard: str, stats: RecordStats, *, span: None = None) -> Iterator[Sample]:
    """The questions of one JSON-lines file, in order (``span``: this small format is not indexed)."""
    if span is not None:
        raise ValueError(f"{shard}: question files are read whole; use them as predict or val sources.")
    with DEFAULT_SHARD_IO.open(shard) as file:
        lines = file.read().decode("utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{shard}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error}).") from error
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) or "id" not in record:
            raise ValueError(f'{where}: expected {{"id": ..., "question": "...", "images": [paths]}}.')
        paths = record.get("images", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: images must be a list of file paths, got {paths!r}.")
        try:
            images = [load_image(_image_path(shard, path)) for path in paths]
        except (ValueError, OSError) as error:
            raise ValueError(f"{where}: {error}") from error
        answer = record.get("answer") or ""
        stats.ok()
        yield Sample("questions", str(record["id"]), list(images), turns=[(record["question"], answer)])
