"""Learnable synthetic content: images of coloured shapes with exact descriptions, and rendered text.

Writers of miniature shards (``datamodules.synthetic``) fill every real format with this content, so
a tiny model trained on CPU has something it can measurably learn: name and count the shapes
(captions, Q/A) and read rendered words (OCR-style transcription).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "triangle")
#: ``draw_scene`` layouts: ``grid`` draws each shape, all of one size, in its own cell of a 3x2 grid (744
#: distinct 96x64 images in all: a validation set of them mostly repeats training images);
#: ``jittered_grid`` keeps one shape per cell but gives each a random size and offset within its cell,
#: and the image a shade of its colour (practically every image distinct, and still learnable by a tiny
#: model from scratch in minutes: the demo's held-out split); ``random`` gives each shape a random size
#: and position anywhere, and a shade (harder).
Layout = Literal["grid", "jittered_grid", "random"]
LAYOUTS = ("grid", "jittered_grid", "random")
#: ``random`` layout at 96x64: square boxes with sides of 12-24 px, at least 6 px apart (6-12 px and 3 px at
#: the demo's 48x32 processed resolution: still separate, countable shapes after the bilinear resize).
RANDOM_SIDES, RANDOM_GAP = (12, 24), 6
#: ``jittered_grid`` at 96x64: sides of 16-28 px inside the 32x32 cells, at least 2 px from the cell's edges.
JITTERED_SIDES, CELL_MARGIN = (16, 28), 2
#: ``jittered_grid`` and ``random`` also shade the colour: each channel of the named colour moves by up to
#: this much per image (still unmistakably that colour), so that no two images coincide by chance.
SHADE_JITTER = 20
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


Box = tuple[int, int, int, int]  # (left, top, right, bottom), inclusive, as PIL draws it


def grid_boxes(rng: random.Random, count: int, size: tuple[int, int], jitter: bool = False) -> list[Box]:
    """``count`` boxes at random distinct cells of a 3x2 grid: each the cell less a 2 px margin, or with
    ``jitter`` a square of random side in ``JITTERED_SIDES`` at a random place inside that area."""
    width, height = size
    cell_w, cell_h = width // 3, height // 2
    inner_w, inner_h = cell_w - 2 * CELL_MARGIN, cell_h - 2 * CELL_MARGIN
    boxes = []
    for cell in rng.sample(range(6), count):
        left, top = (cell % 3) * cell_w + CELL_MARGIN, (cell // 3) * cell_h + CELL_MARGIN
        if not jitter:
            boxes.append((left, top, left + inner_w, top + inner_h))
            continue
        side = min(rng.randint(*JITTERED_SIDES), inner_w, inner_h)
        left, top = left + rng.randint(0, inner_w - side), top + rng.randint(0, inner_h - side)
        boxes.append((left, top, left + side - 1, top + side - 1))
    return boxes


def random_boxes(
    rng: random.Random,
    count: int,
    size: tuple[int, int],
    sides: tuple[int, int] = RANDOM_SIDES,
    gap: int = RANDOM_GAP,
    attempts: int = 100,
) -> list[Box]:
    """``count`` square boxes of random sides in ``sides`` at random positions, fully inside ``size`` and
    at least ``gap`` px apart (rejection sampling; all placed again when one finds no room)."""
    width, height = size

    def apart(a: Box, b: Box) -> bool:
        return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]

    for _ in range(attempts):
        boxes: list[Box] = []
        for _ in range(attempts):
            side = rng.randint(*sides)
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (left, top, left + side - 1, top + side - 1)
            if all(apart(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
    raise ValueError(f"No room for {count} shapes of sides {sides} {gap} px apart in {size}.")


def draw_scene(
    scene: ShapeScene, rng: random.Random, size: tuple[int, int] = (96, 64), layout: Layout = "grid"
) -> Image.Image:
    """An RGB image of ``scene``: its shapes in non-overlapping boxes placed by ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(map(repr, LAYOUTS))}.")
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    colour = COLOURS[scene.colour]
    if layout != "grid":
        colour = tuple(min(255, max(0, c + rng.randint(-SHADE_JITTER, SHADE_JITTER))) for c in colour)
    if layout == "random":
        boxes = random_boxes(rng, scene.count, size)
    else:
        boxes = grid_boxes(rng, scene.count, size, jitter=layout == "jittered_grid")
    for box in boxes:
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
