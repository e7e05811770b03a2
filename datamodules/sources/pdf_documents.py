"""Readers of the pixparse PDF datasets PDFA (``"pdfa"``) and IDL (``"idl"``): page images with OCR text.

Both are webdataset tars of whole documents (docs/DATA_FORMATS.md §3): PDFA ``{key}.pdf`` +
``{key}.json`` with ``pages[].lines.text``; IDL adds ``{key}.tif`` (multi-page render) and
``{key}.ocr``, and its JSON has flat ``pages[].text`` lists (Textract lines). As in m4, documents
are cut into samples of ``pages_per_sample`` pages (1 by default), each page giving ``[page image,
its lines joined by "\\n"]``; pages without text are dropped (``filtered:empty_page``). PDFs are
rendered with pypdfium2 (m4 used PyMuPDF at 150 dpi, converted to grayscale — the defaults here).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator

import pypdfium2 as pdfium
from PIL import Image

from datamodules.sample import Sample
from datamodules.sources.base import RecordStats, register
from datamodules.sources.records import RecordSpan, iter_tar_groups
from vlm.processing.image import MAX_PIXELS


def render_pdf(
    data: bytes, dpi: float = 150, max_side: int | None = None, grayscale: bool = True
) -> tuple[int, Callable[[int], Image.Image]]:
    """Open a PDF; returns ``(page_count, render)`` where ``render(i)`` gives page ``i`` as a PIL image.

    Pages are rendered at ``dpi``, scaled down so that their longer side is at most ``max_side`` pixels
    when given. Raises ``ValueError`` when ``data`` is not a readable PDF.
    """
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as error:
        raise ValueError(f"<{len(data)} bytes> is not a readable PDF: {error}") from error

    def render(index: int) -> Image.Image:
        page = document[index]
        scale = dpi / 72
        if max_side is not None:
            scale = min(scale, max_side / max(page.get_size()))
        image = page.render(scale=scale, grayscale=grayscale).to_pil()
        return image.convert("L") if grayscale else image.convert("RGB")

    return len(document), render


def tif_pages(data: bytes, max_side: int | None = None) -> list[Image.Image]:
    """The frames of a multi-page TIFF, each scaled down to ``max_side`` when given.

    Raises ``ValueError`` when the data is not a readable image or a frame is larger than ``MAX_PIXELS``
    (what ``load_image`` does for single images).
    """
    try:
        with Image.open(io.BytesIO(data)) as tif:
            pages = []
            for index in range(getattr(tif, "n_frames", 1)):
                tif.seek(index)
                if tif.width * tif.height > MAX_PIXELS:
                    raise ValueError(f"TIFF page {index} is {tif.width}x{tif.height} pixels (a bomb?)")
                page = tif.copy()
                if max_side is not None:
                    page.thumbnail((max_side, max_side))
                pages.append(page)
    except ValueError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, EOFError... on bad data
        raise ValueError(f"<{len(data)} bytes> is not a readable TIFF: {error!r}") from error
    return pages


def page_lines(page: dict) -> list[str]:
    """The OCR lines of one JSON page in reading order: PDFA ``lines.text`` or IDL's flat ``text``.

    Raises ``ValueError`` when the page has neither layout (a malformed JSON record).
    """
    if not isinstance(page, dict):
        raise ValueError(f"page is a {type(page).__name__}, not an object")
    lines = page["lines"].get("text") if isinstance(page.get("lines"), dict) else page.get("text")
    if not isinstance(lines, list):
        raise ValueError(f"page has no list of lines (keys: {sorted(page)})")
    return [line.strip() for line in lines if isinstance(line, str) and line.strip()]


def _read_documents(
    shard: str,
    stats: RecordStats,
    source: str,
    image_member: str,
    pages_per_sample: int,
    dpi: float,
    max_side: int | None,
    grayscale: bool,
    span: RecordSpan | None,
) -> Iterator[Sample]:
    """Shared body of the PDFA and IDL readers; ``image_member`` is ``"pdf"`` or ``"tif"``."""
    for key, members in iter_tar_groups(shard, stats, span):
        if not {"json", "pdf", image_member} <= members.keys():
            stats.skip("missing_members")
            continue
        try:
            pages = json.loads(members["json"])["pages"]
            texts = ["\n".join(page_lines(page)) for page in pages]
        except (ValueError, KeyError, TypeError, AttributeError):  # JSONDecodeError is a ValueError
            stats.skip("invalid_json")
            continue
        try:
            page_count, render = render_pdf(members["pdf"], dpi, max_side, grayscale)
        except ValueError:
            stats.skip("corrupt_pdf")
            continue
        if page_count != len(pages):
            stats.skip("page_count_mismatch")
            continue
        if image_member == "tif":
            try:
                frames = tif_pages(members["tif"], max_side)
            except ValueError:
                stats.skip("corrupt_image")
                continue
            if len(frames) != len(pages):
                stats.skip("page_count_mismatch")
                continue
            render = [frame.convert("L" if grayscale else "RGB") for frame in frames].__getitem__
        kept = [index for index, text in enumerate(texts) if text]
        for _ in range(len(pages) - len(kept)):
            stats.skip("filtered:empty_page")
        for start in range(0, len(kept), pages_per_sample):
            chunk = kept[start : start + pages_per_sample]
            content: list[str | Image.Image] = []
            for index in chunk:
                content += [render(index), texts[index]]
            stats.ok()
            meta = {"pages": chunk, "page_count": len(pages)}
            yield Sample(source=source, key=f"{key}/{chunk[0]}", content=content, meta=meta)


@register("pdfa")
def read_pdfa(
    shard: str,
    stats: RecordStats,
    pages_per_sample: int = 1,
    dpi: float = 150,
    max_side: int | None = None,
    grayscale: bool = True,
    span: RecordSpan | None = None,
) -> Iterator[Sample]:
    """Stream a PDFA tar: samples of ``pages_per_sample`` rendered pages, each followed by its OCR lines."""
    yield from _read_documents(shard, stats, "pdfa", "pdf", pages_per_sample, dpi, max_side, grayscale, span)


@register("idl")
def read_idl(
    shard: str,
    stats: RecordStats,
    pages_per_sample: int = 1,
    dpi: float = 150,
    max_side: int | None = None,
    grayscale: bool = True,
    use_tif: bool = False,
    span: RecordSpan | None = None,
) -> Iterator[Sample]:
    """Stream an IDL tar like PDFA; ``use_tif`` takes the page images from the ``.tif`` render instead.

    The PDF is still opened to check its page count against the JSON (and the TIFF's, with ``use_tif``).
    """
    image_member = "tif" if use_tif else "pdf"
    yield from _read_documents(
        shard, stats, "idl", image_member, pages_per_sample, dpi, max_side, grayscale, span
    )
