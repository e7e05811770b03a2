"""Images/s of ``vlm.processing.ImageProcessor`` against transformers' image processors.

    python bench/processing.py [--repeats 5] [--threads 2]

All processors run in this process on the same 40 synthetic images (sizes between 200x200 and
2000x1500: gradients, shapes and noise), in batches of 4 samples of 2 images, on both recipes
with their default settings. Two settings: every side on one thread (``torch.set_num_threads(1)``,
ours with ``num_threads=1``), then every side as a user would run it on this machine
(``torch.set_num_threads(threads)`` for everyone, ours with ``num_threads=threads``; the PIL
reference has no threading). Each repeat times every processor once, interleaved, and the median
repeat is reported. Outputs are compared first: ours must be within 1e-5 of the PIL reference; the
torchvision ("fast") processors resize differently, so their difference is only reported.
The last line printed is a JSON list of ``{measure, ours, reference, unit, ratio, goal}``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import numpy as np
import torch
from common import interleaved_seconds
from PIL import Image, ImageDraw
from transformers import (
    Idefics2ImageProcessor,
    Idefics2ImageProcessorPil,
    Idefics3ImageProcessor,
    Idefics3ImageProcessorPil,
)

from vlm.processing.image import ImageProcessor

N_IMAGES, IMAGES_PER_SAMPLE, SAMPLES_PER_BATCH = 40, 2, 4
REFERENCES = {
    "idefics3": {"PIL": Idefics3ImageProcessorPil, "torchvision": Idefics3ImageProcessor},
    "idefics2": {"PIL": Idefics2ImageProcessorPil, "torchvision": Idefics2ImageProcessor},
}
# Acceptance targets (ratio ours / reference, all cores): Idefics3 only.
GOALS = {("idefics3", "PIL"): 3.0, ("idefics3", "torchvision"): 1.0}


def synthetic_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic photo-like RGB images: a colour gradient, random shapes, Gaussian noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = int(rng.integers(200, 2001)), int(rng.integers(200, 1501))
        ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(0, 255, 3)
        ramp = ramp + np.linspace(0, 1, height, dtype=np.float32)[:, None, None] * rng.uniform(-128, 128, 3)
        image = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, x1 = sorted(rng.integers(0, width, 2).tolist())
            y0, y1 = sorted(rng.integers(0, height, 2).tolist())
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=tuple(rng.integers(0, 256, 3).tolist()))
        noisy = np.asarray(image, np.float32) + rng.normal(0, 8, (height, width, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


def batches(images: list[Image.Image]) -> list[list[list[Image.Image]]]:
    """Batches of ``SAMPLES_PER_BATCH`` samples of ``IMAGES_PER_SAMPLE`` images."""
    samples = [images[i : i + IMAGES_PER_SAMPLE] for i in range(0, len(images), IMAGES_PER_SAMPLE)]
    return [samples[i : i + SAMPLES_PER_BATCH] for i in range(0, len(samples), SAMPLES_PER_BATCH)]


def max_difference(ours: ImageProcessor, reference: Callable, data: list) -> float:
    """Largest |ours - reference| over all pixel values (inf when shapes or masks differ)."""
    worst = 0.0
    for batch in data:
        expected = reference(batch, return_tensors="pt")
        pixel_values, mask = ours(batch).to_transformers()
        if pixel_values.shape != expected["pixel_values"].shape:
            return float("inf")
        if not torch.equal(mask, expected["pixel_attention_mask"]):
            return float("inf")
        worst = max(worst, (pixel_values - expected["pixel_values"]).abs().max().item())
    return worst


def returning_tensors(reference: Callable) -> Callable:
    """The reference called as a user does, returning PyTorch tensors."""
    return lambda batch: reference(batch, return_tensors="pt")


def images_per_second(runners: dict[str, Callable], data: list, repeats: int) -> dict[str, float]:
    """Median images/s of each runner over ``repeats`` passes on ``data``, runners interleaved."""
    passes = {name: lambda run=run: [run(batch) for batch in data] for name, run in runners.items()}
    return {name: N_IMAGES / s for name, s in interleaved_seconds(passes, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    data = batches(synthetic_images(N_IMAGES))
    rows, results = [], []
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        for recipe, references in REFERENCES.items():
            ours = ImageProcessor(recipe=recipe, num_threads=threads)
            refs = {kind: cls() for kind, cls in references.items()}
            diffs = {kind: max_difference(ours, ref, data) for kind, ref in refs.items()}
            if diffs["PIL"] > 1e-5:
                raise SystemExit(f"{recipe}: output differs from the PIL reference by {diffs['PIL']}")
            runners = {"ours": ours} | {kind: returning_tensors(ref) for kind, ref in refs.items()}
            speed = images_per_second(runners, data, args.repeats)
            for kind in refs:
                ratio = speed["ours"] / speed[kind]
                name = f"{recipe} vs {references[kind].__name__}, {threads} thread(s)"
                rows.append((name, speed["ours"], speed[kind], ratio, diffs[kind]))
                goal = GOALS.get((recipe, kind)) if threads == args.threads else None
                results.append(
                    dict(measure=name, ours=round(speed["ours"], 2), reference=round(speed[kind], 2),
                         unit="images/s", ratio=round(ratio, 2), goal=goal)
                )  # fmt: skip
    print(f"{'measure':<58} {'ours':>8} {'ref':>8} {'ratio':>6}  max |ours - ref|")
    for name, ours_speed, ref_speed, ratio, diff in rows:
        print(f"{name:<58} {ours_speed:>8.1f} {ref_speed:>8.1f} {ratio:>5.2f}x  {diff:.2e}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
