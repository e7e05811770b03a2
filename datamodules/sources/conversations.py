"""Readers of instruction (SFT) data: The Cauldron, Docmatix, text-only sets, and m4's SFT tars.

Hub parquet (docs/DATA_FORMATS.md §4-6): ``images: list<struct<bytes, path>>`` + ``texts: list<struct<user,
assistant, source>>`` per row (Docmatix's ``pdf`` config has ``pdf: binary`` instead of ``images``),
streamed row group by row group. m4's own SFT tars (§7.3) hold the same rows as
``{id}.{i}.image.jpeg`` / ``{id}.{j}.text.txt`` (JSON turn) / ``{id}.metadata.txt`` members.
Every reader yields ``Sample(content=images, turns=[(user, assistant), ...])``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator

import pyarrow as pa
from PIL import Image

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.pdf_documents import render_pdf
from datamodules.sources.records import (
    BadRecord,
    RecordSpan,
    decode_image,
    iter_tar_groups,
    open_parquet,
    parquet_rows,
)

TEXTS_TYPE = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))
IMAGES_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
CONVERSATION_SCHEMA = pa.schema([("images", IMAGES_TYPE), ("texts", TEXTS_TYPE)])
DOCMATIX_PDF_SCHEMA = pa.schema([("pdf", pa.binary()), ("texts", TEXTS_TYPE)])


def iter_parquet_rows(
    shard: str, schemas: list[pa.Schema], span: RecordSpan | None = None, stats: RecordStats | None = None
) -> Iterator[tuple[pa.Schema, int, dict]]:
    """``(schema, row index, row)`` for each row of a parquet shard (or of ``span``), one row group in
    memory at a time.

    The file's columns and Arrow types must equal one of ``schemas`` (list field names aside): another
    schema means the shard belongs to another dataset or config, and raises ``ValueError`` naming the
    shard, the expected and the found columns.
    """
    with open_parquet(shard, span, stats) as file:
        found = file.schema_arrow
        schema = next((s for s in schemas if found.remove_metadata().equals(s)), None)
        if schema is None:
            expected = " or ".join(str(dict(zip(s.names, map(str, s.types)))) for s in schemas)
            raise ValueError(
                f"{shard}: unexpected parquet schema; expected columns {expected}, "
                f"found {dict(zip(found.names, map(str, found.types)))}."
            )
        for index, row in parquet_rows(file, shard, span):
            yield schema, index, row


def _turns(texts: list | None, max_turn_chars: int | None) -> list[tuple[str, str]]:
    """The (user, assistant) pairs of a ``texts`` cell; raises ``BadRecord`` for null or over-long turns."""
    if not texts or any(t is None or t["user"] is None or t["assistant"] is None for t in texts):
        raise BadRecord("null_row")
    if max_turn_chars is not None and any(
        len(t["user"]) > max_turn_chars or len(t["assistant"]) > max_turn_chars for t in texts
    ):
        raise BadRecord("filtered:long_turn")
    return [(t["user"], t["assistant"]) for t in texts]


def _decode(images: list[bytes | None]) -> list[Image.Image]:
    """Decoded images; raises ``BadRecord`` for a null or undecodable one."""
    if any(data is None for data in images):
        raise BadRecord("null_row")
    return [decode_image(data) for data in images]


def _row_images(schema: pa.Schema, row: dict, dpi: float, max_side: int | None) -> list[Image.Image]:
    """A parquet row's images: the ``images`` cell decoded, or the ``pdf`` cell rendered page by page."""
    if schema is DOCMATIX_PDF_SCHEMA:
        if row["pdf"] is None:
            raise BadRecord("null_row")
        try:
            page_count, render = render_pdf(row["pdf"], dpi, max_side, grayscale=False)
        except ValueError as error:
            raise BadRecord("corrupt_pdf") from error
        return [render(index) for index in range(page_count)]
    if row["images"] is None:
        raise BadRecord("null_row")
    return _decode([None if image is None else image["bytes"] for image in row["images"]])


