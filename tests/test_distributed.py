"""DDP and FSDP2 (``ModelParallelStrategy``) for VLMModule on CPU with gloo, activation checkpointing,
and the non-finite-loss guard across ranks.

In-process tests cover block discovery and activation checkpointing. The multi-process tests run
``tests/distributed_scripts/train.py`` (Lightning re-launches it for rank 1) and read its JSON
report: per batch, every rank's loss and a hash of the full weights.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from timm.models.vision_transformer import Block as TimmBlock
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from datamodules.synthetic import write_shards
from lit_modules import TrainingPolicy, VLMModule
from lit_modules.sharding import repeated_blocks
from vlm.config import VisionConfig, get_preset
from vlm.connectors import PerceiverLayer
from vlm.cross_attention import GatedCrossAttentionBlock
from vlm.model import VisionLanguageModel

SCRIPT = Path(__file__).parent / "distributed_scripts" / "train.py"
TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
OPEN_CLIP_VIT = "vlm-test-distributed-tiny-vit"
# LoRA / DoRA on the backbones and a frozen connector; no dropout, so runs of different layouts compare.
ADAPTERS_AND_FROZEN = {
    "vision_tower": "lora",
    "connector": "frozen",
    "language_model": "dora",
    "lora_dropout": 0.0,
}


# ------------------------------------------------------------------ in process


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> str:
    """Registers a tiny open_clip ViT (its own blocks: ``transformer.resblocks``)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    (folder / f"{OPEN_CLIP_VIT}.json").write_text(
        json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text})
    )
    open_clip.add_model_config(folder)
    return OPEN_CLIP_VIT


@pytest.mark.parametrize(
    ("backend", "block_type"),
    [("siglip", SiglipEncoderLayer), ("timm", TimmBlock), ("open_clip", ResidualAttentionBlock)],
)
def test_repeated_blocks_of_every_tower_and_component(backend, block_type, tiny_open_clip):
    vision = {
        "siglip": VisionConfig(backend="siglip", **TINY_VIT),
        "timm": VisionConfig(backend="timm", model_name="vit_so400m_patch14_siglip_384", **TINY_VIT),
        "open_clip": VisionConfig(backend="open_clip", model_name=tiny_open_clip),
    }[backend]
    config = dataclasses.replace(get_preset("idefics2-tiny"), vision=vision, fusion="cross_attention")
    model = VisionLanguageModel(config)
    kinds = [type(block) for block in repeated_blocks(model)]
    # 2 of each: vision blocks, perceiver layers, cross-attention blocks, decoder layers
    assert (
        kinds
        == [block_type] * 2
        + [PerceiverLayer] * 2
        + [GatedCrossAttentionBlock] * 2
        + [MistralDecoderLayer] * 2
    )


def _batch(module: VLMModule) -> dict[str, torch.Tensor]:
    """Two rows with one image each (cross-attention fusion: one <image> marker per image)."""
    image = module.model.image_token_id
    input_ids = torch.tensor([[25, 29, image, 30, 31, 32, 33], [27, image, 28, 29, 30, 31, 32]])
    labels = input_ids.masked_fill(input_ids == image, -100)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.rand(2, 1, 3, 32, 32)}


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients_and_keys():
    """With the cross-attention fusion, whose blocks run from pre-hooks of decoder layers."""
    policy = TrainingPolicy(vision_tower="lora", language_model="dora", lora_dropout=0.0)
    modules = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        modules[checkpointing] = VLMModule(
            fusion="cross_attention", policy=policy, activation_checkpointing=checkpointing
        )
        modules[checkpointing].configure_model()
    batch = _batch(modules[False])
    grads, calls = {}, {}
    for checkpointing, module in modules.items():
        with torch.no_grad():  # non-trivial adapters and gates (both start at 0)
            torch.manual_seed(1)
            for name, param in module.model.named_parameters():
                if "lora_B" in name or "gate" in name:
                    param.add_(torch.randn_like(param) * 0.1)
        counts = calls[checkpointing] = []
        for block in repeated_blocks(module.model):
            block.register_forward_pre_hook(lambda *_, counts=counts: counts.append(1))
        module(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
    n_blocks = len(repeated_blocks(modules[True].model))
    assert len(calls[False]) == n_blocks and len(calls[True]) == 2 * n_blocks  # forward + recomputation
    assert modules[True].state_dict().keys() == modules[False].state_dict().keys()
    assert grads[True].keys() == grads[False].keys()
    assert any("cross_attention" in n for n in grads[True]) and all(
        g is not None for g in grads[True].values()
    )
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-6, msg=name)


