"""Faithful miniature shards of the document and instruction datasets, filled with learnable content.

Each writer reproduces one hub layout exactly (docs/DATA_FORMATS.md §3-8: file names, tar member names and
key formats, parquet columns, Arrow types and the ``huggingface`` schema metadata as written in 2024)
so the real readers run on them unchanged. Content comes from ``synthetic_content``: PDF pages and
rendered text carry random words whose OCR annotation is exactly what is drawn (transcription is
learnable), conversations ask about shapes scenes or about the words of a document. Output is
deterministic given ``seed``. ``WRITERS[source](out_dir, n_samples, seed=0, **options)`` returns the files
written (options: ``layout`` of ``cauldron``).
"""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
from fpdf import FPDF
from PIL import Image

from datamodules.shard_files import HF_FEATURES, write_parquet_shards, write_tar
from datamodules.shard_files import encode_image as _png
from datamodules.sources.conversations import CONVERSATION_SCHEMA, DOCMATIX_PDF_SCHEMA
from datamodules.sources.pdf_documents import render_pdf
from datamodules.synthetic_content import Layout, draw_scene, draw_text, random_scene, random_words

PAGE_SIZE = (288.0, 216.0)  # points (4 x 3 inches): small pages keep renders cheap
FONT_SIZE, LINE_HEIGHT, MARGIN = 14.0, 20.0, 18.0
SAMPLES_PER_SHARD = 16


def _chunks(items: list, size: int = SAMPLES_PER_SHARD) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)] or [[]]


def _write_parquet_shards(
    folder: Path, rows: list[dict], seed: int, schema: pa.Schema, features: dict
) -> list[Path]:
    return write_parquet_shards(folder, rows, seed, schema, features, rows_per_shard=SAMPLES_PER_SHARD)


# --------------------------------------------------------------------------------------------- PDFs


def random_document(rng: random.Random, n_pages: int, n_lines: tuple[int, int] = (1, 4)) -> list[list[str]]:
    """Pages of lines of 2-5 random words."""
    return [
        [random_words(rng, rng.randint(2, 5)) for _ in range(rng.randint(*n_lines))] for _ in range(n_pages)
    ]


_PDF_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)


def write_pdf(pages: list[list[str]], rng: random.Random) -> tuple[bytes, list[dict]]:
    """A real PDF of ``pages`` (lines of words) and its PDFA-style OCR JSON pages.

    Word and line boxes are relative ``[left, top, width, height]``; a page with lines also shows a
    shapes image below the text (``images_bbox``). An empty page is blank with empty OCR lists.
    """
    width, height = PAGE_SIZE
    pdf = FPDF(unit="pt", format=PAGE_SIZE)
    pdf.set_creation_date(_PDF_DATE)  # not "now": the same seed must give byte-identical shards
    pdf.set_auto_page_break(False)
    pdf.set_font("helvetica", size=FONT_SIZE)
    json_pages = []
    for lines in pages:
        pdf.add_page()
        words: dict[str, list] = {"text": [], "bbox": [], "score": [], "line_pos": []}
        ocr_lines: dict[str, list] = {"text": [], "bbox": [], "score": [], "word_slice": []}
        for line_index, line in enumerate(lines):
            top, left, start = MARGIN + line_index * LINE_HEIGHT, MARGIN, len(words["text"])
            for position, word in enumerate(line.split()):
                word_width = pdf.get_string_width(word)
                pdf.text(left, top + FONT_SIZE, word)
                words["text"].append(word)
                words["bbox"].append([left / width, top / height, word_width / width, LINE_HEIGHT / height])
                words["score"].append(1.0)
                words["line_pos"].append([line_index, position])
                left += word_width + pdf.get_string_width(" ")
            line_box = [MARGIN / width, top / height, (left - MARGIN) / width, LINE_HEIGHT / height]
            ocr_lines["text"].append(line)
            ocr_lines["bbox"].append(line_box)
            ocr_lines["score"].append(1.0)
            ocr_lines["word_slice"].append([start, len(words["text"])])
        images_bbox = []
        if lines:
            box = (width - 96 - MARGIN, height - 64 - MARGIN, 96.0, 64.0)
            pdf.image(draw_scene(random_scene(rng), rng), *box)
            images_bbox.append([box[0] / width, box[1] / height, box[2] / width, box[3] / height])
        json_pages.append(
            {
                "images_bbox": images_bbox,
                "images_bbox_no_text_overlap": list(images_bbox),
                "lines": ocr_lines,
                "words": words,
            }
        )
    return bytes(pdf.output()), json_pages