def _read_parquet(
    shard: str,
    stats: RecordStats,
    source: str,
    schemas: list[pa.Schema],
    max_turn_chars: int | None,
    dpi: float = 150,
    max_side: int | None = None,
    span: RecordSpan | None = None,
) -> Iterator[Sample]:
    """Shared body of the parquet readers: one ``Sample`` per row, bad rows counted by reason."""
    subset = posixpath.basename(posixpath.dirname(shard.rstrip("/")))
    for schema, index, row in iter_parquet_rows(shard, schemas, span, stats):
        try:
            turns = _turns(row["texts"], max_turn_chars)
            images = _row_images(schema, row, dpi, max_side)
        except BadRecord as bad:
            stats.skip(bad.reason)
            continue
        stats.ok()
        meta = {"subset": subset, "source": row["texts"][0]["source"]}
        yield Sample(source=source, key=str(index), content=list(images), turns=turns, meta=meta)


@register("cauldron")
def read_cauldron(
    shard: str, stats: RecordStats, max_turn_chars: int | None = None, span: RecordSpan | None = None
) -> Iterator[Sample]:
    """Stream one Cauldron parquet file; ``meta["subset"]`` is its directory (``ai2d``, ``vqav2``...)."""
    yield from _read_parquet(shard, stats, "cauldron", [CONVERSATION_SCHEMA], max_turn_chars, span=span)


@register("text")
def read_text(
    shard: str, stats: RecordStats, max_turn_chars: int | None = None, span: RecordSpan | None = None
) -> Iterator[Sample]:
    """Stream text-only instruction data stored in the Cauldron schema with ``images = []``."""
    yield from _read_parquet(shard, stats, "text", [CONVERSATION_SCHEMA], max_turn_chars, span=span)


@register("docmatix")
def read_docmatix(
    shard: str,
    stats: RecordStats,
    max_turn_chars: int | None = 500,
    dpi: float = 150,
    max_side: int | None = None,
    span: RecordSpan | None = None,
) -> Iterator[Sample]:
    """Stream one Docmatix parquet file of either config: ``images`` (pages as images) or ``pdf``
    (whole PDF, rendered here at ``dpi``/``max_side``). Rows with a turn longer than ``max_turn_chars``
    on either side are dropped as m4 did (``filtered:long_turn``; ``None`` keeps them)."""
    schemas = [CONVERSATION_SCHEMA, DOCMATIX_PDF_SCHEMA]
    yield from _read_parquet(shard, stats, "docmatix", schemas, max_turn_chars, dpi, max_side, span)


@register("m4_sft")
def read_m4_sft(
    shard: str, stats: RecordStats, max_turn_chars: int | None = None, span: RecordSpan | None = None
) -> Iterator[Sample]:
    """Stream one of m4's SFT tars (§7.3): images ``{id}.{i}.image.jpeg`` then JSON turns
    ``{id}.{n_img + j}.text.txt``. A record is valid only if all the files that its ``metadata.txt``
    lists are present (``missing_members`` otherwise)."""
    for key, members in iter_tar_groups(shard, stats, span):
        listed = members.get("metadata.txt", b"").decode("utf-8", "replace").split()
        if not listed or any(name.partition(".")[2] not in members for name in listed):
            stats.skip("missing_members")
            continue
        try:
            positions = sorted((int(s.split(".")[0]), s) for s in members if s != "metadata.txt")
            texts = [json.loads(members[s]) for _, s in positions if s.endswith(".text.txt")]
            turns = _turns(texts, max_turn_chars)
            images = _decode([members[s] for _, s in positions if s.endswith(".image.jpeg")])
        except (ValueError, KeyError, TypeError):
            stats.skip("invalid_json")
            continue
        except BadRecord as bad:
            stats.skip(bad.reason)
            continue
        stats.ok()
        meta = {"source": texts[0]["source"]}
        yield Sample(source="m4_sft", key=key, content=list(images), turns=turns, meta=meta)
