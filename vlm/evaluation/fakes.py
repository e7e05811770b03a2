"""Miniature fake benchmarks: parquet files in the Hub layouts ``vlm.evaluation.benchmarks`` reads.

Offline stand-ins for tests and demos (as ``datamodules.synthetic`` fakes training shards): each
row is a small PNG of one coloured square, asked about its colour, with the benchmark's columns and
types (images as ``{"bytes", "path"}`` structs as ``datasets`` writes them, lists of answers, MMMU's
stringified option lists and ``image_1``..``image_7`` columns, AI2D's answer index as a string,
MMBench's option columns, MMStar's options inside the question, MathVista's ``decoded_image`` next
to its ``image`` path).
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlm.evaluation.benchmarks import get_benchmark

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _png(colour: str, rng: random.Random, size: int = 40) -> dict[str, Any]:
    image = Image.new("RGB", (size + rng.randrange(8), size), (255, 255, 255))
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    image.paste(COLOURS[colour], (x, y, x + size // 2, y + size // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


Maker = Callable[[int, str, random.Random], dict[str, Any]]
QUESTION = "What colour is the square?"


def _textvqa(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    return {
        "image_id": f"img{i:05d}",
        "question_id": i,
        "question": QUESTION,
        "question_tokens": QUESTION.lower().rstrip("?").split(),
        "image": _png(colour, rng),
        "answers": [colour] * 8 + ["dark " + colour, "unanswerable"],
        "set_name": "val",
    }


def _vqav2(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    answers = [colour] * 9 + ["orange"]
    return {
        "question_type": "what color is the",
        "multiple_choice_answer": colour,
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
        ],
        "image_id": 100 + i,
        "answer_type": "other",
        "question_id": 1000 * (100 + i),
        "question": QUESTION,
        "image": _png(colour, rng),
    }


def _okvqa(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    return {
        "answer_type": "other",
        "img_id": 100 + i,
        "question": QUESTION,
        "question_type": "eight",
        "question_id": 1000 * (100 + i) + 5,
        "answers": [colour] * 10,
        "image": _png(colour, rng),
    }


def _docvqa(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    return {
        "questionId": str(5000 + i),
        "question": QUESTION,
        "question_types": ["figure/diagram"],
        "image": _png(colour, rng),
        "docId": 700 + i,
        "ucsf_document_id": f"doc{i}",
        "ucsf_document_page_no": "1",
        "answers": [colour, colour.upper()],
        "data_split": "val",
    }


def _chartqa(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    return {"type": "human_test", "question": QUESTION, "answer": colour, "image": _png(colour, rng)}


def _options(colour: str, rng: random.Random) -> tuple[list[str], int]:
    options = list(COLOURS)
    rng.shuffle(options)
    return options, options.index(colour)


def _mmmu(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    options, right = _options(colour, rng)
    row = {
        "id": f"validation_Art_{i + 1}",
        "question": "<image 1> What colour is the square in <image 1>?" if i % 2 else "<image 1> " + QUESTION,
        "options": repr(options),
        "explanation": "",
        "answer": "ABCD"[right],
        "topic_difficulty": "Easy",
        "question_type": "open" if i % 5 == 4 else "multiple-choice",
        "subfield": "Colours",
        "img_type": "['Diagrams']",
    }
    for k in range(1, 8):
        row[f"image_{k}"] = _png(colour, rng) if k == 1 else None
    return row


def _ai2d(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    options, right = _options(colour, rng)
    return {"question": QUESTION, "options": options, "answer": str(right), "image": _png(colour, rng)}


def _mmbench(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    options, right = _options(colour, rng)
    options = options[:3] if right < 3 else options  # some questions have only A-C (D is null)
    return {
        "index": 1000 + i,
        "question": QUESTION,
        "hint": "The square is drawn on white paper." if i % 2 else None,
        "A": options[0],
        "B": options[1],
        "C": options[2],
        "D": options[3] if len(options) > 3 else None,
        "answer": "ABCD"[right],
        "category": "attribute_recognition",
        "image": _png(colour, rng),
        "source": "fake",
        "L2-category": "finegrained_perception (instance-level)",
        "comment": None,
        "split": "dev",
    }


def _mmstar(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    options, right = _options(colour, rng)
    listed = ", ".join(f"{letter}: the square is {o}" for letter, o in zip("ABCD", options))
    return {
        "index": i,
        "question": f"{QUESTION}\nOptions: {listed}",
        "image": _png(colour, rng),
        "answer": "ABCD"[right],
        "category": "fine-grained perception",
        "l2_category": "attribute & localization",
        "meta_info": {"source": "fake", "split": "val", "image_path": f"images/{i}.jpg"},
    }


def _mathvista(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    image = _png(colour, rng)
    common = {"pid": str(i + 1), "image": f"images/{i + 1}.jpg", "decoded_image": image, "unit": None}
    if i % 2:
        options, _ = _options(colour, rng)
        choices = "\n".join(f"({letter}) {o}" for letter, o in zip("ABCD", options))
        return {
            **common,
            "question": QUESTION,
            "choices": options,
            "precision": None,
            "answer": colour,
            "question_type": "multi_choice",
            "answer_type": "text",
            "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
            f"D, at the end.\nQuestion: {QUESTION}\nChoices:\n{choices}",
        }
    sides = 3 + i % 3
    return {
        **common,
        "question": "How many sides does the polygon have?",
        "choices": None,
        "precision": None,
        "answer": str(sides),
        "question_type": "free_form",
        "answer_type": "integer",
        "query": "Hint: Please answer the question requiring an integer answer and provide the final value, "
        "e.g., 1, 2, 3, at the end.\nQuestion: How many sides does the polygon have?",
    }


def _coco(i: int, colour: str, rng: random.Random) -> dict[str, Any]:
    captions = [f"a {colour} square on a white background", f"a small {colour} square", f"a {colour} box"]
    return {
        "question_id": f"{400000 + i}.jpg",
        "image": _png(colour, rng),
        "question": "Provide a one-sentence caption for the provided image.",
        "answer": [*captions, f"the square is {colour}", f"{colour} square"],
        "id": 400000 + i,
        "file_name": f"COCO_val2014_{400000 + i:012d}.jpg",
        "height": 40,
        "width": 40,
    }


MAKERS: dict[str, Maker] = {
    "textvqa": _textvqa,
    "vqav2": _vqav2,
    "okvqa": _okvqa,
    "docvqa": _docvqa,
    "chartqa": _chartqa,
    "mmmu": _mmmu,
    "ai2d": _ai2d,
    "mmbench": _mmbench,
    "mmstar": _mmstar,
    "mathvista": _mathvista,
    "coco": _coco,
}


def write_fake_benchmark(
    name: str, root: str | Path, n: int, split: str | None = None, seed: int = 0
) -> Path:
    """Write ``n`` fake rows of benchmark ``name`` to ``root/<split>-00000-of-00001.parquet`` (the Hub's
    file naming; ``split`` defaults to the benchmark's evaluation split) and return the file's path."""
    split = split or get_benchmark(name).split
    rng = random.Random(f"{name}:{split}:{seed}")
    rows = [MAKERS[name](i, rng.choice(list(COLOURS)), rng) for i in range(n)]
    columns = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        is_image = re.fullmatch(r"image_\d", key) or any(isinstance(v, dict) and "bytes" in v for v in values)
        columns[key] = pa.array(values, type=IMAGE_TYPE if is_image else None)
    path = Path(root) / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path
