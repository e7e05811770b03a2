"""Greedy generation throughput of ``VisionLanguageModel.generate`` against transformers' Idefics2.

    python bench/generation.py [--prompts 8] [--new-tokens 48] [--repeats 3] [--threads 2]
                               [--device cuda] [--dtype bfloat16]

Both models hold the same weights (``vlm.hf.from_transformers``) of the small Idefics2 of
``bench/common.py`` and decode greedily with a KV cache, in this process, from the same left-padded
prompts (text of mixed lengths around 1-2 images of mixed sizes, transformers' padded image layout for
both), without an end-of-sequence token, so every row decodes ``--new-tokens`` tokens. The generated
tokens must be identical before anything is timed. Timing: each repeat generates once on each side,
interleaved; the median repeat counts; tokens/s = new tokens of all rows / seconds (image encoding
and prefill included, as a user waits for them). The last line printed is a JSON list of
``{measure, ours, reference, unit, ratio, goal}`` (ratio > 1 is better for this codebase).
"""

from __future__ import annotations

import argparse
import json

import torch
from common import (
    FAKE_TOKEN_ID,
    IMAGE_TOKEN_ID,
    LATENTS,
    PAD_ID,
    VOCAB,
    add_device_arguments,
    idefics2_config,
    interleaved_seconds,
    machine,
    to_device,
)
from transformers import Idefics2ForConditionalGeneration

from vlm.hf import from_transformers

GOAL = 1.2


def prompts(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` left-padded prompts of 20-200 text tokens around 1-2 images of 112-224 px sides."""
    g = torch.Generator().manual_seed(seed)
    rows, images = [], []
    for _ in range(n):
        n_images = int(torch.randint(1, 3, (), generator=g))
        row: list[int] = []
        sample_images = []
        for _ in range(n_images):
            row += torch.randint(
                3, VOCAB - 3, (int(torch.randint(10, 100, (), generator=g)),), generator=g
            ).tolist()
            row += [FAKE_TOKEN_ID] + [IMAGE_TOKEN_ID] * LATENTS + [FAKE_TOKEN_ID]
            h, w = (int(torch.randint(8, 17, (), generator=g)) * 14 for _ in range(2))
            sample_images.append(torch.randn(3, h, w, generator=g))
        row += torch.randint(
            3, VOCAB - 3, (int(torch.randint(10, 100, (), generator=g)),), generator=g
        ).tolist()
        rows.append(row)
        images.append(sample_images)
    length = max(map(len, rows))
    max_images = max(map(len, images))
    height = max(i.shape[1] for sample in images for i in sample)
    width = max(i.shape[2] for sample in images for i in sample)
    batch = {
        "input_ids": torch.full((n, length), PAD_ID),
        "attention_mask": torch.zeros(n, length, dtype=torch.long),
        "pixel_values": torch.zeros(n, max_images, 3, height, width),
        "pixel_attention_mask": torch.zeros(n, max_images, height, width, dtype=torch.long),
    }
    for r, (row, sample_images) in enumerate(zip(rows, images)):
        batch["input_ids"][r, length - len(row) :] = torch.tensor(row)
        batch["attention_mask"][r, length - len(row) :] = 1
        for i, image in enumerate(sample_images):
            batch["pixel_values"][r, i, :, : image.shape[1], : image.shape[2]] = image
            batch["pixel_attention_mask"][r, i, : image.shape[1], : image.shape[2]] = 1
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_device_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    reference = Idefics2ForConditionalGeneration(idefics2_config()).eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = PAD_ID
    ours = from_transformers(reference).eval()
    reference.to(device, dtype)
    ours.to(device, dtype)
    batch = to_device(prompts(args.prompts), device)
    n = args.new_tokens

    def run_reference() -> torch.Tensor:
        with torch.inference_mode():
            return reference.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return ours.generate(**batch, max_new_tokens=n, pad_token_id=PAD_ID)

    expected, got = run_reference(), run_ours()
    if not torch.equal(expected, got):
        rows = (expected != got).any(1).nonzero().flatten().tolist()
        raise SystemExit(f"greedy tokens differ from transformers' in rows {rows}")
    seconds = interleaved_seconds({"ours": run_ours, "reference": run_reference}, args.repeats, device)
    tokens_per_s = {name: args.prompts * n / s for name, s in seconds.items()}
    ratio = tokens_per_s["ours"] / tokens_per_s["reference"]
    print(f"{machine(device, args.threads)}, {args.dtype}")
    print(
        f"{args.prompts} prompts ({batch['input_ids'].shape[1]} tokens padded, "
        f"{int((batch['pixel_attention_mask'].flatten(2).any(2)).sum())} images) x {n} new tokens; "
        f"greedy tokens identical to transformers'"
    )
    ours_rate, reference_rate = tokens_per_s["ours"], tokens_per_s["reference"]
    print(f"{'measure':<26}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'generation tokens/s':<26}{ours_rate:>12.1f}{reference_rate:>14.1f}{ratio:>7.2f}x")
    result = {"measure": "generation tokens/s", "ours": ours_rate, "reference": reference_rate}
    print(json.dumps([{**result, "unit": "tokens/s", "ratio": ratio, "goal": GOAL}]))


if __name__ == "__main__":
    main()
