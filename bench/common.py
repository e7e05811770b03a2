"""What the benchmarks share: a small Idefics2 (transformers), OBELICS-like documents with images of
mixed sizes, transformers' padded batch layout, the device/dtype options and interleaved timing."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Idefics2Config

from callbacks.telemetry import synchronize
from datamodules.packing import TokenizedDocument
from vlm.config import IGNORE_INDEX

VOCAB, IMAGE_TOKEN_ID, FAKE_TOKEN_ID, PAD_ID = 32000, 31999, 31998, 0
PATCH, LATENTS = 14, 16


def idefics2_config() -> Idefics2Config:
    """A small Idefics2 whose shapes keep the real model's proportions where it matters for cost."""
    return Idefics2Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=VOCAB,
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            pad_token_id=PAD_ID,
        ),
        vision_config=dict(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=3,
            image_size=224,
            patch_size=PATCH,
        ),
        perceiver_config=dict(
            hidden_size=384,
            resampler_n_latents=LATENTS,
            resampler_depth=2,
            resampler_n_heads=6,
            resampler_head_dim=64,
            num_key_value_heads=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
    )


def documents(n: int, seed: int = 0) -> list[TokenizedDocument]:
    """OBELICS-like documents: text runs of lognormal length around 1-3 images of mixed sizes."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        n_images = int(torch.randint(1, 4, (), generator=g))
        ids: list[int] = []
        labels: list[int] = []
        tiles, masks = [], []
        for _ in range(n_images + 1):
            length = min(int(math.exp(4.3 + 0.8 * float(torch.randn((), generator=g)))), 500)
            text = torch.randint(3, VOCAB - 3, (length,), generator=g).tolist()
            ids += text
            labels += text
            if len(tiles) < n_images:
                side = int(torch.randint(8, 17, (), generator=g)) * PATCH
                other = max(PATCH, int(side * float(torch.empty(()).uniform_(0.5, 1.0, generator=g))))
                h, w = (side, other) if float(torch.rand((), generator=g)) < 0.5 else (other, side)
                tiles.append(torch.randn(1, 3, h, w, generator=g))
                masks.append(torch.ones(1, h, w, dtype=torch.long))
                image = [FAKE_TOKEN_ID] + [IMAGE_TOKEN_ID] * LATENTS + [FAKE_TOKEN_ID]
                ids += image
                labels += [IGNORE_INDEX] * len(image)
        height = max(t.shape[-2] for t in tiles)
        width = max(t.shape[-1] for t in tiles)
        pixels = torch.zeros(n_images, 3, height, width)
        pixel_mask = torch.zeros(n_images, height, width, dtype=torch.long)
        for i, (t, m) in enumerate(zip(tiles, masks)):
            pixels[i, :, : t.shape[-2], : t.shape[-1]] = t[0]
            pixel_mask[i, : m.shape[-2], : m.shape[-1]] = m[0]
        docs.append(TokenizedDocument(ids, labels, pixels, pixel_mask, [1] * n_images))
    return docs


def padded_batch(docs: list[TokenizedDocument]) -> dict[str, torch.Tensor]:
    """transformers' layout: rows right-padded to the longest, images (batch, max_images, 3, H, W)."""
    length = max(map(len, docs))
    n_images = max(d.n_tiles for d in docs)
    height = max(d.pixel_values.shape[-2] for d in docs)
    width = max(d.pixel_values.shape[-1] for d in docs)
    batch = {
        "input_ids": torch.full((len(docs), length), PAD_ID),
        "attention_mask": torch.zeros(len(docs), length, dtype=torch.long),
        "labels": torch.full((len(docs), length), IGNORE_INDEX),
        "pixel_values": torch.zeros(len(docs), n_images, 3, height, width),
        "pixel_attention_mask": torch.zeros(len(docs), n_images, height, width, dtype=torch.long),
    }
    for row, doc in enumerate(docs):
        batch["input_ids"][row, : len(doc)] = torch.tensor(doc.input_ids)
        batch["attention_mask"][row, : len(doc)] = 1
        batch["labels"][row, : len(doc)] = torch.tensor(doc.labels)
        h, w = doc.pixel_values.shape[-2:]
        batch["pixel_values"][row, : doc.n_tiles, :, :h, :w] = doc.pixel_values
        batch["pixel_attention_mask"][row, : doc.n_tiles, :h, :w] = doc.pixel_attention_mask
    return batch


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cpu, cuda, cuda:N) and ``--dtype`` (float32, bfloat16) for both sides alike."""
    parser.add_argument("--device", default="cpu", help="where both models run: cpu (default), cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (other values, e.g. ``max_length_q``, as they are)."""
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device = torch.device("cpu")
) -> dict[str, float]:
    """Median wall time of each run, the runs interleaved within each repeat (so that a change in the
    machine's load hits both sides alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine(device: torch.device, threads: int) -> str:
    """One line naming where a benchmark ran, printed above its table."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {threads} thread(s), torch {torch.__version__}"
