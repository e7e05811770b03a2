"""What VLMModule checkpoints hold, and exact resume after a hard kill.

- Frozen weights still as loaded from a path (``vision.pretrained`` / ``language.pretrained``) are
  left out (``save_frozen_weights=False``, the default) and read from the path again on resume; adapters,
  trained components and embedding tables are kept; weights changed by an adapter merge are kept.
- ``python -m lightning fit`` killed with SIGKILL mid-run, then resumed from its last checkpoint,
  logs the same per-step losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from datamodules import VLMDataModule
from datamodules.synthetic import write_shards
from lit_modules import TrainingPolicy, VLMModule
from vlm.config import get_preset
from vlm.processing import load_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
POLICY = TrainingPolicy(vision_tower="frozen", language_model="lora", connector="full")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SigLIP and a tiny Llama saved with save_pretrained (the shape of real pretrained backbones)."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        )
    )
    vision.save_pretrained(root / "siglip")
    text = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(load_tiny_tokenizer()),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    text.save_pretrained(root / "llama")
    return root / "siglip", root / "llama"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards("laion_coco", root, 8, seed=0)
    return root


def module(backbones: tuple[Path, Path], **kwargs) -> VLMModule:
    config = get_preset("idefics3-tiny")
    config.vision.intermediate_size = 37  # any value: sizes come from the checkpoint
    config.vision.pretrained, config.language.pretrained = map(str, backbones)
    torch.manual_seed(0)
    return VLMModule(model=config, policy=POLICY, lr=1e-3, max_steps=4, **kwargs)


def fit(module: VLMModule, shards: Path, max_steps: int, ckpt_path: Path | None = None) -> Trainer:
    source = {"source": "laion_coco", "urls": f"{shards}/*.tar", "weight": 1.0, "max_seq_len": 256}
    data = VLMDataModule(
        [source],
        recipe="idefics3",
        image_seq_len=4,
        image_processor={"longest_edge": 64, "tile_size": 32},
        batch_size=2,
        max_seq_len=256,
        shuffle_block=4,
        pack_window=4,
    )
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def trained(backbones, shards, tmp_path_factory) -> tuple[VLMModule, Path]:
    trained = module(backbones)
    trainer = fit(trained, shards, 2)
    path = tmp_path_factory.mktemp("ckpt") / "step2.ckpt"
    trainer.save_checkpoint(path)
    return trained, path


def test_frozen_weights_from_a_path_are_not_duplicated(trained):
    trained_module, path = trained
    checkpoint = torch.load(path, weights_only=True)
    saved, omitted = set(checkpoint["state_dict"]), set(checkpoint["omitted_weights"]["keys"])
    params = dict(trained_module.named_parameters())
    frozen_vision = {n for n in params if n.startswith("model.vision_tower.")}
    tables = {"model.language_model.model.embed_tokens.weight", "model.language_model.lm_head.weight"}
    frozen_text = {n for n in params if n.startswith("model.language_model.") and not params[n].requires_grad}
    frozen_text -= tables  # embedding tables are always saved (special tokens may resize them)
    adapted_bases = {n for n in frozen_text if ".layers." in n and "base_layer" in n}
    assert frozen_vision and adapted_bases and omitted == frozen_vision | frozen_text
    assert not saved & omitted
    assert any(".lora_A." in n for n in saved) and any(n.startswith("model.connector.") for n in saved)
    assert tables <= saved
    assert len(saved) + len(omitted) == len(trained_module.state_dict())


def test_resume_reads_left_out_weights_from_the_path(trained, backbones, shards):
    trained_module, path = trained
    restored = module(backbones)
    restored.configure_model()
    checkpoint = torch.load(path, weights_only=True)
    restored.on_load_checkpoint(checkpoint)  # what Lightning calls before load_state_dict
    restored.load_state_dict(checkpoint["state_dict"])
    expected = trained_module.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in restored.state_dict().items())
    trainer = fit(module(backbones), shards, 3, ckpt_path=path)  # a real resume runs on
    assert trainer.global_step == 3


def test_save_frozen_weights_keeps_everything(backbones):
    full = module(backbones, save_frozen_weights=True)
    full.configure_model()
    checkpoint = {"state_dict": full.state_dict()}
    full.on_save_checkpoint(checkpoint)
    assert "omitted_weights" not in checkpoint and len(checkpoint["state_dict"]) == len(full.state_dict())


def test_weights_changed_by_a_merge_are_saved(backbones):
    staged = module(backbones)
    staged.configure_model()
    with torch.no_grad():  # a trained adapter: the merge changes the frozen base weights
        for name, param in staged.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    staged.set_policy(TrainingPolicy(vision_tower="frozen", language_model="frozen"))
    checkpoint = {"state_dict": staged.state_dict()}
    staged.on_save_checkpoint(checkpoint)
    omitted = checkpoint["omitted_weights"]["keys"]
    text = [n for n in omitted if n.startswith("model.language_model.")]
    assert any(n.startswith("model.vision_tower.") for n in omitted)
    assert text and all("norm" in n for n in text)  # untouched norms stay out; merged linears are saved
    assert "model.language_model.model.layers.0.self_attn.q_proj.weight" in checkpoint["state_dict"]


def test_resume_from_other_backbones_is_refused(trained, backbones, tmp_path):
    _, path = trained
    other = tmp_path / "llama-copy"
    LlamaForCausalLM.from_pretrained(backbones[1]).save_pretrained(other)
    restored = module((backbones[0], other))
    restored.configure_model()
    with pytest.raises(ValueError, match="left out frozen weights loaded from"):
        restored.on_load_checkpoint(torch.load(path, weights_only=True))


# --- kill and resume ---------------------------------------------------------------------------


def demo_fit_args(root: Path, data: Path, max_steps: int) -> list[str]:
    """The demo config on tiny data in ``data`` (shared by the runs compared: the shard paths seed the
    shuffle), a checkpoint every step and per-step losses under ``root``."""
    source = {"source": "cauldron", "weight": 1.0, "max_seq_len": 64}
    train = [{**source, "urls": f"{data}/cauldron/clevr/*.parquet"}]
    callbacks = [
        {"class_path": "cli_fixtures.LossLog", "init_args": {"path": str(root / "losses.jsonl")}},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1},
        },
    ]
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.max_steps={max_steps}",
        f"--model.max_steps={max_steps}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--data.data_root={data}",
        f"--data.synthetic={json.dumps({'cauldron': 16})}",
        "--data.val_synthetic={}",
        f"--data.sources={json.dumps(train)}",
        "--data.val_sources=[]",
        "--data.batch_size=4",
        "--data.shuffle_block=8",
        "--data.pack_window=8",
    ]


def run_lightning(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1", **env}
    command = [sys.executable, "-m", "lightning", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def losses(path: Path) -> dict[int, float]:
    """Step -> loss; a step logged again after a resume replaces the killed run's entry."""
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_killed_and_resumed_run_logs_the_same_losses(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for root in (reference, killed):
        root.mkdir()
    data = tmp_path / "data"
    done = run_lightning(demo_fit_args(reference, data, 6), reference)
    assert done.returncode == 0, done.stderr[-3000:]
    crash = run_lightning(demo_fit_args(killed, data, 6), killed, KILL_AT_STEP="4")
    assert crash.returncode == -9, crash.stderr[-3000:]  # SIGKILL in the middle of step 4
    assert sorted(losses(killed / "losses.jsonl")) == [0, 1, 2, 3]
    last = killed / "ckpt" / "epoch=0-step=4.ckpt"
    resumed = run_lightning([*demo_fit_args(killed, data, 6), f"--ckpt_path={last}"], killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(killed / "losses.jsonl") == losses(reference / "losses.jsonl")
    assert sorted(losses(reference / "losses.jsonl")) == list(range(6))
