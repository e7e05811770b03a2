"""Trainable parameters of each full recipe under each stage policy, built on the meta device, against
the released models' totals (the recipes' structure and tiny runs: tests/test_recipes.py)."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser
from recipe_configs import FULL, load, stage_table

from lit_modules import TrainingPolicy, VLMModule

TINY_DATA = "lightning_logs/tiny/data"  # the twins' data_root, relative to the working directory


# ------------------------------------------------------------------ trainable parameters on the meta device

COMPONENTS = ("vision_tower", "connector", "language_model")
MODULE_PARSER = ArgumentParser(exit_on_error=False)
MODULE_PARSER.add_class_arguments(VLMModule, "module")


def module_args(name: str, policy: dict) -> dict:
    """The VLMModule arguments of a full config that shape the network, under ``policy``, with nothing to
    load: no tokenizer (the special tokens go after the vocabulary, as in the released models), no
    checkpoint, no pretrained backbone (the sizes spelled out in the config), no FSDP2 (no device mesh).
    The optimisation arguments (lr, schedule...) do not change the network."""
    init = load(name)["model"]["init_args"]
    model = copy.deepcopy(init["model"])
    model["vision"]["pretrained"] = None
    model["language"]["pretrained"] = None
    return {"model": model, "fusion": init.get("fusion"), "policy": policy, "tokenizer": None}


@cache
def meta_build(args_json: str) -> dict[str, Any]:
    """Build a VLMModule on the meta device; returns per-component parameter counts (total, trainable,
    adapters), the base total (adapters excluded) and the new-token rows."""
    parsed = MODULE_PARSER.parse_object({"module": json.loads(args_json)})
    module = MODULE_PARSER.instantiate(parsed).module
    assert isinstance(module, VLMModule)
    with torch.device("meta"):
        module.configure_model()
    model = module.model
    counts: dict[str, Any] = {"trainable": {}, "adapters": {}, "total": {}}
    for component in ("vision_tower", "connector", "language_model", "cross_attention"):
        part = getattr(model, component, None)
        params = list(part.named_parameters()) if part is not None else []
        counts["total"][component] = sum(p.numel() for n, p in params if "lora_" not in n)
        counts["trainable"][component] = sum(p.numel() for _, p in params if p.requires_grad)
        counts["adapters"][component] = sum(p.numel() for n, p in params if "lora_" in n)
    counts["base_total"] = sum(counts["total"].values())
    counts["special_tokens"] = len(set(model.special_token_ids.values()))
    return counts


def adapted_linears(model: dict) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of every linear layer LoRA/DoRA adapts in each backbone, from the config alone: the
    attention and MLP projections of each SigLIP encoder layer and each Mistral/Llama decoder layer."""
    vision, text = model["vision"], model["language"]["config"]
    d, i = vision["hidden_size"], vision["intermediate_size"]
    siglip_layer = [(d, d)] * 4 + [(d, i), (i, d)]  # q, k, v, out_proj; fc1, fc2
    h, n_heads, n_kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim, inter = h // n_heads, text["intermediate_size"]
    decoder_layer = [
        (h, n_heads * head_dim),
        (h, n_kv * head_dim),
        (h, n_kv * head_dim),
        (n_heads * head_dim, h),
    ]
    decoder_layer += [(h, inter), (h, inter), (inter, h)]  # gate, up, down
    return {
        "vision_tower": siglip_layer * vision["num_layers"],
        "language_model": decoder_layer * text["num_hidden_layers"],
    }


def expected_trainable(
    model: dict, policy: dict, totals: dict[str, int], n_new_tokens: int
) -> dict[str, int]:
    """Trainable parameters per component under ``policy``: frozen 0, full all, LoRA r x (in + out) per
    adapted linear (+ out for DoRA's magnitudes); with ``train_new_token_embeddings`` (language model not
    full) the input embedding and output head matrices require gradients (only the new rows get any)."""
    policy = {**TrainingPolicy().__dict__, **policy}
    linears = adapted_linears(model)
    text = model["language"]["config"]
    out = {}
    for component in ("vision_tower", "connector", "language_model"):
        mode = policy[component]
        if mode == "full":
            out[component] = totals[component]
        elif mode == "frozen":
            out[component] = 0
        else:
            assert component in linears, f"no LoRA count for a new component ({component})"
            out[component] = sum(
                policy["lora_r"] * (i + o) + (o if mode == "dora" else 0) for i, o in linears[component]
            )
    if policy["train_new_token_embeddings"] and policy["language_model"] != "full":
        vocab = text["vocab_size"] + n_new_tokens
        out["language_model"] += vocab * text["hidden_size"] * (1 if text.get("tie_word_embeddings") else 2)
    out["cross_attention"] = 0  # autoregressive fusion: no cross-attention blocks
    return out


