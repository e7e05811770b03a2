"""OBELICS interleaved web documents (reader ``"obelics"``), from the hub parquet or m4 web-document tars.

- Hub parquet (docs/DATA_FORMATS.md §1): columns ``images`` (URL or null), ``texts`` (text or null),
  ``metadata`` (JSON list, a dict per image) and ``general_metadata`` (JSON dict of the page, or ``[]``
  in dirty rows). Images are URLs, resolved through ``image_store`` (``image_store.py``).
- m4 web-document tars (§7.1): ``./{id}.{i}.text.txt``, ``./{id}.{i}.image.jpeg`` and
  ``./{id}.metadata.txt`` listing the member names; a record is valid only when ``metadata.txt``
  exists, is non-empty and every listed name is present (else ``missing_members``).

``END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED`` survives inside the texts (it replaced "read more" links of
blog index pages that concatenate several posts). As m4's packing does (``split_pack_and_pad_webdocs``),
it is a document boundary: the text before it closes the current sub-document, the text after it
starts the next, and sub-documents without any image are dropped, counted as
``filtered:no_image_after_split`` (a whole document without image: ``filtered:no_image``).
Filters (per sub-document, before any image is fetched): ``max_images_per_document``
(``filtered:too_many_images``) and the OBELICS perplexity filter, ``perplexity_scorer(text) >
max_perplexity`` (``filtered:perplexity``; the paper used a KenLM model with 1500).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.image_store import ImageStore
from datamodules.sources.records import (
    BadRecord,
    RecordSpan,
    decode_image,
    decode_text,
    iter_tar_groups,
    open_parquet,
    parquet_rows,
    parse_json,
    shard_format,
)

END_OF_DOCUMENT = "END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED"
PARQUET_COLUMNS = ("images", "metadata", "general_metadata", "texts")


@dataclass
class ImageNode:
    """An image position of a document: its bytes (tars) or its URL and metadata dict (parquet)."""

    data: bytes | None = None
    url: str | None = None
    info: dict = field(default_factory=dict)


Node = str | ImageNode


def split_documents(nodes: list[Node]) -> list[list[Node]]:
    """Cut a document at every ``END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED`` (see the module docstring).

    Text around a marker is stripped; empty texts and empty sub-documents disappear.
    """
    documents: list[list[Node]] = [[]]
    for node in nodes:
        if isinstance(node, str) and END_OF_DOCUMENT in node:
            *closing, node = (part.strip() for part in node.split(END_OF_DOCUMENT))
            for part in closing:
                documents[-1] += [part] if part else []
                documents.append([])
        if node:
            documents[-1].append(node)
    return [document for document in documents if document]


class _DocumentFilter:
    """Splits a document, applies the filters and fetches/decodes the images of what is kept."""

    def __init__(
        self,
        stats: RecordStats,
        image_store: ImageStore | None,
        perplexity_scorer: Callable[[str], float] | None,
        max_perplexity: float | None,
        max_images_per_document: int | None,
        drop_bad_images: bool,
    ) -> None:
        if (perplexity_scorer is None) != (max_perplexity is None):
            raise ValueError("The perplexity filter needs both perplexity_scorer and max_perplexity.")
        self.stats, self.store = stats, image_store
        self.scorer, self.max_perplexity = perplexity_scorer, max_perplexity
        self.max_images, self.drop_bad_images = max_images_per_document, drop_bad_images

    def samples(self, key: str, nodes: list[Node], meta: dict) -> Iterator[Sample]:
        documents = split_documents(nodes)
        for part, document in enumerate(documents):
            part_key = key + (f"/{part}" if len(documents) > 1 else "")
            try:
                content, images = self._content(document, split=len(documents) > 1)
            except BadRecord as bad:
                self.stats.skip(bad.reason)
                continue
            if "url" in meta:  # parquet: the URL and metadata dict of each image kept
                meta = {
                    **meta,
                    "image_urls": [node.url for node in images],
                    "images": [node.info for node in images],
                }
            self.stats.ok()
            yield Sample(source="obelics", key=part_key, content=content, meta=meta)

    def _content(self, document: list[Node], split: bool) -> tuple[list[str | Image.Image], list[ImageNode]]:
        """The Sample content of a sub-document and its image nodes kept, or ``BadRecord``."""
        n_images = sum(isinstance(node, ImageNode) for node in document)
        if n_images == 0:
            raise BadRecord("filtered:no_image_after_split" if split else "filtered:no_image")
        if self.max_images is not None and n_images > self.max_images:
            raise BadRecord("filtered:too_many_images")
        if self.scorer is not None:
            text = " ".join(node for node in document if isinstance(node, str))
            if self.scorer(text) > self.max_perplexity:
                raise BadRecord("filtered:perplexity")
        content, kept = [], []
        for node in document:
            if isinstance(node, str):
                content.append(node)
                continue
            try:
                content.append(self._image(node))
                kept.append(node)
            except BadRecord as bad:
                if not self.drop_bad_images:
                    raise
                self.stats.skip(f"dropped_image:{bad.reason}")
        if not kept:
            raise BadRecord("filtered:no_image")
        return content, kept

    def _image(self, node: ImageNode) -> Image.Image:
        data = node.data if node.data is not None else self.store.get(node.url)
        if data is None:
            raise BadRecord("missing_image")
        return decode_image(data)


def _parquet_row(row: dict) -> tuple[list[Node], dict]:
    """Nodes and page meta of one hub-parquet row (``BadRecord`` for null, malformed or bad-JSON rows)."""
    images, texts = row.get("images"), row.get("texts")
    if images is None or texts is None:
        raise BadRecord("null_row")
    if len(images) != len(texts) or any(
        image is not None and text is not None for image, text in zip(images, texts)
    ):
        raise BadRecord("malformed_row")
    page = parse_json(row.get("general_metadata"), {})
    image_meta = parse_json(row.get("metadata"), [])
    if not isinstance(image_meta, list) or len(image_meta) != len(images):
        image_meta = [None] * len(images)
    nodes: list[Node] = [
        ImageNode(url=image, info=info if isinstance(info, dict) else {}) if image is not None else text
        for image, text, info in zip(images, texts, image_meta)
    ]
    return [node for node in nodes if node], {"url": page.get("url") if isinstance(page, dict) else None}


def _tar_nodes(key: str, members: dict[str, bytes]) -> list[Node]:
    """Nodes of one m4 web-document record, checked against its ``metadata.txt``."""
    listing = members.get("metadata.txt", b"").decode("utf-8", errors="replace").split()
    prefix = key.rsplit("/", 1)[-1] + "."
    if not listing or any(
        not name.startswith(prefix) or name[len(prefix) :].lower() not in members for name in listing
    ):
        raise BadRecord("missing_members")
    positions: dict[int, Node] = {}
    for suffix, data in members.items():
        if suffix == "metadata.txt":
            continue
        index, kind, _, extra = [*suffix.split(".", 3), "", ""][:4]
        if not index.isdigit() or kind not in ("text", "image") or extra or int(index) in positions:
            raise BadRecord("unknown_schema")
        positions[int(index)] = ImageNode(data=data) if kind == "image" else decode_text(data)
    return [positions[index] for index in sorted(positions) if positions[index]]


def _read_parquet(
    shard: str, stats: RecordStats, documents: _DocumentFilter, span: RecordSpan | None
) -> Iterator[Sample]:
    if documents.store is None:
        raise ValueError(f"{shard}: OBELICS parquet holds image URLs; pass image_store= to resolve them.")
    with open_parquet(shard, span, stats) as parquet:
        missing = {"images", "texts"} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(
                f"{shard}: not an OBELICS parquet, missing columns {sorted(missing)} "
                f"(expected {list(PARQUET_COLUMNS)}, has {parquet.schema_arrow.names})."
            )
        columns = [name for name in PARQUET_COLUMNS if name in parquet.schema_arrow.names]
        for row_index, row in parquet_rows(parquet, shard, span, columns):
            try:
                nodes, meta = _parquet_row(row)
            except BadRecord as bad:
                stats.skip(bad.reason)
                continue
            yield from documents.samples(str(row_index), nodes, meta)


@register("obelics")
def read_obelics(
    shard: str,
    stats: RecordStats,
    *,
    format: Literal["tar", "parquet"] | None = None,
    image_store: ImageStore | None = None,
    perplexity_scorer: Callable[[str], float] | None = None,
    max_perplexity: float | None = None,
    max_images_per_document: int | None = None,
    drop_bad_images: bool = False,
    span: RecordSpan | None = None,
) -> Iterator[Sample]:
    """Stream interleaved-document Samples (text and images in page order) from one OBELICS shard.

    The format comes from the extension (``.parquet`` / ``.tar``) unless ``format`` is given; parquet
    needs ``image_store``. By default a document with a missing or unreadable image is skipped
    (``missing_image`` / ``corrupt_image``); with ``drop_bad_images=True`` only that image is left out
    (counted ``dropped_image:<reason>``), as m4 did when building its tars, and the document kept if
    an image remains. ``meta``: ``url`` of the page (``id`` for tars) and, from parquet, ``image_urls``
    and ``images`` (the metadata dict of each image, ``{}`` when absent). ``span``: only those records
    (see ``RecordSpan``).
    """
    documents = _DocumentFilter(
        stats, image_store, perplexity_scorer, max_perplexity, max_images_per_document, drop_bad_images
    )
    if shard_format(shard, format) == "parquet":
        yield from _read_parquet(shard, stats, documents, span)
        return
    for key, members in iter_tar_groups(shard, stats, span):
        try:
            nodes = _tar_nodes(key, members)
        except BadRecord as bad:
            stats.skip(bad.reason)
            continue
        yield from documents.samples(key, nodes, {"id": key})
