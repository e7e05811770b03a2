"""Reader of RenderedText (``wendlerc/RenderedText``, ``"rendered_text"``): photos of rendered handwriting.

Webdataset tars of ``{key}.png`` + ``{key}.json`` (docs/DATA_FORMATS.md §6); the transcription is
``json["ocr_annotation"]["text"]``, a list of lines, joined with ``"\\n"`` as m4 did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.records import BadRecord, RecordSpan, decode_image, iter_tar_groups


@register("rendered_text")
def read_rendered_text(shard: str, stats: RecordStats, span: RecordSpan | None = None) -> Iterator[Sample]:
    """Stream a RenderedText tar: ``content = [image, transcription]``; records without text are dropped
    (``filtered:empty_text``)."""
    for key, members in iter_tar_groups(shard, stats, span):
        if not {"png", "json"} <= members.keys():
            stats.skip("missing_members")
            continue
        try:
            lines = json.loads(members["json"])["ocr_annotation"]["text"]
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                raise TypeError("ocr_annotation.text is not a list of strings")
        except (ValueError, KeyError, TypeError):
            stats.skip("invalid_json")
            continue
        text = "\n".join(lines).strip()
        if not text:
            stats.skip("filtered:empty_text")
            continue
        try:
            image = decode_image(members["png"])
        except BadRecord as bad:
            stats.skip(bad.reason)
            continue
        stats.ok()
        yield Sample(source="rendered_text", key=key, content=[image, text])