def test_fsdp_mixed_precision_needs_model_parallel_strategy():
    with pytest.raises(ValueError, match="needs ModelParallelStrategy"):
        VLMModule(fsdp_mixed_precision=True).configure_model()


# ------------------------------------------------------------------ multi-process (gloo, CPU)


def run(tmp_path: Path, name: str, args: str, *json_args: str, torchrun: bool = False) -> dict[str, Any]:
    """Run the training script and return its report (``name``.json; final weights in ``name``.pt).

    ``args``: space-separated options; ``json_args``: options whose values hold spaces. Lightning
    launches the second rank itself, or ``torchrun`` launches both (Lightning then only joins them).
    """
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / f"{name}.json"
    command = [*launcher, str(SCRIPT), *args.split(), *json_args, "--out", str(out)]
    command += ["--weights", str(tmp_path / f"{name}.pt")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def losses_per_step(report: dict[str, Any], batches_per_step: int = 1) -> list[float]:
    """Mean loss of each optimizer step over ranks and accumulated micro-batches."""
    steps = report["steps"]
    chunks = [steps[i : i + batches_per_step] for i in range(0, len(steps), batches_per_step)]
    return [sum(sum(s["losses"]) for s in chunk) / sum(len(s["losses"]) for s in chunk) for chunk in chunks]


def trace(steps: list[dict[str, Any]]) -> list[tuple[list[float], list[str]]]:
    """Every rank's loss and weights' hash, batch after batch."""
    return [(s["losses"], s["hashes"]) for s in steps]


def load_weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / f"{name}.pt", weights_only=True)


def test_fsdp2_bf16_cross_attention_new_token_rows_and_a_nonfinite_step_on_one_rank(tmp_path):
    """torchrun, FSDP2 with bf16 mixed precision, activation checkpointing, cross-attention fusion and
    ``train_new_token_embeddings``; 4 samples, so every step sees the same batch. Rank 0's loss is NaN
    at step 1: both ranks skip it (same counters, weights untouched) and training goes on."""
    policy = dict(vision_tower="frozen", connector="full", language_model="lora", cross_attention="full")
    policy["train_new_token_embeddings"] = True
    args = "--strategy fsdp --fusion cross_attention --samples 4 --batch-size 2 --max-steps 4 --lr 3e-3"
    args += " --activation-checkpointing --mixed-precision --nan-at 0 1"
    report = run(tmp_path, "bf16", args, "--policy", json.dumps(policy), torchrun=True)
    assert report["global_step"] == 4 and report["hidden_dtype"] == "torch.bfloat16"
    assert report["nonfinite"] == [[1, 0], [1, 0]]  # (total, consecutive) on each rank
    steps = report["steps"]
    assert steps[1]["hashes"] == steps[0]["hashes"]  # the skipped step changed no weight
    assert all(len(set(s["hashes"])) == 1 for s in steps)
    losses = [sum(s["losses"]) / 2 for s in steps]
    assert losses[0] > losses[2] > losses[3]
    assert len(report["generated"][0]) == 4 and report["generated"][0] == report["generated"][1]

    torch.manual_seed(0)  # the script's initial weights (seed_everything(0))
    initial = VLMModule(fusion="cross_attention", policy=TrainingPolicy(**policy))
    initial.configure_model()
    key = "model.language_model.model.embed_tokens.weight"
    before, after = initial.state_dict()[key], load_weights(tmp_path, "bf16")[key]
    changed = set((after != before).any(1).nonzero().flatten().tolist())
    assert changed and changed <= set(initial.model.special_token_ids.values())