def write_pdfa(out_dir: Path, n_samples: int, seed: int = 0) -> list[Path]:
    """PDFA tars ``pdfa-eng-train-NNNN.tar``: 7-digit keys, ``{key}.pdf`` + ``{key}.json`` per document.

    Documents have 1-3 pages; every fifth one ends with a blank page (empty OCR), as real PDFA has.
    """
    rng = random.Random(seed)
    keys = rng.sample(range(10**7), n_samples)
    records = []
    for index, key in enumerate(keys):
        pages = random_document(rng, rng.randint(1, 3)) + ([[]] if index % 5 == 4 else [])
        pdf, json_pages = write_pdf(pages, rng)
        records.append((f"{key:07d}", {"pdf": pdf, "json": json.dumps({"pages": json_pages}).encode()}))
    return [
        write_tar(out_dir / f"pdfa-eng-train-{i:04d}.tar", chunk) for i, chunk in enumerate(_chunks(records))
    ]


def write_idl(out_dir: Path, n_samples: int, seed: int = 0) -> list[Path]:
    """IDL tars ``idl-train-NNNNN.tar``: ``{key}.json`` (flat Textract-style pages), ``.ocr``, ``.pdf`` and
    ``.tif`` (multi-page grayscale render of the PDF) per document, keys like ``ffbb0127``."""
    rng = random.Random(seed)
    records = []
    for _ in range(n_samples):
        key = (
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
            + f"{rng.randrange(10**4):04d}"
        )
        pdf, json_pages = write_pdf(random_document(rng, rng.randint(1, 3)), rng)
        textract = [
            {
                "text": page["lines"]["text"],
                "bbox": page["lines"]["bbox"],
                "score": [round(rng.uniform(95, 100), 3) for _ in page["lines"]["text"]],
            }
            for page in json_pages
        ]
        page_count, render = render_pdf(pdf, dpi=72)
        frames = [render(i) for i in range(page_count)]
        tif = io.BytesIO()
        frames[0].save(tif, format="TIFF", save_all=True, append_images=frames[1:])
        ocr = "\n\n".join("\n".join(page["text"]) for page in textract).encode()
        members = {
            "pdf": pdf,
            "tif": tif.getvalue(),
            "json": json.dumps({"pages": textract}).encode(),
            "ocr": ocr,
        }
        records.append((key, members))
    return [write_tar(out_dir / f"idl-train-{i:05d}.tar", chunk) for i, chunk in enumerate(_chunks(records))]


def write_rendered_text(out_dir: Path, n_samples: int, seed: int = 0) -> list[Path]:
    """RenderedText tars ``NNNNNN.tar``: ``{key}.png`` with 1-3 lines of words + ``{key}.json``
    (``ocr_annotation.text`` = the lines, ``ocr_annotation.bb_relative`` their boxes)."""
    rng = random.Random(seed)
    records = []
    for index in range(n_samples):
        lines = [random_words(rng, rng.randint(1, 4)) for _ in range(rng.randint(1, 3))]
        image = draw_text(lines)
        boxes = [
            [4 / image.width, (4 + 14 * i) / image.height, 1.0, 14 / image.height] for i in range(len(lines))
        ]
        annotation = {"ocr_annotation": {"text": lines, "bb_relative": boxes}}
        records.append((f"{index:09d}", {"png": _png(image), "json": json.dumps(annotation).encode()}))
    return [write_tar(out_dir / f"{i:06d}.tar", chunk) for i, chunk in enumerate(_chunks(records))]


# ------------------------------------------------------------------------------------ conversations


def _texts(turns: list[tuple[str, str]], source: str) -> list[dict]:
    return [{"user": user, "assistant": assistant, "source": source} for user, assistant in turns]


def scene_conversation(
    rng: random.Random, n_images: int, layout: Layout = "grid"
) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    """Shapes images (drawn with ``layout``) and Q/A turns about them (one image: its ``qa_pairs``;
    several: per-image counts)."""
    scenes = [random_scene(rng) for _ in range(n_images)]
    images = [draw_scene(scene, rng, layout=layout) for scene in scenes]
    if n_images == 1:
        return images, scenes[0].qa_pairs()
    turns = [(f"How many {s.shape}s are in image {i + 1}?", str(s.count)) for i, s in enumerate(scenes)]
    same = "yes" if scenes[0].colour == scenes[1].colour else "no"
    return images, [*turns, ("Are the shapes of the first two images the same colour?", same)]


