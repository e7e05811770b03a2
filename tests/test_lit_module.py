"""VLMModule: build once, training policies (frozen/full/LoRA/DoRA), optimizer groups, schedules,
fit / resume / NaN guard with Lightning on CPU, adapter merging, generation-based validation, and
trainable-parameter counts of the full-scale presets (built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from idefics_fixtures import tiny_idefics2
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from datamodules import VLMDataModule
from datamodules.synthetic import write_shards
from lit_modules import TrainingPolicy, VLMModule
from lit_modules.optim import lr_lambda, no_weight_decay, param_groups
from lit_modules.policy import COMPONENTS
from vlm.config import IMAGE_TOKEN

MODES = ("frozen", "full", "lora", "dora")


def build(**kwargs) -> VLMModule:
    torch.manual_seed(0)
    module = VLMModule(**kwargs)
    module.configure_model()
    return module


def trainable(module: VLMModule, component: str) -> set[str]:
    return {n for n, p in getattr(module.model, component).named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards("laion_coco", root / "laion_coco", 16, seed=0)
    return root


def datamodule(root: Path, fusion: str = "autoregressive") -> VLMDataModule:
    """Batches for idefics2-tiny, as configs/data/tiny.yaml (32-64 px tiles, 8 tokens per tile)."""
    source = {
        "source": "laion_coco",
        "urls": str(root / "laion_coco" / "*.tar"),
        "weight": 1.0,
        "max_seq_len": 128,
    }
    return VLMDataModule(
        [source],
        image_seq_len=8,
        fusion=fusion,
        image_processor={"shortest_edge": 32, "longest_edge": 64},
        batch_size=2,
        max_seq_len=128,
        max_tiles_per_row=8,
        shuffle_block=4,
        pack_window=4,
    )


def trainer(max_steps: int, **kwargs) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_configure_model_builds_once_and_fusion_overrides_the_preset():
    module = VLMModule(fusion="cross_attention")
    assert module.model is None  # built in configure_model, not __init__
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model and model.config.fusion == "cross_attention"
    assert model.image_token_id == module.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


@pytest.mark.parametrize("mode", MODES)
def test_policy_trainable_parameters_per_component(mode):
    module = build(fusion="cross_attention", policy=TrainingPolicy(**dict.fromkeys(COMPONENTS, mode)))
    for component in COMPONENTS:
        names = trainable(module, component)
        every = {n for n, _ in getattr(module.model, component).named_parameters()}
        if mode == "frozen":
            assert not names
        elif mode == "full":
            assert names == every
        else:
            kinds = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if mode == "dora" else set())
            assert names == {n for n in every if any(k in n for k in kinds)}
            assert {k for k in kinds if any(k in n for n in names)} == kinds


def test_lora_targets_only_the_backbones_block_linears():
    module = build()
    adapted = {
        n.split(".lora_")[0] for n in trainable(module, "vision_tower") | trainable(module, "language_model")
    }
    assert adapted and all(".layers." in n for n in adapted)
    assert not any(("patch_embedding" in n or "lm_head" in n or "embed_tokens" in n) for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {
        *("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        *("o_proj", "gate_proj", "up_proj", "down_proj"),
    }


def test_train_new_token_embeddings_updates_only_special_rows():
    module = build(policy=TrainingPolicy(language_model="frozen", train_new_token_embeddings=True))
    embeddings = module.model.language_model.get_input_embeddings().weight
    input_ids = torch.tensor([[1, 2, 6, 7]])
    module.model(input_ids=input_ids, labels=input_ids).loss.backward()
    rows = embeddings.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [6]  # <end_of_utterance>, the only special token in the row


def test_param_groups_skip_decay_on_norms_biases_embeddings_latents_gates():
    module = build(fusion="cross_attention", policy=TrainingPolicy(**dict.fromkeys(COMPONENTS, "full")))
    skip = no_weight_decay(module.model)
    for name in (
        "language_model.model.norm.weight",
        "vision_tower.vit.encoder.layers.0.self_attn.q_proj.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",  # untied output embeddings (idefics2-tiny)
        "vision_tower.vit.embeddings.position_embedding.weight",
        "connector.perceiver_resampler.latents",
        "cross_attention.blocks.0.attn_gate",
    ):
        assert name in skip, name
    assert "language_model.model.layers.0.self_attn.q_proj.weight" not in skip
    groups = {g["name"]: g for g in param_groups(module.model, 1e-4, 0.1, {"vision_tower": 0.5})}
    assert groups["vision_tower/decay"]["lr"] == 5e-5 and groups["connector/decay"]["lr"] == 1e-4
    assert (
        groups["connector/no_decay"]["weight_decay"] == 0.0
        and groups["connector/decay"]["weight_decay"] == 0.1
    )
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == sum(1 for p in module.model.parameters() if p.requires_grad)


def test_lr_multipliers_of_absent_components_are_ignored_and_unknown_names_rejected():
    """A config tuned for both fusions names ``cross_attention``: ignored under autoregressive fusion."""
    module = build(fusion="autoregressive")
    groups = {g["name"]: g["lr"] for g in param_groups(module.model, 1e-3, 0.0, {"cross_attention": 5.0})}
    assert not any(name.startswith("cross_attention") for name in groups) and set(groups.values()) == {1e-3}
    with pytest.raises(ValueError, match=r"'vision'.*choose from.*'vision_tower'"):
        param_groups(module.model, 1e-3, 0.0, {"vision": 2.0})


def test_schedules_warmup_middle_end():
    cosine = lr_lambda("cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert cosine(0) == pytest.approx(1 / 11) and cosine(9) == pytest.approx(10 / 11)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    linear = lr_lambda("linear", 0, 100)
    assert linear(0) == 1.0 and linear(50) == pytest.approx(0.5) and linear(100) == 0.0
    assert lr_lambda("constant", 5, 100)(99) == 1.0


def test_fit_three_steps_with_the_datamodule(shards):
    module = VLMModule(lr=1e-3, warmup_steps=1)
    fit = trainer(3)
    fit.fit(module, datamodule=datamodule(shards))
    assert fit.global_step == 3
    assert torch.isfinite(fit.callback_metrics["train/loss"])
    assert fit.callback_metrics["train/lr"] == pytest.approx(1e-3 * 0.5)  # step 2 of a cosine over 1..3


def test_checkpoint_resume_with_lora_dora_and_frozen_parts(shards, tmp_path):
    policy = TrainingPolicy(
        vision_tower="lora", connector="frozen", language_model="dora", cross_attention="full"
    )
    kwargs = dict(fusion="cross_attention", policy=policy, lr=1e-3)
    first = trainer(2)
    torch.manual_seed(0)
    first.fit(VLMModule(**kwargs), datamodule=datamodule(shards, "cross_attention"))
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any("lora_magnitude_vector" in k for k in saved) and any("base_layer" in k for k in saved)

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    restored = VLMModule(**kwargs)
    trainer(2).fit(restored, datamodule=datamodule(shards, "cross_attention"), ckpt_path=ckpt)
    assert restored.state_dict().keys() == saved.keys()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved.items())

    resumed = trainer(3)
    resumed.fit(VLMModule(**kwargs), datamodule=datamodule(shards, "cross_attention"), ckpt_path=ckpt)
    assert resumed.global_step == 3 and torch.isfinite(resumed.callback_metrics["train/loss"])


def test_checkpoint_after_a_policy_switch_loads_into_a_fresh_module():
    stage1 = build()
    stage1.set_policy(TrainingPolicy(language_model="full", vision_tower="dora"))
    checkpoint = {"state_dict": stage1.state_dict()}
    stage1.on_save_checkpoint(checkpoint)
    fresh = build()  # the default policy: LoRA adapters where the checkpoint has DoRA / none
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert fresh.policy == stage1.policy


def test_nonfinite_loss_skips_the_step_then_raises(shards, monkeypatch):
    module = build(max_nonfinite_steps=2)
    forward = module.model.forward
    calls = []

    def flaky(**batch):
        out = forward(**batch)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(module.model, "forward", flaky)
    fit = trainer(3)
    fit.fit(module, datamodule=datamodule(shards))
    assert module.total_nonfinite == 1 and module.consecutive_nonfinite == 0
    assert fit.callback_metrics["train/nonfinite_steps"] == 1

    before = {k: v.clone() for k, v in module.state_dict().items()}
    monkeypatch.setattr(
        module.model, "forward", lambda **b: type(forward(**b))(logits=None, loss=torch.tensor(torch.inf))
    )
    with pytest.raises(RuntimeError, match=r"not finite .* for 2 steps in a row"):
        trainer(6).fit(module, datamodule=datamodule(shards))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # weights untouched


def test_merge_adapters_keeps_outputs_and_removes_adapters():
    module = build(
        fusion="cross_attention", policy=TrainingPolicy(vision_tower="dora", language_model="lora")
    )
    plain_keys = build(
        fusion="cross_attention", policy=TrainingPolicy(vision_tower="frozen", language_model="frozen")
    )
    with torch.no_grad():  # non-trivial adapters (lora_B starts at 0)
        for name, param in module.model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.1)
    module.eval()
    input_ids = torch.tensor([[1, 5, 9, 10, 11]])
    pixel_values = torch.randn(1, 3, 32, 32)
    before = module.model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert module.merge_adapters() > 0
    after = module.model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert not any("lora_" in k or "base_layer" in k for k in module.state_dict())
    assert module.state_dict().keys() == plain_keys.state_dict().keys()


def test_validation_logs_loss_and_exact_match_accuracy():
    module = build()
    tokenizer = module.tokenizer
    prompts = tokenizer(
        ["a red circle", "two blue squares"], padding=True, padding_side="left", return_tensors="pt"
    )
    batch = {"prompt_input_ids": prompts.input_ids, "prompt_attention_mask": prompts.attention_mask}
    predictions = module.generate_answers(batch)
    ids = tokenizer(["a red circle"], return_tensors="pt").input_ids
    texts = ["a red circle", "two blue squares"]
    batch |= {
        "input_ids": ids,
        "labels": ids,
        "references": [[f"  {predictions[0].upper()} "], [predictions[1] + "x"]],
        **{"indices": [0, 1], "ids": texts, "prompts": texts, "questions": texts},
        **{"stop_words": [[], []], "records": [{}, {}]},
    }
    metrics = trainer(1).validate(module, dataloaders=DataLoader([batch], batch_size=None), verbose=False)[0]
    assert metrics["val/acc"] == pytest.approx(0.5) and metrics["val/loss"] > 0


def lora_params(r: int, shapes: list[tuple[int, int]]) -> int:
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


def expected_trainable(preset: str, r: int = 8) -> int:
    """Trainable parameters under the default policy, from the papers' sizes: LoRA r*(in+out) per
    attention/MLP linear of SigLIP-SO400M and the 8B LM, plus the whole connector."""
    d, ff, vis, vis_ff = 4096, 14336, 1152, 4304
    kv = 8 * 128  # 8 key-value heads of 128
    vision = 27 * lora_params(r, [(vis, vis)] * 4 + [(vis, vis_ff), (vis_ff, vis)])
    text = 32 * lora_params(r, [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)])
    if preset == "idefics3":
        connector = 4 * vis * d  # pixel shuffle 2x2 then linear, no bias
    else:
        inner, kv_inner = 16 * 96, 4 * 96
        projection = 2 * vis * ff + ff * d  # SwiGLU 1152 -> 14336 -> 4096
        layer = 3 * d + d * inner + 2 * d * kv_inner + inner * d + 3 * d * 4 * d
        connector = projection + 64 * d + 3 * layer + d  # latents, 3 layers, final norm
    return vision + text + connector


@pytest.mark.parametrize("preset", ["idefics2", "idefics3"])
def test_full_scale_trainable_parameter_counts_on_meta(preset):
    module = VLMModule(model=preset, tokenizer=None)
    with torch.device("meta"):
        module.configure_model()
    count = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert count == expected_trainable(preset)


@pytest.mark.parametrize("fusion", [None, "cross_attention"])
def test_from_transformers_checkpoint(tmp_path, fusion):
    hf_model = tiny_idefics2()
    hf_model.save_pretrained(tmp_path)
    module = build(from_transformers=str(tmp_path), tokenizer=None, fusion=fusion)
    assert module.model.config.fusion == (fusion or "autoregressive")
    weights = dict(module.model.named_parameters())
    hf_weight = hf_model.state_dict()["model.text_model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(weights["language_model.model.layers.0.mlp.up_proj.base_layer.weight"], hf_weight)
