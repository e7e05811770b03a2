"""The public pair ``write_shards`` -> ``iter_samples`` works for every source, with nothing lost; the
``jittered_grid`` and ``random`` shapes layouts draw what their scene says, countably, with practically
no image repeated."""

from __future__ import annotations

import random
import time
from collections import deque

import numpy as np
import pytest
from PIL import Image

from datamodules import Sample
from datamodules.sources import READERS, iter_samples
from datamodules.synthetic import WRITERS, write_shards
from datamodules.synthetic_content import (
    CELL_MARGIN,
    COLOURS,
    JITTERED_SIDES,
    RANDOM_GAP,
    RANDOM_SIDES,
    SHADE_JITTER,
    draw_scene,
    random_boxes,
    random_scene,
)


def test_every_reader_has_a_writer():
    built_in = {name for name, reader in READERS.items() if reader.__module__.startswith("datamodules.")}
    # (tests register fake readers of their own; ``questions`` reads the user's own JSONL of questions for
    # ``lightning predict``, not a dataset format)
    assert set(WRITERS) == built_in - {"questions"}


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_written_shards_read_back_with_only_deliberate_filters(source, tmp_path):
    paths = write_shards(source, tmp_path, n_samples=6, seed=1)
    shards = [str(p) for p in paths if p.suffix in {".tar", ".parquet"}]
    stream = iter_samples(source, shards)
    samples = list(stream)
    assert len(samples) >= 6
    assert all(isinstance(sample, Sample) and sample.source == source for sample in samples)
    assert len({sample.key for sample in samples}) == len(samples)
    assert all(reason.startswith("filtered:") for reason in stream.stats.skipped), stream.stats.as_dict()
    if source != "text":
        assert all(isinstance(image, Image.Image) for sample in samples for image in sample.images)
        assert sum(len(sample.images) for sample in samples) >= len(samples)


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_same_seed_gives_byte_identical_shards(source, tmp_path):
    first = write_shards(source, tmp_path / "a", n_samples=3, seed=5)
    time.sleep(1.1 if source in ("idl", "pdfa", "docmatix") else 0)  # a clock in the bytes would show
    second = write_shards(source, tmp_path / "b", n_samples=3, seed=5)
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="laion_coco"):
        write_shards("laion-5b", tmp_path, 3)
    with pytest.raises(ValueError, match="laion_coco"):
        iter_samples("laion-5b", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        iter_samples("laion_coco", str(tmp_path / "nope-*.tar"))


def components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """The 4-connected components of a boolean ``(H, W)`` mask as (left, top, right, bottom, pixels)."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pixels = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = zip(*pixels)
        out.append((min(xs), min(ys), max(xs), max(ys), len(pixels)))
    return out


def test_random_boxes_are_inside_apart_and_of_the_allowed_sides():
    rng = random.Random(0)
    for count in [1, 2, 3, 4, 5] * 100:
        boxes = random_boxes(rng, count, (96, 64))
        assert len(boxes) == count
        for left, top, right, bottom in boxes:
            assert 0 <= left <= right < 96 and 0 <= top <= bottom < 64
            assert right - left == bottom - top and RANDOM_SIDES[0] <= right - left + 1 <= RANDOM_SIDES[1]
        for i, a in enumerate(boxes):
            for b in boxes[:i]:
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) - 1  # pixels between
                assert gap >= RANDOM_GAP
    with pytest.raises(ValueError, match="No room"):
        random_boxes(rng, 20, (96, 64))  # 18 px per box and gap: at most 5 x 3 fit


@pytest.mark.parametrize("layout", ["jittered_grid", "random"])
def test_varied_layouts_draw_the_scene_countably_at_full_and_half_size(layout):
    """Each shape is one blob of the scene's colour whose fill of its bounding box tells its shape
    (square 1, circle ~pi/4, triangle ~1/2); at the demo's 48x32 (bilinear, as the idefics2 recipe)
    the pixels nearer the colour than white still form exactly ``count`` blobs."""
    fill = {"square": (0.99, 1.0), "circle": (0.7, 0.9), "triangle": (0.45, 0.65)}
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        image = draw_scene(scene, rng, layout=layout)
        pixels = np.asarray(image).astype(int)
        white = np.array([255, 255, 255])
        painted = (pixels != white).any(-1)
        colour = pixels[painted][0]
        assert (pixels[painted] == colour).all()  # one colour, no anti-aliasing
        assert np.abs(colour - COLOURS[scene.colour]).max() <= SHADE_JITTER  # a shade of the named one
        nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - colour).sum())
        assert nearest == scene.colour
        blobs = components(painted)
        assert len(blobs) == scene.count
        for left, top, right, bottom, area in blobs:
            assert right - left == bottom - top  # drawn in a square box (a triangle's base = its height)
            low, high = fill[scene.shape]
            assert low <= area / (right - left + 1) ** 2 <= high, (scene, area, right - left + 1)
        half = np.asarray(image.resize((48, 32), Image.Resampling.BILINEAR)).astype(int)
        nearer = np.abs(half - colour).sum(-1) < np.abs(half - white).sum(-1)
        assert len(components(nearer)) == scene.count


def test_varied_layout_images_are_practically_all_distinct_and_grid_ones_are_not():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(1000)]
    grid = {draw_scene(scene, rng).tobytes() for scene in scenes}
    assert len(grid) < 744
    for layout in ("jittered_grid", "random"):
        assert len({draw_scene(scene, rng, layout=layout).tobytes() for scene in scenes}) == 1000
    with pytest.raises(ValueError, match="layout"):
        draw_scene(scenes[0], rng, layout="spiral")


def test_cauldron_writer_draws_with_the_layout_given_and_other_writers_reject_it(tmp_path):
    def blob_sides(paths: list) -> set[int]:
        images = [
            image for sample in iter_samples("cauldron", [str(p) for p in paths]) for image in sample.images
        ]
        assert len(images) == 6  # 2 one-image + 2 two-image conversations
        painted = [(np.asarray(image) != 255).any(-1) for image in images]
        return {right - left + 1 for mask in painted for left, _, right, _, _ in components(mask)}

    assert blob_sides(write_shards("cauldron", tmp_path / "grid", 4, seed=3)) == {
        29
    }  # 3x2 cells less margins
    sides = blob_sides(write_shards("cauldron", tmp_path / "random", 4, seed=3, layout="random"))
    assert len(sides) > 1 and sides <= set(range(RANDOM_SIDES[0], RANDOM_SIDES[1] + 1))
    sides = blob_sides(write_shards("cauldron", tmp_path / "jittered", 4, seed=3, layout="jittered_grid"))
    assert len(sides) > 1 and sides <= set(range(JITTERED_SIDES[0], JITTERED_SIDES[1] + 1))
    with pytest.raises(TypeError, match="layout"):
        write_shards("text", tmp_path / "text", 2, layout="random")


def test_jittered_grid_keeps_each_shape_inside_its_own_cell():
    """One shape per 32x32 cell of the 3x2 grid, at least ``CELL_MARGIN`` px from the cell's edges."""
    rng = random.Random(1)
    for _ in range(200):
        scene = random_scene(rng)
        painted = (np.asarray(draw_scene(scene, rng, layout="jittered_grid")) != 255).any(-1)
        cells = set()
        for left, top, right, bottom, _ in components(painted):
            cell = (left // 32, top // 32)
            assert (right // 32, bottom // 32) == cell
            assert min(left, top) % 32 >= CELL_MARGIN and 31 - max(right % 32, bottom % 32) >= CELL_MARGIN
            cells.add(cell)
        assert len(cells) == scene.count