@cache
def transformers_total(model_json: str, n_new_tokens: int) -> int:
    """Parameters of transformers' Idefics2/Idefics3ForConditionalGeneration with the config's sizes
    (an independent implementation of the same architecture), built on the meta device."""
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
    )

    model = json.loads(model_json)
    vision, connector, language = model["vision"], model["connector"], model["language"]
    text = {**language["config"], "vocab_size": language["config"]["vocab_size"] + n_new_tokens}
    text["model_type"] = language["model_type"]
    vision_config = dict(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_layers"],
        num_attention_heads=vision["num_heads"],
        intermediate_size=vision["intermediate_size"],
    )
    if connector["type"] == "perceiver":
        perceiver = dict(
            hidden_size=language["config"]["hidden_size"],
            resampler_n_latents=connector["num_latents"],
            resampler_depth=connector["depth"],
            resampler_n_heads=connector["num_heads"],
            resampler_head_dim=connector["head_dim"],
            num_key_value_heads=connector["num_key_value_heads"],
        )
        config = Idefics2Config(vision_config=vision_config, perceiver_config=perceiver, text_config=text)
        cls = Idefics2ForConditionalGeneration
    else:
        config = Idefics3Config(
            vision_config=vision_config, text_config=text, scale_factor=connector["scale_factor"]
        )
        cls = Idefics3ForConditionalGeneration
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


# Published sizes (Hugging Face model pages): Idefics2-8B "8.4B params", Idefics3-8B-Llama3 "8.46B params".
RELEASED = {"perceiver": (8.4e9, 0.05e9), "pixel_shuffle": (8.46e9, 0.01e9)}


@pytest.mark.parametrize("name", FULL)
def test_trainable_parameters_under_each_stage_policy(name, capsys):
    config = load(name)
    model = config["model"]["init_args"]["model"]
    policies = []  # the distinct policies the stages train under, in order
    for stage in stage_table(config):
        if stage["policy"] not in policies:
            policies.append(stage["policy"])
    base = None
    for policy in policies:
        counts = meta_build(json.dumps(module_args(name, policy), sort_keys=True))  # cached across configs
        n_new = counts["special_tokens"]
        assert n_new == len(model["language"]["special_tokens"])
        expected = expected_trainable(model, policy, counts["total"], n_new)
        assert counts["trainable"] == expected, (policy, counts["trainable"], expected)
        # the adapters are exactly the LoRA/DoRA parameters counted from the shapes
        for component in ("vision_tower", "language_model"):
            if policy[component] in ("lora", "dora"):
                assert (
                    counts["adapters"][component]
                    == expected_trainable(
                        model, {**policy, "train_new_token_embeddings": False}, counts["total"], n_new
                    )[component]
                )
        assert base is None or counts["base_total"] == base  # the policy never changes the base model
        base = counts["base_total"]
        with capsys.disabled():
            rows = 2 * n_new * model["language"]["config"]["hidden_size"]
            print(
                f"\n{name} {json.dumps({k: policy[k] for k in COMPONENTS})}: "
                f"trainable {sum(expected.values()):,} "
                f"({ {k: f'{v:,}' for k, v in expected.items() if v} }; of the embedding/head matrices only "
                f"{rows:,} new-token entries learn)"
            )
    reference = transformers_total(json.dumps(model, sort_keys=True), n_new)
    released, tolerance = RELEASED[model["connector"]["type"]]
    with capsys.disabled():
        print(f"{name}: total {base:,} (transformers {reference:,}; released ~{released / 1e9:.2f}B)")
    assert base == reference
    assert abs(base - released) <= tolerance
