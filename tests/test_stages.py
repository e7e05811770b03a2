"""StageTransition with VLMModule and VLMDataModule on CPU: each stage's mixture, resolution, sequence
length, policy (LoRA merged, DoRA added, optimizer rebuilt) and learning-rate schedule take effect at
its step; a resume before or after the boundary gives the same losses as the uninterrupted run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import StageTransition
from callbacks.stages import Stage
from datamodules import VLMDataModule
from datamodules.synthetic import write_shards
from lit_modules import TrainingPolicy, VLMModule
from lit_modules.optim import LRSchedule

STAGE_0_POLICY = TrainingPolicy(vision_tower="frozen", language_model="lora", lora_dropout=0.1)
STAGE_1_POLICY = TrainingPolicy(vision_tower="dora", language_model="dora", lora_dropout=0.1)


def stages() -> list[Stage]:
    return [
        Stage(
            start_step=0,
            name="low-res pairs",
            mixture={"laion_coco": 1.0},
            max_resolution=32,
            max_seq_len=96,
            policy=STAGE_0_POLICY,
            lr=1e-3,
            schedule="constant",
        ),
        Stage(
            start_step=3,
            name="high-res documents",
            mixture={"laion_coco": 0.5, "obelics": 0.5},
            max_resolution=64,
            max_seq_len=128,
            policy=STAGE_1_POLICY,
            lr=5e-4,
            schedule="cosine",
        ),
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards("laion_coco", root / "laion_coco", 24, seed=0)
    write_shards("obelics", root / "obelics", 24, seed=0)
    return root


def datamodule(root: Path) -> VLMDataModule:
    sources = [
        {"source": name, "urls": str(root / name / pattern), "weight": 1.0, "max_seq_len": 128}
        for name, pattern in (("laion_coco", "*.tar"), ("obelics", "*"))
    ]
    return VLMDataModule(
        sources,
        image_seq_len=8,
        image_processor={"shortest_edge": 16, "longest_edge": 64},
        batch_size=2,
        max_seq_len=128,
        max_tiles_per_row=8,
        shuffle_block=4,
        pack_window=4,
    )


class Recorder(Callback):
    """Per global step: loss, learning rate, row length, largest image side, trainable and optimized names."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mask = batch["pixel_attention_mask"]
        names = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.steps[trainer.global_step] = {
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "row_len": batch["input_ids"].shape[1],
            "side": max(int(mask.any(-1).sum(-1).max()), int(mask.any(-2).sum(-1).max())),
            "trainable": names,
            "optimized_all": optimized == {id(p) for p in pl_module.parameters() if p.requires_grad},
            "policy": pl_module.policy,
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step - 1]["loss"] = float(outputs["loss"])


def fit(root: Path, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None):
    torch.manual_seed(0)
    module = VLMModule(lr=1e-3, max_steps=6, policy=TrainingPolicy(vision_tower="full"))
    data, recorder, transition = datamodule(root), Recorder(), StageTransition(stages())
    callbacks = [recorder, transition]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module, data, recorder.steps, transition


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    return fit(shards, 6, ckpt_dir=checkpoints), checkpoints


def test_each_stage_takes_effect_at_its_step(uninterrupted):
    (_, module, data, steps, transition), _ = uninterrupted
    assert transition.stage_index == 1
    for step in range(3):  # stage 0: constant 1e-3, low resolution, short rows, LoRA LM + frozen vision
        assert steps[step]["lr"] == pytest.approx(1e-3)
        assert steps[step]["side"] <= 32 and steps[step]["row_len"] <= 96
        assert steps[step]["policy"] == STAGE_0_POLICY
        assert not any(n.startswith("model.vision_tower.") for n in steps[step]["trainable"])
        assert any(".lora_A." in n for n in steps[step]["trainable"])
        assert not any("lora_magnitude" in n for n in steps[step]["trainable"])
    for step, progress in zip(range(3, 6), (0, 1 / 3, 2 / 3)):  # stage 1: cosine from 5e-4 over steps 3-5
        assert steps[step]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert steps[step]["policy"] == STAGE_1_POLICY
        vision = [n for n in steps[step]["trainable"] if n.startswith("model.vision_tower.")]
        assert vision and all("lora_" in n for n in vision) and any("lora_magnitude" in n for n in vision)
    assert max(steps[s]["side"] for s in range(3, 6)) > 32
    assert max(steps[s]["row_len"] for s in range(3, 6)) > 96
    assert all(steps[s]["optimized_all"] for s in range(6))  # the optimizer follows the policy
    # obelics (weight 0 in stage 0) is only read after the transition; the stage-0 LoRA was merged:
    assert data.record_stats()["obelics"].read > 0
    assert data.max_seq_len == 128 and data.max_resolution == 64
    assert module.lr_schedule == LRSchedule(5e-4, "cosine", 0, 0.0, start_step=3, end_step=6)
    assert all(math.isfinite(steps[s]["loss"]) for s in range(6))


@pytest.mark.parametrize("resume_step", [2, 4])
def test_resume_before_or_after_the_boundary_repeats_the_losses(uninterrupted, shards, resume_step):
    (_, _, _, steps, _), checkpoints = uninterrupted
    _, _, _, resumed, transition = fit(shards, 6, ckpt_path=checkpoints / f"step={resume_step}.ckpt")
    assert sorted(resumed) == list(range(resume_step, 6)) and transition.stage_index == 1
    for step in range(resume_step, 6):
        assert resumed[step]["loss"] == steps[step]["loss"], step  # bitwise: same RNG draws, same data
        assert resumed[step]["lr"] == pytest.approx(steps[step]["lr"])
        assert resumed[step]["trainable"] == steps[step]["trainable"]


@pytest.mark.parametrize("starts", [[1, 2], [0, 3, 3], [0, 4, 2], []])
def test_stage_lists_must_start_at_0_and_increase(starts):
    with pytest.raises(ValueError, match="strictly increasing start_step values, the first 0"):
        StageTransition([Stage(start_step=s) for s in starts])


def test_a_stage_after_the_end_of_training_is_refused(shards):
    trainer = Trainer(max_steps=6, accelerator="cpu", logger=False, callbacks=[StageTransition(stages()[:1])])
    trainer.callbacks[0].stages.append(Stage(start_step=9))
    with pytest.raises(ValueError, match="starts at step 9, not before the end of training"):
        trainer.fit(VLMModule(max_steps=6), datamodule=datamodule(shards))


def test_unknown_mixture_source_names_the_sources(shards):
    with pytest.raises(ValueError, match=r"\['pdfa'\], not among the sources \['laion_coco', 'obelics'\]"):
        datamodule(shards).set_mixture_weights({"pdfa": 1.0})
