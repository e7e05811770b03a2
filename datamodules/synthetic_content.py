"""Learnable synthetic content: images of coloured shapes with exact descriptions, and rendered text.

Writers of miniature shards (``datamodules.synthetic``) fill every real format with this content, so
a tiny model trained on CPU has something it can measurably learn: name and count the shapes
(captions, Q/A) and read rendered words (OCR-style transcription).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "paper",
    "light",
    "market",
    "window",
    "garden",
    "music",
    "table",
    "winter",
    "yellow",
    "orange",
    "silver",
    "forest",
    "train",
    "bridge",
    "letter",
    "number",
]


@dataclass(frozen=True)
class ShapeScene:
    """What a shapes image shows: ``count`` shapes of one ``shape`` and ``colour``."""

    shape: str
    colour: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{NUMBER_WORDS[self.count].capitalize()} {self.colour} {noun} on a white background."

    def qa_pairs(self) -> list[tuple[str, str]]:
        """Questions about the scene with short answers (The Cauldron style)."""
        return [
            (f"How many {self.shape}s are there?", str(self.count)),
            ("What colour are the shapes?", self.colour),
            ("What shape is drawn?", self.shape),
        ]


def random_scene(rng: random.Random) -> ShapeScene:
    """A random scene of 1-5 shapes."""
    return ShapeScene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(1, 5))


def draw_scene(scene: ShapeScene, rng: random.Random, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An RGB image of ``scene``: the shapes at random non-overlapping cells of a 3x2 grid."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width // 3, height // 2
    for cell in rng.sample(range(6), scene.count):
        left, top = (cell % 3) * cell_w + 2, (cell // 3) * cell_h + 2
        box = (left, top, left + cell_w - 4, top + cell_h - 4)
        colour = COLOURS[scene.colour]
        if scene.shape == "square":
            draw.rectangle(box, fill=colour)
        elif scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    return image


def random_words(rng: random.Random, n: int) -> str:
    """``n`` random words from a small vocabulary."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def draw_text(lines: list[str], size: tuple[int, int] | None = None) -> Image.Image:
    """Black text lines on white (PIL's built-in font): a page or a photo of handwriting to transcribe."""
    line_height = 14
    if size is None:
        size = (max(8 + 7 * max((len(line) for line in lines), default=1), 32), 8 + line_height * len(lines))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((4, 4 + i * line_height), line, fill="black")
    return image