def write_cauldron(out_dir: Path, n_samples: int, seed: int = 0, layout: Layout = "grid") -> list[Path]:
    """Cauldron parquet in two subsets, ``clevr`` (one image per row) and ``mimic_cgd`` (two images),
    files ``{subset}/train-00000-of-0000N-<16hex>.parquet``; shapes scenes drawn with ``layout``
    (``random``: practically no image repeats, so shards of another seed are held-out images)."""
    rng = random.Random(seed)
    paths = []
    for subset, n_images, count in (("clevr", 1, (n_samples + 1) // 2), ("mimic_cgd", 2, n_samples // 2)):
        rows = []
        for _ in range(count):
            images, turns = scene_conversation(rng, n_images, layout)
            rows.append(
                {"images": [{"bytes": _png(i), "path": None} for i in images], "texts": _texts(turns, subset)}
            )
        paths += _write_parquet_shards(
            out_dir / subset, rows, seed, CONVERSATION_SCHEMA, HF_FEATURES["conversation"]
        )
    return paths


def write_docmatix(out_dir: Path, n_samples: int, seed: int = 0) -> list[Path]:
    """Docmatix parquet, both configs on the same documents: ``data/train-*`` (pages as PNG images) and
    ``pdf/train-*`` (the whole PDF). Every fourth document is long (3 pages of 8 lines) and asks for a
    transcription over 500 characters, which m4's turn-length filter drops."""
    rng = random.Random(seed)
    image_rows, pdf_rows = [], []
    for index in range(n_samples):
        key = f"{rng.randrange(10**7):07d}"
        long = index % 4 == 3
        pages = random_document(rng, 3, (8, 8)) if long else random_document(rng, 1)
        pdf, _ = write_pdf(pages, rng)
        turns = [("What is the first word on the page?", pages[0][0].split()[0])]
        turns.append(("How many lines of text are there?", str(sum(map(len, pages)))))
        if long:
            turns.append(("Transcribe the document.", "\n".join(line for page in pages for line in page)))
        texts = _texts(turns, f"PDFA key: {key}")
        page_count, render = render_pdf(pdf, dpi=72, grayscale=False)
        images = [{"bytes": _png(render(i)), "path": None} for i in range(page_count)]
        image_rows.append({"images": images, "texts": texts})
        pdf_rows.append({"pdf": pdf, "texts": texts})
    return _write_parquet_shards(
        out_dir / "data", image_rows, seed, CONVERSATION_SCHEMA, HF_FEATURES["conversation"]
    ) + _write_parquet_shards(
        out_dir / "pdf", pdf_rows, seed, DOCMATIX_PDF_SCHEMA, HF_FEATURES["docmatix_pdf"]
    )


def text_conversation(rng: random.Random) -> list[tuple[str, str]]:
    """One or two arithmetic / word questions with exact answers."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    turns = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
    if rng.random() < 0.5:
        words = random_words(rng, 3).split()
        turns.append((f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))))
    return turns


def write_text(out_dir: Path, n_samples: int, seed: int = 0) -> list[Path]:
    """Text-only instruction data in the Cauldron schema (``images = []``), subset ``orca_math``."""
    rng = random.Random(seed)
    rows = [{"images": [], "texts": _texts(text_conversation(rng), "orca_math")} for _ in range(n_samples)]
    return _write_parquet_shards(
        out_dir / "orca_math", rows, seed, CONVERSATION_SCHEMA, HF_FEATURES["conversation"]
    )


def write_m4_sft(out_dir: Path, n_samples: int, seed: int = 0) -> list[Path]:
    """m4 SFT tars ``shard_NNNNNNN.tar`` (§7.3) of shapes conversations: ``./{id}.{i}.image.jpeg``,
    ``./{id}.{n_img + j}.text.txt`` (JSON turn), ``./{id}.metadata.txt``, sorted, with a ``./`` entry."""
    rng = random.Random(seed)
    records = []
    for index in range(n_samples):
        images, turns = scene_conversation(rng, 1 + index % 2)
        members = {f"{i}.image.jpeg": _png(image, "JPEG") for i, image in enumerate(images)}
        for j, text in enumerate(_texts(turns, "clevr")):
            members[f"{len(images) + j}.text.txt"] = json.dumps(text).encode()
        example_id = f"{index}_{uuid.UUID(int=rng.getrandbits(128))}"
        members["metadata.txt"] = "\n".join(f"{example_id}.{suffix}" for suffix in members).encode()
        records.append((example_id, members))
    return [
        write_tar(out_dir / f"shard_{i:07d}.tar", chunk, dot_slash=True)
        for i, chunk in enumerate(_chunks(records))
    ]


WRITERS: dict[str, Callable[..., list[Path]]] = {
    "pdfa": write_pdfa,
    "idl": write_idl,
    "rendered_text": write_rendered_text,
    "cauldron": write_cauldron,
    "docmatix": write_docmatix,
    "text": write_text,
    "m4_sft": write_m4_sft,
}