FSDP_COMMON = (
    f"--max-steps 6 --gradient-clip 1.0 --policy={json.dumps(ADAPTERS_AND_FROZEN, separators=(',', ':'))}"
)
FSDP_ACCUMULATE = "--strategy fsdp --batch-size 1 --accumulate 2 --activation-checkpointing"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    """One process with batches of 4, and FSDP2 on 2 ranks with micro-batches of 1 and 2-step gradient
    accumulation (the same 4 samples per step), with activation checkpointing and a consolidated
    checkpoint every 2 steps (8 samples: one epoch per 2 steps)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    run(tmp_path, "single", f"--strategy single --batch-size 4 {FSDP_COMMON}")
    run(
        tmp_path,
        "fsdp",
        f"{FSDP_ACCUMULATE} {FSDP_COMMON} --consolidated --save-every 2 --ckpt-dir consolidated",
    )
    return tmp_path


@pytest.mark.slow
def test_fsdp2_losses_and_weights_match_one_process(fsdp_runs):
    single = json.loads((fsdp_runs / "single.json").read_text())
    fsdp = json.loads((fsdp_runs / "fsdp.json").read_text())
    assert single["global_step"] == fsdp["global_step"] == 6
    assert len(fsdp["steps"]) == 12 and all(len(s["losses"]) == 2 for s in fsdp["steps"])
    single_losses, fsdp_losses = losses_per_step(single), losses_per_step(fsdp, batches_per_step=2)
    assert single_losses[-1] < single_losses[0]
    assert fsdp_losses == pytest.approx(single_losses, rel=0, abs=1e-5)
    reference, sharded = load_weights(fsdp_runs, "single"), load_weights(fsdp_runs, "fsdp")
    assert reference.keys() == sharded.keys()
    assert any("lora_magnitude_vector" in k for k in sharded) and any("base_layer" in k for k in sharded)
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-4, msg=key)
    consolidated = torch.load(fsdp_runs / "consolidated" / "step=6.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(consolidated[k], v) for k, v in sharded.items())
    assert fsdp["generated"] == [fsdp["generated_unsharded"]] * 2  # generate gathers the root's weights


@pytest.mark.slow
def test_fsdp2_resumes_from_consolidated_then_sharded_checkpoints(fsdp_runs):
    """Resume from the consolidated step-2 checkpoint (saving sharded ones), then from the sharded
    step-4 directory: the same losses and weights, bit for bit, as the uninterrupted run."""
    tmp_path = fsdp_runs
    resume = f"{FSDP_ACCUMULATE} {FSDP_COMMON} --resume"
    first = run(
        tmp_path, "from_consolidated", f"{resume} consolidated/step=2.ckpt --save-every 2 --ckpt-dir sharded"
    )
    assert (tmp_path / "sharded" / "step=4.ckpt").is_dir()  # a distributed checkpoint: one file per rank
    second = run(tmp_path, "from_sharded", f"{resume} sharded/step=4.ckpt")
    uninterrupted = json.loads((tmp_path / "fsdp.json").read_text())["steps"]
    assert trace(first["steps"]) == trace(uninterrupted[4:])
    assert trace(second["steps"]) == trace(uninterrupted[8:])
    assert first["global_step"] == second["global_step"] == 6
    final, resumed = load_weights(tmp_path, "fsdp"), load_weights(tmp_path, "from_sharded")
    assert all(torch.equal(resumed[k], v) for k, v in final.items())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards("laion_coco", root, 64, seed=0)
    return root


@pytest.mark.slow
def test_ddp_skips_a_nonfinite_step_on_every_rank_and_resumes_exactly(tmp_path, shards):
    """DDP with LoRA / DoRA / frozen parts, cross-attention fusion, LoRA dropout (reseeded per step), the
    streaming datamodule (exact data position); rank 1's loss is NaN at step 1."""
    policy = json.dumps({**ADAPTERS_AND_FROZEN, "lora_dropout": 0.1, "cross_attention": "full"})
    args = f"--strategy ddp --data shards --shards {shards} --fusion cross_attention --max-steps 4"
    full = run(tmp_path, "ddp", f"{args} --nan-at 1 1 --save-every 2 --ckpt-dir ckpt", "--policy", policy)
    steps = full["steps"]
    assert full["global_step"] == 4 and full["nonfinite"] == [[1, 0], [1, 0]]
    assert all(len(set(s["hashes"])) == 1 for s in steps)  # the replicas stay identical
    assert steps[1]["hashes"] == steps[0]["hashes"] and steps[2]["hashes"] != steps[1]["hashes"]
    resumed = run(tmp_path, "resumed", f"{args} --resume ckpt/step=2.ckpt", "--policy", policy)
    assert resumed["global_step"] == 4 and trace(resumed["steps"]) == trace(steps[2:])
