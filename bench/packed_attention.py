"""Packed-row attention: peak memory and time of a forward + backward, dense document mask against
padding-free, at 2k, 8k and 16k tokens.

    python bench/packed_attention.py [--lengths 2048 8192 16384] [--repeats 2] [--threads 2]
                                     [--device cuda] [--dtype bfloat16] [--attention sdpa]

One ``VisionLanguageModel`` (text only: a Llama decoder 256 wide x 2 layers, 4 heads of 64, 32,000-token
vocabulary; the attention is what differs, so the images are left out) takes one packed row of each
length, filled with documents of lognormal lengths (median ~400 tokens, OBELICS-like), collated both
ways by ``datamodules.packing.collate_rows``: (dense) ``padding_free=False``, the model builds the
additive (1, 1, seq, seq) mask in the model dtype and the LM runs sdpa with it; (padding-free) per-document
``position_ids`` + ``cu_seq_lens``, the LM's ``--attention`` (sdpa: transformers builds a boolean block
mask from the position ids; on a GPU, ``varlen`` / flash attention build none). The two losses must
agree (1e-4 relative) before anything is timed. A step is ``forward(return_logits=False)`` + backward
(no optimizer: the attention is what is compared). Timing: the sides interleaved, median of
``--repeats``. Peak memory as ``bench/training.py`` measures it. The last line printed is a JSON list of
``{measure, ours, reference, unit, ratio, goal}`` with ours = padding-free, reference = dense mask.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from common import add_device_arguments, interleaved_seconds, machine, to_device
from training import peak_step_memory

from datamodules.packing import TokenizedDocument, collate_rows, pack
from vlm.config import get_preset
from vlm.model import VisionLanguageModel

LM = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4
)


def row_of(length: int, seed: int = 0) -> list[TokenizedDocument]:
    """Documents of lognormal lengths (median ~400 tokens) filling one row of exactly ``length`` tokens."""
    g = torch.Generator().manual_seed(seed)
    docs, left = [], length
    while left:
        n = min(left, max(8, int(math.exp(6.0 + 0.8 * float(torch.randn((), generator=g))))))
        ids = torch.randint(3, LM["vocab_size"] - 3, (n,), generator=g).tolist()
        docs.append(TokenizedDocument(ids, ids))
        left -= n
    (row,) = pack(docs, length)
    return row


def build(attention: str, device: torch.device, dtype: torch.dtype) -> VisionLanguageModel:
    config = get_preset("idefics3-tiny")
    config.language.config = dict(LM, num_key_value_heads=4, max_position_embeddings=32768)
    config.language.attn_implementation = attention
    torch.manual_seed(0)
    return VisionLanguageModel(config).train().to(device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--attention", default="sdpa", help="the padding-free side's language.attn_implementation"
    )
    add_device_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense_model = build("sdpa", device, dtype)
    free_model = build(args.attention, device, dtype)
    free_model.load_state_dict(dense_model.state_dict())
    models = {"padding-free": free_model, "dense": dense_model}
    print(f"{machine(device, args.threads)}, {args.dtype}; padding-free attention: {args.attention}")
    print(f"{'tokens':>7}{'docs':>6}  {'measure':<22}{'padding-free':>14}{'dense mask':>12}{'ratio':>8}")
    results = []
    for length in args.lengths:
        row = row_of(length)
        batches = {
            "padding-free": to_device(collate_rows([row], 0, length), device),
            "dense": to_device(collate_rows([row], 0, length, padding_free=False), device),
        }

        def step(name: str, batches: dict = batches) -> float:
            loss = models[name](**batches[name], return_logits=False).loss
            loss.backward()
            models[name].zero_grad(set_to_none=True)
            return float(loss.detach())

        losses = {name: step(name) for name in models}  # also the warm-up
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        if abs(losses["padding-free"] - losses["dense"]) > tolerance * abs(losses["dense"]):
            raise SystemExit(f"{length} tokens: the two layouts disagree: {losses}")
        seconds = interleaved_seconds({n: lambda n=n: step(n) for n in models}, args.repeats, device)
        memory = {n: peak_step_memory(lambda n=n: step(n), device) / 2**20 for n in models}
        for measure, unit, free, dense, ratio in [
            ("tokens/s", "tokens/s", length / seconds["padding-free"], length / seconds["dense"], None),
            ("peak memory", "MiB", memory["padding-free"], memory["dense"], None),
        ]:
            ratio = free / dense if measure == "tokens/s" else dense / free
            print(f"{length:>7}{len(row):>6}  {measure:<22}{free:>14.1f}{dense:>12.1f}{ratio:>7.2f}x")
            results.append(
                {"measure": f"packed forward+backward {measure}, {length} tokens", "ours": free,
                 "reference": dense, "unit": unit, "ratio": ratio, "goal": None}
            )  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
