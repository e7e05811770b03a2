"""Training step throughput, peak memory and MFU of ``VisionLanguageModel`` against transformers' Idefics2.

    python bench/training.py [--docs 48] [--repeats 3] [--threads 2] [--device cuda] [--dtype bfloat16]

Both models hold the same weights (``vlm.hf.from_transformers``) of a small Idefics2 (SigLIP-style
tower 192 wide x 4 layers, 14 px patches, perceiver 2 x 16 latents, Mistral-style LM 384 wide x 4
layers with the real 32,000-token vocabulary) and train in this process on the same OBELICS-like
documents: lognormal text lengths, 1-3 images each of mixed sizes and aspect ratios (longest side
112-224 px), labels on the text tokens. The reference gets padded batches, as transformers' collators
and processors make them (8 documents per batch, rows padded to the longest, images to the batch's
largest count and canvas); ours gets the same documents packed into rows of 1,024 tokens
(``datamodules.packing``: per-document attention, flat tiles) and split into as many optimizer steps
as the reference takes. A step is forward + backward + AdamW. Timing: each repeat runs one pass over
all documents on each side, interleaved; the median repeat counts. Tokens/s counts the real (non-padding)
tokens. Peak memory: the largest sum of live allocations during one step (on CPU from torch profiler
memory events, on CUDA ``torch.cuda.max_memory_allocated``), minus what was allocated before it.
MFU: the useful FLOPs of a pass (counted by ``torch.utils.flop_counter`` on our packed pass) per
second over the measured rate of a large matmul in the benchmark's dtype
(``callbacks.telemetry.measure_peak_flops``) on the same device. Before timing, our loss on the
reference's padded batch must equal the reference's (same weights, same unpacked batch; within 1e-4
relative in float32, 1e-2 in bfloat16). The last line printed is a JSON list of ``{measure, ours,
reference, unit, ratio, goal}`` (ratio > 1 is better for this codebase).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
from common import (
    PAD_ID,
    add_device_arguments,
    documents,
    idefics2_config,
    interleaved_seconds,
    machine,
    padded_batch,
    synchronize,
    to_device,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import Idefics2ForConditionalGeneration

from callbacks.telemetry import measure_peak_flops
from datamodules.packing import TokenizedDocument, collate_rows, pack
from vlm.hf import from_transformers

MAX_SEQ_LEN, DOCS_PER_BATCH = 1024, 8
GOALS = {"training tokens/s": 1.5, "training peak memory": 1 / 0.7, "training MFU": None}


def packed_batches(docs: list[TokenizedDocument], n_steps: int) -> list[dict[str, torch.Tensor]]:
    """The documents packed into rows of ``MAX_SEQ_LEN`` tokens, split into ``n_steps`` batches."""
    rows = pack(docs, MAX_SEQ_LEN)
    per_step = math.ceil(len(rows) / n_steps)
    return [collate_rows(rows[i : i + per_step], PAD_ID) for i in range(0, len(rows), per_step)]


def real_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Real (non-padding) tokens: packed batches mark them by ``document_ids``, padded ones by the mask."""
    return sum(
        int((b["document_ids"] > 0).sum() if "document_ids" in b else b["attention_mask"].sum())
        for b in batches
    )


