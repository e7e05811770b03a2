"""LAION-COCO image-caption pairs (reader ``"laion_coco"``).

Three layouts (docs/DATA_FORMATS.md §2, §7.2):

- img2dataset webdataset shards (``00000.tar``): members ``{key}.jpg`` (or png/webp), ``{key}.json``,
  ``{key}.txt``, 9-digit keys with gaps where downloads failed. The ``.txt`` is the column img2dataset
  was given as ``caption_col``; the ``.json`` keeps it as ``"caption"`` plus ``save_additional_columns``
  (e.g. ``TEXT``, ``punsafe``, ``pwatermark``). ``caption="synthetic"`` takes ``top_caption`` and
  ``caption="alt_text"`` takes ``TEXT`` from the json when present, else the ``.txt`` (which is then
  assumed to be the requested one: run img2dataset with the matching ``caption_col``).
- m4 pair tars: ``./{id}.image.jpeg`` + ``./{id}.text.txt`` (the caption m4 chose; no scores).
- the hub metadata parquet (``URL``, ``TEXT``, ``top_caption``, ``punsafe``, ``pwatermark``...), whose
  images come from an ``image_store`` (see ``image_store.py``).

Tars are streamed by ``records.iter_tar_groups`` (webdataset's grouping rules; a truncated tar
yields the records before the damage and counts ``truncated_tar`` once). Every unreadable image --
zero bytes, corrupt, or a decompression bomb -- counts as ``corrupt_image``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from PIL import Image

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.image_store import IMAGE_EXTENSIONS, ImageStore
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

_CAPTION_COLUMNS = {"synthetic": "top_caption", "alt_text": "TEXT"}


class _Filters:
    """The LAION filters: NSFW and watermark probabilities (rows without a score pass), minimum side."""

    def __init__(self, max_punsafe: float | None, max_pwatermark: float | None, min_image_side: int | None):
        self.max_punsafe, self.max_pwatermark, self.min_image_side = (
            max_punsafe,
            max_pwatermark,
            min_image_side,
        )

    def check_scores(self, row: dict) -> None:
        for limit, column, reason in (
            (self.max_punsafe, "punsafe", "filtered:nsfw"),
            (self.max_pwatermark, "pwatermark", "filtered:watermark"),
        ):
            if limit is not None and row.get(column) is not None and row[column] > limit:
                raise BadRecord(reason)

    def check_image(self, image: Image.Image) -> None:
        if self.min_image_side is not None and min(image.size) < self.min_image_side:
            raise BadRecord("filtered:small_image")


def _pair(key: str, image: Image.Image, caption: str, meta: dict) -> Sample:
    return Sample(source="laion_coco", key=key, content=[image, caption], meta=meta)


def _tar_pair(key: str, members: dict[str, bytes], column: str, filters: _Filters) -> Sample:
    """One record of an img2dataset shard or of an m4 pair tar (told apart by member suffixes)."""
    if "image.jpeg" in members or "text.txt" in members:  # m4 pair tar
        if not {"image.jpeg", "text.txt"} <= members.keys():
            raise BadRecord("missing_members")
        image_bytes, caption, meta = members["image.jpeg"], decode_text(members["text.txt"]), {}
    else:
        image_suffix = next((suffix for suffix in IMAGE_EXTENSIONS if suffix in members), None)
        if image_suffix is None and "json" not in members and "txt" not in members:
            raise BadRecord("unknown_schema")
        meta = parse_json(members.get("json"), {})
        if not isinstance(meta, dict):
            raise BadRecord("invalid_json")
        caption = meta.get(column)
        if caption is None and "txt" in members:
            caption = decode_text(members["txt"])
        if image_suffix is None or caption is None:
            raise BadRecord("missing_members")
        image_bytes = members[image_suffix]
    filters.check_scores(meta)
    image = decode_image(image_bytes)
    filters.check_image(image)
    return _pair(key, image, caption, meta)


def _parquet_pairs(
    shard: str,
    stats: RecordStats,
    column: str,
    store: ImageStore | None,
    filters: _Filters,
    span: RecordSpan | None,
) -> Iterator[Sample]:
    if store is None:
        raise ValueError(f"{shard}: LAION-COCO parquet holds image URLs; pass image_store= to resolve them.")
    with open_parquet(shard, span, stats) as parquet:
        missing = {"URL", column} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(
                f"{shard}: not a LAION-COCO metadata parquet, missing columns {sorted(missing)} "
                f"(has {parquet.schema_arrow.names})."
            )
        for row_index, row in parquet_rows(parquet, shard, span):
            try:
                if row["URL"] is None or row[column] is None:
                    raise BadRecord("null_row")
                filters.check_scores(row)
                data = store.get(row["URL"])
                if data is None:
                    raise BadRecord("missing_image")
                image = decode_image(data)
                filters.check_image(image)
            except BadRecord as bad:
                stats.skip(bad.reason)
                continue
            meta = {
                "url": row["URL"],
                **{key: row[key] for key in ("TEXT", "punsafe", "pwatermark") if key in row},
            }
            stats.ok()
            yield _pair(str(row_index), image, row[column], meta)


@register("laion_coco")
def read_laion_coco(
    shard: str,
    stats: RecordStats,
    *,
    format: Literal["tar", "parquet"] | None = None,
    caption: Literal["synthetic", "alt_text"] = "synthetic",
    image_store: ImageStore | None = None,
    max_punsafe: float | None = None,
    max_pwatermark: float | None = None,
    min_image_side: int | None = None,
    span: RecordSpan | None = None,
) -> Iterator[Sample]:
    """Stream ``[image, caption]`` Samples from one LAION-COCO shard (tar or parquet, by extension).

    ``caption`` picks the BLIP caption (``top_caption``) or the original alt text (``TEXT``). Filters
    drop and count: ``punsafe > max_punsafe`` (``filtered:nsfw``), ``pwatermark > max_pwatermark``
    (``filtered:watermark``), decoded image side ``< min_image_side`` (``filtered:small_image``).
    """
    if caption not in _CAPTION_COLUMNS:
        raise ValueError(f"caption must be one of {sorted(_CAPTION_COLUMNS)}, got {caption!r}.")
    column, filters = _CAPTION_COLUMNS[caption], _Filters(max_punsafe, max_pwatermark, min_image_side)
    if shard_format(shard, format) == "parquet":
        yield from _parquet_pairs(shard, stats, column, image_store, filters, span)
        return
    for key, members in iter_tar_groups(shard, stats, span):
        try:
            sample = _tar_pair(key, members, column, filters)
        except BadRecord as bad:
            stats.skip(bad.reason)
            continue
        stats.ok()
        yield sample
