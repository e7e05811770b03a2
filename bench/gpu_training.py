"""Training at GPU scale: (a) ours padding-free with the fastest attention, (b) ours with the dense
document mask (the previous path), (c) transformers' ``Idefics3ForConditionalGeneration`` with padding.

    python bench/gpu_training.py --device cuda --dtype bfloat16 --shape 2b --mix obelics [--compile]
    python bench/gpu_training.py                       # CPU, tiny shape: what tests/test_bench.py runs
    bash bench/gpu_training.sh                         # the whole GPU measurement, one script

Shapes: ``2b`` is an Idefics3-shaped model of ~2.2B parameters (SmolVLM-2.2B's layout): SigLIP-SO400M
(1152 wide x 27 layers, 14 px patches) on 378 px tiles (27 x 27 patches: transformers drops the partial
patches of SmolVLM's 384 px tiles, so both give the same tokens), pixel shuffle 3 (81 tokens per tile),
a Llama decoder of SmolLM2-1.7B's shape (2048 wide x 24 layers, 32 heads, 49,152-token vocabulary);
``tiny`` keeps that layout at CPU sizes. Data: rows of ``--seq-len`` tokens (8,192 at 2b) packed from
``obelics`` (interleaved documents: lognormal text runs around 1-3 images) or ``cauldron`` (one image,
a short question and answer) length mixes, one tile per image, loss on the text. All sides hold the same
weights (``vlm.hf.from_transformers``; (a) and (b) are one model whose attention implementation is
switched) and take one AdamW step per batch; (c) takes the same documents padded, in as many steps.
Before timing, (c)'s loss on its first padded batch must equal ours on that batch.

Measures per side: tokens/s (real tokens), peak memory (as ``bench/training.py``) and MFU = useful FLOPs /
seconds / peak. Useful FLOPs are counted from the shapes (``useful_flops``): 6 x (matmul parameters x the
tokens they see) for forward + backward, plus causal attention within each document (and full attention
within each tile in the tower); padding and cross-document attention count nothing. Peak: the
datasheet's dense bf16 rate for H100/H200 (989 TFLOP/s), else the measured matmul rate. The last line is a
JSON list of ``{measure, ours, reference, unit, ratio, goal}``: (a) against (b) and (a) against (c).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from common import interleaved_seconds, machine, to_device
from torch import nn
from training import peak_step_memory, train_pass
from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from callbacks.telemetry import measure_peak_flops
from datamodules.packing import TokenizedDocument, collate_rows, pack
from lit_modules.sharding import compile_decoder_blocks
from vlm.attention import resolve_attention
from vlm.config import IGNORE_INDEX
from vlm.hf import from_transformers

PAD, IMAGE, FAKE, TILE, PATCH, SCALE = 0, 3, 4, 378, 14, 3
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // SCALE**2
SHAPES = {
    "2b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=49152, rope_theta=130000.0, tie_word_embeddings=True),
        seq_len=8192,
    ),
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=True),
        seq_len=1024,
    ),
}  # fmt: skip
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}
GOALS = {"a/b tokens/s": 1.5, "a/c tokens/s": 2.0}


def hf_config(shape: str) -> Idefics3Config:
    s = SHAPES[shape]
    return Idefics3Config(
        vision_config=dict(s["vision"], image_size=TILE, patch_size=PATCH),
        text_config=dict(s["text"], model_type="llama", max_position_embeddings=16384, pad_token_id=PAD),
        scale_factor=SCALE,
        image_token_id=IMAGE,
    )


def documents(mix: str, n_tokens: int, vocab: int, seq_len: int, seed: int = 0) -> list[TokenizedDocument]:
    """``mix`` documents of about ``n_tokens`` tokens in all; text runs of at most ``seq_len / 8`` tokens."""
    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_tokens:
        n_images = int(torch.randint(1, 4, (), generator=g)) if mix == "obelics" else 1
        median = 5.5 if mix == "obelics" else 4.3  # ~250 tokens per text run, or ~75
        ids: list[int] = []
        labels: list[int] = []
        tiles = []
        for run in range(n_images + 1):
            if mix == "obelics" or run > 0:
                n = min(int(math.exp(median + 0.8 * float(torch.randn((), generator=g)))), seq_len // 8)
                text = torch.randint(5, vocab, (n,), generator=g).tolist()
                ids, labels = ids + text, labels + text
            if run < n_images:
                tiles.append(torch.randn(3, TILE, TILE, generator=g))
                image = [FAKE] + [IMAGE] * TOKENS_PER_TILE + [FAKE]
                ids, labels = ids + image, labels + [IGNORE_INDEX] * len(image)
        pixels = torch.stack(tiles)
        docs.append(TokenizedDocument(ids, labels, pixels, torch.ones(n_images, TILE, TILE, dtype=torch.long),
                             [1] * n_images))  # fmt: skip
        total += len(ids)
    return docs


def padded_batch(docs: list[TokenizedDocument]) -> dict[str, torch.Tensor]:
    """transformers' layout: rows right-padded to the longest, tiles (batch, max_images, 3, H, W)."""
    length, n_images = max(map(len, docs)), max(d.n_tiles for d in docs)
    batch = {
        "input_ids": torch.full((len(docs), length), PAD),
        "attention_mask": torch.zeros(len(docs), length, dtype=torch.long),
        "labels": torch.full((len(docs), length), IGNORE_INDEX),
        "pixel_values": torch.zeros(len(docs), n_images, 3, TILE, TILE),
    }
    for row, doc in enumerate(docs):
        batch["input_ids"][row, : len(doc)] = torch.tensor(doc.input_ids)
        batch["attention_mask"][row, : len(doc)] = 1
        batch["labels"][row, : len(doc)] = torch.tensor(doc.labels)
        batch["pixel_values"][row, : doc.n_tiles] = doc.pixel_values
    return batch


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def useful_flops(model, docs: list[TokenizedDocument]) -> float:
    """Forward + backward FLOPs of the documents: matmuls on the tokens that use them, causal attention
    within each document, full attention within each tile (``model`` is ours, for its shapes)."""
    lm, vit = model.language_model, model.vision_tower.vit
    text_cfg, vision_cfg = lm.config, vit.config
    tokens = sum(len(d) for d in docs)
    tiles = sum(d.n_tiles for d in docs)
    patches = tiles * (TILE // PATCH) ** 2
    matmul = linear_params(lm.model.layers) * tokens + lm.lm_head.weight.numel() * tokens
    matmul += linear_params(vit.encoder) * patches + linear_params(model.connector) * tiles * TOKENS_PER_TILE
    attention_width = text_cfg.num_attention_heads * (text_cfg.hidden_size // text_cfg.num_attention_heads)
    causal = sum(len(d) * (len(d) + 1) / 2 for d in docs) * 4 * attention_width * text_cfg.num_hidden_layers
    vision = tiles * (TILE // PATCH) ** 4 * 4 * vision_cfg.hidden_size * vision_cfg.num_hidden_layers
    return 3 * (2 * matmul + causal + vision)


def set_attention(model, name: str) -> None:
    """Switch ours between (a) and (b): the LM's and the tower's attention implementation."""
    model.language_model.config._attn_implementation = name
    model.vision_tower.vit.config._attn_implementation = name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--mix", choices=["obelics", "cauldron"], default="obelics")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="auto", help="side (a)'s attn_implementation")
    parser.add_argument("--compile", action="store_true", help="compile_blocks on ours (both sides)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fastest = resolve_attention(args.attention, "--attention")
    seq_len = SHAPES[args.shape]["seq_len"]

    reference = Idefics3ForConditionalGeneration(hf_config(args.shape)).train()
    ours = from_transformers(reference).train()
    reference.to(device, dtype)
    ours.to(device, dtype)
    if args.compile:
        compile_decoder_blocks(ours)
    vocab = SHAPES[args.shape]["text"]["vocab_size"]
    docs = documents(args.mix, seq_len * args.rows * args.steps, vocab, seq_len)
    rows = pack([d for d in docs if len(d) <= seq_len], seq_len)
    docs = [d for row in rows for d in row]
    per_step = math.ceil(len(rows) / args.steps)
    packed = {
        "a": [to_device(collate_rows(rows[i : i + per_step], PAD, seq_len), device)
              for i in range(0, len(rows), per_step)],
        "b": [to_device(collate_rows(rows[i : i + per_step], PAD, seq_len, padding_free=False), device)
              for i in range(0, len(rows), per_step)],
    }  # fmt: skip
    docs_per_step = math.ceil(len(docs) / len(packed["a"]))
    padded = [to_device(padded_batch(docs[i : i + docs_per_step]), device)
              for i in range(0, len(docs), docs_per_step)]  # fmt: skip
    batches = {**packed, "c": padded}

    set_attention(ours, "sdpa")
    with torch.no_grad():
        expected = float(reference(**padded[0]).loss)
        got = float(ours(**padded[0], return_logits=False).loss)
    if abs(got - expected) > (1e-4 if dtype == torch.float32 else 2e-2) * abs(expected):
        raise SystemExit(f"loss differs on the same padded batch: ours {got} vs transformers {expected}")

    optimizers = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-5),
                  "c": torch.optim.AdamW(reference.parameters(), lr=1e-5)}  # fmt: skip

    def run(side: str, side_batches: list[dict] | None = None) -> None:
        side_batches = batches[side] if side_batches is None else side_batches
        if side == "c":
            train_pass(reference, optimizers["c"], side_batches)
            return
        set_attention(ours, fastest if side == "a" else "sdpa")
        train_pass(ours, optimizers["ours"], side_batches, return_logits=False)

    for side in batches:  # warm-up (compilation, allocator, optimizer state)
        run(side, batches[side][:1])
    seconds = interleaved_seconds(
        {side: lambda side=side: run(side) for side in batches}, args.repeats, device
    )
    memory = {
        side: max(peak_step_memory(lambda b=b, side=side: run(side, [b]), device) for b in side_batches)
        for side, side_batches in batches.items()
    }
    tokens = sum(len(d) for d in docs)
    flops = useful_flops(ours, docs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in DATASHEET_BF16.items() if k in name and dtype == torch.bfloat16), None)
    peak = peak or measure_peak_flops(device, size=2048 if device.type == "cpu" else 8192, dtype=dtype)
    throughput = {side: tokens / s for side, s in seconds.items()}
    mfu = {side: flops / s / peak for side, s in seconds.items()}
    print(f"{machine(device, args.threads)}, {args.dtype}, shape {args.shape}, compile {args.compile}")
    print(f"{args.mix} mix: {len(docs)} documents, {tokens} tokens, {len(rows)} rows of {seq_len}")
    print(
        f"(a) attention {fastest}; peak {peak / 1e12:.2f} TFLOP/s; useful FLOPs per pass {flops / 1e12:.3f} T"
    )
    print(f"{'side':<44}{'tokens/s':>12}{'peak MiB':>12}{'MFU':>8}")
    labels = {"a": f"(a) ours, padding-free, {fastest}", "b": "(b) ours, dense mask, sdpa",
              "c": "(c) transformers Idefics3, padded, sdpa"}  # fmt: skip
    for side in batches:
        print(f"{labels[side]:<44}{throughput[side]:>12.1f}{memory[side] / 2**20:>12.1f}{mfu[side]:>8.3f}")
    results = []
    for other in ("b", "c"):
        for measure, unit, values, higher_is_better in [
            ("tokens/s", "tokens/s", throughput, True),
            ("peak memory", "MiB", {k: v / 2**20 for k, v in memory.items()}, False),
            ("MFU", "fraction of peak", mfu, True),
        ]:
            ours_value, other_value = values["a"], values[other]
            ratio = ours_value / other_value if higher_is_better else other_value / ours_value
            key = f"a/{other} {measure}"
            results.append({"measure": key, "ours": ours_value, "reference": other_value, "unit": unit,
                            "ratio": ratio, "goal": GOALS.get(key)})  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