def train_pass(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], **forward_kwargs
) -> list[float]:
    """One optimizer step per batch (each side called as its training code calls it); returns the losses."""
    losses = []
    for batch in batches:
        loss = model(**batch, **forward_kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Largest sum of live allocations on ``device`` while ``step`` runs, relative to its start (bytes)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def pass_flops(model: torch.nn.Module, batches: list[dict]) -> int:
    """FLOPs of forward + backward over ``batches`` (matmuls and attention, as torch counts them).

    Counted with the math attention kernel: torch's FLOP formula for the fused kernels rejects
    grouped-query shapes (``enable_gqa``), and the math kernel does the same useful work."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_device_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    reference = Idefics2ForConditionalGeneration(idefics2_config()).train()
    ours = from_transformers(reference).train()
    reference.to(device, dtype)
    ours.to(device, dtype)
    docs = documents(args.docs)
    reference_batches = [
        to_device(padded_batch(docs[i : i + DOCS_PER_BATCH]), device)
        for i in range(0, len(docs), DOCS_PER_BATCH)
    ]
    our_batches = [to_device(b, device) for b in packed_batches(docs, len(reference_batches))]
    tokens = real_tokens(reference_batches)
    assert tokens == real_tokens(our_batches), "both sides must see the same tokens"
    slots = sum(b["attention_mask"].numel() for b in reference_batches)
    packed_slots = sum(b["input_ids"].numel() for b in our_batches)

    with torch.no_grad():
        expected = float(reference(**reference_batches[0]).loss)
        got = float(ours(**reference_batches[0], return_logits=False).loss)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    if abs(got - expected) > tolerance * abs(expected):
        raise SystemExit(f"loss differs on the same unpacked batch: ours {got} vs transformers {expected}")

    optimizers = {
        "ours": torch.optim.AdamW(ours.parameters(), lr=1e-5),
        "reference": torch.optim.AdamW(reference.parameters(), lr=1e-5),
    }
    models = {"ours": ours, "reference": reference}
    batches = {"ours": our_batches, "reference": reference_batches}
    # VLMModule.training_step asks for the loss only; transformers' Trainer calls the model plainly.
    forward_kwargs = {"ours": {"return_logits": False}, "reference": {}}

    def run(name: str, run_batches: list[dict]) -> list[float]:
        return train_pass(models[name], optimizers[name], run_batches, **forward_kwargs[name])

    for name in models:  # warm-up (allocator, optimizer state)
        run(name, batches[name][:1])
    seconds = interleaved_seconds(
        {name: lambda name=name: run(name, batches[name]) for name in models}, args.repeats, device
    )
    memory = {
        name: max(peak_step_memory(lambda b=b, name=name: run(name, [b]), device) for b in batches[name])
        for name in models
    }
    useful_flops = pass_flops(ours, our_batches)
    peak = measure_peak_flops(device, size=2048 if device.type == "cpu" else 8192, dtype=dtype)

    throughput = {name: tokens / s for name, s in seconds.items()}
    mfu = {name: useful_flops / s / peak for name, s in seconds.items()}
    print(f"{machine(device, args.threads)}, {args.dtype}")
    print(
        f"{args.docs} documents, {tokens} real tokens; reference: {len(reference_batches)} padded batches "
        f"({tokens / slots:.1%} real tokens), ours: {sum(len(b['input_ids']) for b in our_batches)} packed "
        f"rows of {MAX_SEQ_LEN} in {len(our_batches)} steps ({tokens / packed_slots:.1%} real tokens)"
    )
    print(f"same unpacked batch: loss {got:.6f} (ours) vs {expected:.6f} (transformers)")
    print(
        f"matmul peak {peak / 1e9:.1f} GFLOP/s ({args.dtype}); useful FLOPs per pass "
        f"{useful_flops / 1e9:.1f} G"
    )
    print(f"{'measure':<26}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    rows = [
        ("training tokens/s", throughput["ours"], throughput["reference"], "tokens/s", True),
        ("training peak memory", memory["ours"] / 2**20, memory["reference"] / 2**20, "MiB", False),
        ("training MFU", mfu["ours"], mfu["reference"], "fraction of matmul peak", True),
    ]
    results = []
    for measure, value, ref, unit, higher_is_better in rows:
        ratio = value / ref if higher_is_better else ref / value
        print(f"{measure:<26}{value:>12.3f}{ref:>14.3f}{ratio:>7.2f}x")
        results.append(
            {"measure": measure, "ours": value, "reference": ref, "unit": unit, "ratio": ratio,
             "goal": GOALS[measure]}
        )  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
