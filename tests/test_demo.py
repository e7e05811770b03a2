"""The CPU demo (``configs/demo.yaml``): the config parses, ``prepare_data`` writes the synthetic
shards once (validation on another seed, and no validation image among the training ones),
generation-validation batches are honest prompts, and a few training steps plus one generation
validation run through the demo's own code path (the LightningCLI entry point with small overrides).
The full demo (minutes, each fusion) is the ``slow`` test."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules import VLMDataModule
from datamodules.held_out import question_items
from datamodules.sample import Sample
from datamodules.sources import iter_samples
from datamodules.synthetic_content import draw_scene, random_scene
from lit_modules import VLMModule
from runners.cli import main
from vlm.config import IMAGE_TOKEN, VLMConfig
from vlm.evaluation.batch import collate_prompts

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def demo_data() -> dict:
    """The ``data.init_args`` of the demo config."""
    return yaml.safe_load(DEMO.read_text())["data"]["init_args"]


def demo_args(tmp_path: Path, small: bool = True) -> list[str]:
    """The demo config with its data and outputs under ``tmp_path``; ``small``: 32 training and 8
    validation Cauldron conversations and small shuffle / packing buffers."""
    data = tmp_path / "data"
    source = {"source": "cauldron", "weight": 1.0, "max_seq_len": demo_data()["max_seq_len"]}
    train = [{**source, "urls": f"{data}/cauldron/clevr/*.parquet"}]
    val = [{**source, "urls": f"{data}/val/cauldron/clevr/*.parquet"}]
    args = [
        "--config",
        str(DEMO),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        f"--data.data_root={data}",
        f"--data.sources={json.dumps(train)}",
        f"--data.val_sources={json.dumps(val)}",
    ]
    if small:
        args += [
            f"--data.synthetic={json.dumps({'cauldron': 32})}",
            f"--data.val_synthetic={json.dumps({'cauldron': 8})}",
            "--data.shuffle_block=8",
            "--data.pack_window=8",
        ]
    return args


def test_demo_config_parses_and_is_self_consistent(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo"])  # LightningCLI is given args: no pytest ones
    config = yaml.safe_load(DEMO.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert config["model"]["class_path"] == "lit_modules.VLMModule"
    assert config["data"]["class_path"] == "datamodules.VLMDataModule"
    images = data["image_processor"]
    assert model["image_shape"] == [images["shortest_edge"], images["longest_edge"]]  # the 48x32 images
    assert model["model"]["connector"]["type"] == "mlp"  # one token per patch: 24 per image
    assert not {"tokenizer", "recipe", "image_seq_len", "fusion"} & set(data)  # the model's
    module = VLMModule(VLMConfig.from_dict(model["model"]), image_shape=model["image_shape"])
    assert module.processor_settings().image_seq_len == 24
    sources = (*data["sources"], *data["val_sources"])
    assert all(source["max_seq_len"] == data["max_seq_len"] for source in sources)
    assert set(model["policy"].values()) == {"full"}  # from scratch: everything trained
    assert data["val_generate"] and data["val_synthetic"]
    for source in (*data["sources"], *data["val_sources"]):
        assert source["urls"].startswith(data["data_root"] + "/")
    assert all(s["urls"].startswith(f"{data['data_root']}/val/") for s in data["val_sources"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO), "--print_config"])
    assert exit_info.value.code == 0


def test_prepare_data_writes_absent_shards_once_with_a_held_out_seed(tmp_path):
    data = VLMDataModule(
        [
            {
                "source": "cauldron",
                "urls": f"{tmp_path}/cauldron/clevr/*.parquet",
                "weight": 1.0,
                "max_seq_len": 64,
            }
        ],
        data_root=str(tmp_path),
        synthetic={"cauldron": 4},
        val_synthetic={"cauldron": 4},
    )
    data.prepare_data()
    train = sorted((tmp_path / "cauldron").rglob("*.parquet"))
    val = sorted((tmp_path / "val" / "cauldron").rglob("*.parquet"))
    assert train and val
    assert {p.read_bytes() for p in train}.isdisjoint({p.read_bytes() for p in val})
    mtimes = [p.stat().st_mtime_ns for p in train + val]
    data.prepare_data()  # present: not rewritten
    assert [p.stat().st_mtime_ns for p in train + val] == mtimes
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    with pytest.raises(ValueError, match="data_root"):
        VLMDataModule([], synthetic={"cauldron": 4})
    with pytest.raises(ValueError, match="synthetic_options"):
        VLMDataModule([], data_root=str(tmp_path), synthetic={"cauldron": 4}, synthetic_options={"pdfa": {}})


def test_demo_validation_images_are_not_training_images(tmp_path):
    """The demo's held-out split holds out images, not only records: every image of the validation
    shards (pixels hashed) differs from every image of the training shards, as the demo writes them."""
    config = demo_data()
    data = VLMDataModule(
        [],
        data_root=str(tmp_path),
        seed=config["seed"],
        synthetic=config["synthetic"],
        val_synthetic=config["val_synthetic"],
        synthetic_options=config["synthetic_options"],
    )
    data.prepare_data()

    def image_hashes(folder: Path) -> list[str]:
        samples = iter_samples("cauldron", [str(p) for p in sorted(folder.rglob("*.parquet"))])
        return [hashlib.sha256(image.tobytes()).hexdigest() for sample in samples for image in sample.images]

    train, val = image_hashes(tmp_path / "cauldron"), image_hashes(tmp_path / "val" / "cauldron")
    n_images = [
        (n + 1) // 2 + n // 2 * 2
        for n in (config["synthetic"]["cauldron"], config["val_synthetic"]["cauldron"])
    ]
    assert [len(train), len(val)] == n_images  # clevr rows have 1 image, mimic_cgd rows 2
    assert set(val).isdisjoint(train)
    assert len(set(val)) == len(val)  # nor repeats within validation


def test_generation_batches_are_left_padded_prompts_without_the_answer(tmp_path):

    rng = random.Random(0)
    scene = random_scene(rng)
    turns = [*scene.qa_pairs(), ("Are the shapes all of the same colour as each other?", "yes")]
    sample = Sample("cauldron", "k", [draw_scene(scene, rng)], turns=turns)
    questions = question_items(sample)
    assert [q.references for q in questions] == [[a] for _, a in turns]
    assert all(q.question.startswith(IMAGE_TOKEN) and q.question.count(IMAGE_TOKEN) == 1 for q in questions)
    data = VLMDataModule([], image_seq_len=8, image_processor={"shortest_edge": 32, "longest_edge": 48})
    batch = collate_prompts(list(enumerate(questions)), data.processor)
    assert batch["references"] == [[a] for _, a in turns]
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padded (the prompts differ in length)
    assert batch["prompt_tiles_per_sample"].tolist() == [1, 1, 1, 1]
    assert batch["prompt_pixel_values"].shape[0] == 4
    tokenizer = data.processor.tokenizer
    for row, row_mask, (question, _answer) in zip(ids, mask, turns):
        text = tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True)
        assert text.endswith(f"{question}\nAssistant:")  # one question, no earlier turns
        assert text.count("Assistant:") == 1
        # The image tokens (8 per tile) are in the prompt.
        assert (row == data.processor.image_token_id).sum() == 8


def test_demo_trains_validates_and_checkpoints_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo"])
    args = demo_args(tmp_path)
    args += [
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--model.warmup_steps=1",
        "--data.batch_size=4",
        "--data.val_batch_size=8",
    ]
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert torch.isfinite(metrics["train/loss"])
    out = capsys.readouterr().out
    assert re.search(r"Final val/acc: \d\.\d{4} at step 3", out)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert {p.name for p in checkpoints} == {"best-step=3.ckpt", "latest-step=3.ckpt"}
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    # 4 clevr conversations held out (8 Cauldron rows: half one-image) = 12 questions, all scored.
    assert sum(1 for _ in (tmp_path / "data" / "val" / "cauldron" / "clevr").glob("*.parquet")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_full_demo_reaches_80_percent(tmp_path, monkeypatch, fusion):
    """The acceptance run (minutes on 2 CPU cores, each fusion): held-out val/acc >= 0.8 at the end."""
    monkeypatch.setattr(sys, "argv", ["demo"])
    args = [
        *demo_args(tmp_path, small=False),
        f"--model.fusion={fusion}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(["fit", *args])
    assert cli.trainer.global_step == yaml.safe_load(DEMO.read_text())["trainer"]["max_steps"]
    assert float(cli.trainer.callback_metrics["val/acc"]) >= 0.8
