"""The training recipes: ``configs/{idefics2,idefics2_sft,idefics2_chatty,idefics3,idefics3_sft}.yaml`` (their
data sections in ``configs/data/``) and their CPU twins, the overlays ``configs/tiny/*.yaml``
(``--config configs/<name>.yaml --config configs/tiny/<name>.yaml``).

- Every full-scale config resolves offline with ``python -m lightning fit --config ... --print_config``,
  and the resolved config holds the papers' numbers (global batch, stages, resolutions, mixtures,
  sequence lengths, policies, learning rates).
- Every full-scale LightningModule is built on the ``meta`` device (no weights, no download) under each
  stage's policy, and its trainable parameter count equals a count derived independently from the layer
  shapes of the config (LoRA: r x (in + out) per adapted linear layer; DoRA: + out magnitudes; full:
  every parameter; frozen: none); the total equals transformers' Idefics2/Idefics3 model of the same
  configuration and the released models' sizes.
- Every tiny twin trains a few steps through every stage transition, in process: each step runs under
  its stage's data settings and policy, the last stage is in effect at the end, and the weights the
  policies freeze do not move.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from recipe_configs import CONFIGS, FULL, callback_args, load, stage_table, twin_args

from callbacks import NEFTune, StageTransition
from callbacks.stages import Stage
from lit_modules import TrainingPolicy, VLMModule
from runners.cli import main
from vlm.config import VLMConfig
from vlm.connectors import visual_tokens_per_tile

TINY_DATA = "lightning_logs/tiny/data"  # the twins' data_root, relative to the working directory


def global_batch(config: dict) -> int:
    trainer, data = config["trainer"], config["data"]["init_args"]
    return trainer["num_nodes"] * trainer["devices"] * data["batch_size"] * trainer["accumulate_grad_batches"]


# ------------------------------------------------------------------ the papers' numbers, per config

IDEFICS2_BACKBONES_LORA = {"vision_tower": "lora", "connector": "full", "language_model": "lora"}
DORA = {"vision_tower": "dora", "connector": "full", "language_model": "dora"}
FROZEN_BACKBONES = {"vision_tower": "frozen", "connector": "full", "language_model": "frozen"}


def check_idefics2(config: dict) -> None:
    """Idefics2 §4.1: two stages (384 then 980 px), 70/30 then 45/35/20 mixtures with sequence lengths
    2048 / 1536 / 1024, global batch 2048, lr 1e-4, LoRA on the backbones (§3.2)."""
    data = config["data"]["init_args"]
    assert global_batch(config) == 2048
    assert config["model"]["init_args"]["lr"] == 1e-4
    lengths = {s["source"]: s["max_seq_len"] for s in data["sources"]}
    assert lengths == {"obelics": 2048, "laion_coco": 1536, "pdfa": 1024, "idl": 1024, "rendered_text": 1024}
    stage1, stage2 = stage_table(config)
    assert (stage1["start_step"], stage1["max_resolution"], stage2["max_resolution"]) == (0, 384, 980)
    assert stage1["mixture"] == {"obelics": 0.7, "laion_coco": 0.3}
    pdf = sum(stage2["mixture"][s] for s in ("pdfa", "idl", "rendered_text"))
    assert (stage2["mixture"]["obelics"], stage2["mixture"]["laion_coco"], round(pdf, 4)) == (0.45, 0.35, 0.2)
    assert stage1["max_seq_len"] == stage2["max_seq_len"] == 2048
    for stage in (stage1, stage2):
        assert {k: stage["policy"][k] for k in IDEFICS2_BACKBONES_LORA} == IDEFICS2_BACKBONES_LORA
    assert "ModelParallelStrategy" in config["trainer"]["strategy"]["class_path"]
    assert config["model"]["init_args"]["fsdp_mixed_precision"] is True


def check_idefics2_sft(config: dict) -> None:
    """Idefics2 §4.2 / Table 14 / §3.4: The Cauldron + text-only data, DoRA, answer-only loss, NEFTune,
    image splitting on 50% of the samples, turn shuffling."""
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert {k: model["policy"][k] for k in DORA} == DORA
    assert data["mode"] == "sft" and data["shuffle_turns"] is True
    assert data["image_processor"]["split_fraction"] == 0.5
    assert data["image_processor"]["longest_edge"] == 980
    assert {s["source"]: s["weight"] for s in data["sources"]} == {"cauldron": 0.7359, "text": 0.2641}
    assert callback_args(config, "callbacks.NEFTune")["noise_alpha"] > 0
    assert model["from_transformers"]  # starts from a pre-trained Idefics2


def check_idefics2_chatty(config: dict) -> None:
    """Idefics2 §4.3: a few hundred steps on LLaVA-Conv and ShareGPT4V, large batch, from the SFT model."""
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert 100 <= config["trainer"]["max_steps"] < 1000
    assert global_batch(config) >= 512
    urls = [u for s in data["sources"] for u in ([s["urls"]] if isinstance(s["urls"], str) else s["urls"])]
    assert any("llava_conv" in u for u in urls) and any("sharegpt4v" in u for u in urls)
    assert data["mode"] == "sft" and model["from_transformers"] == "HuggingFaceM4/idefics2-8b"


def check_idefics3(config: dict) -> None:
    """Idefics3 §5.2.1 / Table 3: 3 stages, frozen backbones then DoRA, 364 -> 1820 px during
    stage 1, sequence length 10k, batch 1024, synthetic data and a cosine to 0 in the last stage."""
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert global_batch(config) == 1024
    tile = data["image_processor"]["tile_size"]
    assert model["recipe"] == "idefics3" and tile == 364
    assert visual_tokens_per_tile(VLMConfig.from_dict(model["model"]), (tile, tile)) == 169  # the data's
    table = stage_table(config)
    names = [s["name"].split(" ")[0] for s in table]
    assert names == ["stage-1a", "stage-1b", "stage-1c", "stage-1d", "stage-1e", "stage-2", "stage-3"]
    assert [s["max_resolution"] for s in table] == [364, 728, 1092, 1456, 1820, 1820, 1820]
    assert all(s["max_seq_len"] == 10240 for s in table)
    assert [{k: s["policy"][k] for k in DORA} for s in table] == [FROZEN_BACKBONES] * 5 + [DORA] * 2
    assert set(table[0]["mixture"]) == {"obelics", "laion_coco"}
    assert set(table[5]["mixture"]) == {"obelics", "laion_coco", "pdfa"}
    assert set(table[6]["mixture"]) == {"docmatix", "m4_sft"}
    assert (table[6]["schedule"], table[6]["min_lr"]) == ("cosine", 0.0)
    assert table[5]["schedule"] == table[0]["schedule"] == "constant"
    assert "ddp" in config["trainer"]["strategy"].lower()  # the policy changes: not FSDP2


def check_idefics3_sft(config: dict) -> None:
    """Idefics3 §5.2.1: DoRA, NEFTune, answer-only loss, cosine to 0; 10k tokens, batch 1024, 1820 px."""
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert global_batch(config) == 1024 and data["max_seq_len"] == 10240
    assert {k: model["policy"][k] for k in DORA} == DORA
    assert data["mode"] == "sft" and data["image_processor"]["longest_edge"] == 1820
    assert (model["schedule"], model["min_lr"]) == ("cosine", 0.0)
    assert callback_args(config, "callbacks.NEFTune")["noise_alpha"] > 0
    assert {s["source"] for s in data["sources"]} == {"cauldron", "docmatix", "text"}


CHECKS = {name: globals()[f"check_{name}"] for name in FULL}


def check_printed(name: str, printed: dict) -> None:
    """The printed (resolved) config of a full recipe holds the recipe, and its stages are the YAML's."""
    assert printed["model"]["class_path"] == "lit_modules.VLMModule"
    assert printed["data"]["class_path"] == "datamodules.VLMDataModule"
    CHECKS[name](printed)
    raw = callback_args(load(name), "callbacks.StageTransition")
    if raw is not None:  # every unset field printed as null, every policy field spelled out
        resolved = callback_args(printed, "callbacks.StageTransition")["stages"]
        assert [{k: v for k, v in s.items() if v is not None} for s in resolved] == [
            {**s, "policy": {**TrainingPolicy().__dict__, **s["policy"]}} if "policy" in s else s
            for s in raw["stages"]
        ]


def lightning_print_config(name: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m lightning fit --config configs/<name>.yaml --print_config`` in a fresh interpreter,
    offline, without DATA_ROOT."""
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    args = ["-m", "lightning", "fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"]
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def check_subprocesses(names: tuple[str, ...], cwd: Path) -> None:
    with ThreadPoolExecutor(len(names)) as pool:
        results = dict(zip(names, pool.map(lambda name: lightning_print_config(name, cwd), names)))
    for name, result in results.items():
        if "No module named lightning.__main__" in result.stderr:
            pytest.fail(
                "project not pip-installed here (no idefics_lightning_main.pth): run `pip install -e .`"
            )
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        check_printed(name, yaml.safe_load(result.stdout))
    assert not list(cwd.iterdir())  # --print_config ran nothing, wrote nothing


@pytest.mark.parametrize("name", FULL)
def test_full_recipe_resolves_with_the_papers_numbers(name, tmp_path, capsys, monkeypatch):
    """The CLI entry point (``runners.cli.main``, what ``python -m lightning`` runs) in this process: ``fit
    --print_config`` exits 0 offline and prints the recipe."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.setattr(sys, "argv", [name])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    check_printed(name, yaml.safe_load(capsys.readouterr().out))
    assert not list(tmp_path.iterdir())


def test_python_m_lightning_print_config_works_offline(tmp_path):
    """The acceptance command itself, in a fresh interpreter (one recipe; every one: the slow test below)."""
    check_subprocesses(("idefics2",), tmp_path)


@pytest.mark.slow
def test_python_m_lightning_print_config_works_offline_for_every_recipe(tmp_path):
    """One subprocess per full-scale recipe, side by side (~30 s of imports each on a loaded CPU)."""
    check_subprocesses(FULL, tmp_path)


def print_config(config_args: list[str], capsys) -> dict[str, Any]:
    """The config the CLI resolves from ``config_args`` (``fit ... --print_config``, in this process)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", FULL)
def test_overlay_keeps_its_recipes_structure_and_the_recipe_alone_is_unchanged(
    name, tmp_path, capsys, monkeypatch
):
    """As the CLI resolves them: the recipe with its tiny overlay keeps the recipe's classes, callbacks (in
    order, plus TorchThreads), stages (names, policies, mixtures), recipe and fusion; the recipe alone
    keeps its own hardware, weights and data (the overlay only applies when given)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.setattr(sys, "argv", [name])
    full = print_config(["--config", str(CONFIGS / f"{name}.yaml")], capsys)
    both = print_config(twin_args(name), capsys)
    for section in ("model", "data"):
        assert full[section]["class_path"] == both[section]["class_path"]
    classes = [c["class_path"] for c in full["trainer"]["callbacks"]]
    assert [c["class_path"] for c in both["trainer"]["callbacks"]] == [
        *classes,
        "callbacks.threads.TorchThreads",
    ]
    for big, small in zip(stage_table(full), stage_table(both), strict=True):
        assert (big["name"], big["policy"], big.get("mixture")) == (
            small["name"],
            small["policy"],
            small.get("mixture"),
        )
    for key in ("recipe", "fusion"):
        assert full["model"]["init_args"][key] == both["model"]["init_args"][key]
    raw = load(name)
    assert (
        full["trainer"]["accelerator"]
        == raw["trainer"]["accelerator"]
        == "gpu"
        != both["trainer"]["accelerator"]
    )
    assert full["model"]["init_args"]["tokenizer"] == raw["model"]["init_args"]["tokenizer"] != "tiny"
    assert both["model"]["init_args"]["tokenizer"] == "tiny"
    urls = [s["urls"] for s in full["data"]["init_args"]["sources"]]
    assert urls == [s["urls"] for s in raw["data"]["init_args"]["sources"]]
    assert all(TINY_DATA in str(s["urls"]) for s in both["data"]["init_args"]["sources"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", FULL)
def test_tiny_twin_mirrors_its_recipe(name):
    """Same stages (names, order, which fields each sets), policies, mixture sources, callbacks and data
    mode as the full config; only sizes, steps and hardware differ."""
    full, tiny = load(name), load(name, tiny=True)
    assert [s["name"] for s in stage_table(full)] == [s["name"] for s in stage_table(tiny)]
    for big, small in zip(stage_table(full), stage_table(tiny)):
        assert big["policy"] == small["policy"] and big.keys() == small.keys()
        assert big.get("mixture") == small.get("mixture") and big.get("schedule") == small.get("schedule")
    classes = [c["class_path"] for c in full["trainer"]["callbacks"]]
    assert [c for c in classes if c.startswith("callbacks.")] == [
        c["class_path"]
        for c in tiny["trainer"]["callbacks"]
        if c["class_path"].startswith("callbacks.") and c["class_path"] != "callbacks.threads.TorchThreads"
    ]
    full_data, tiny_data = full["data"]["init_args"], tiny["data"]["init_args"]
    for key in ("mode", "shuffle_turns"):
        assert full_data.get(key) == tiny_data.get(key), key
    assert full_data["image_processor"].get("split_fraction") == tiny_data["image_processor"].get(
        "split_fraction"
    )
    assert [(s["source"], s["weight"]) for s in full_data["sources"]] == [
        (s["source"], s["weight"]) for s in tiny_data["sources"]
    ]
    full_model, tiny_model = full["model"]["init_args"], tiny["model"]["init_args"]
    for key in ("recipe", "policy", "schedule", "min_lr", "weight_decay", "activation_checkpointing"):
        assert full_model.get(key) == tiny_model.get(key), key
    for part, key in (("vision", "backend"), ("vision", "patch_mask_rule"), ("connector", "type")):
        assert full_model["model"][part][key] == tiny_model["model"][part][key], (part, key)
    assert full_model["model"]["language"]["model_type"] == tiny_model["model"]["language"]["model_type"]
    assert full_model["model"]["fusion"] == tiny_model["model"]["fusion"]
    # CPU, one process, synthetic shards for every source it reads, under data_root
    assert tiny["trainer"]["accelerator"] == "cpu" and tiny["trainer"].get("strategy", "auto") == "auto"
    assert tiny_data["data_root"] == TINY_DATA and tiny_model["tokenizer"] == "tiny"
    assert set(tiny_data["synthetic"]) == {s["source"] for s in tiny_data["sources"]}
    for source in tiny_data["sources"]:
        urls = [source["urls"]] if isinstance(source["urls"], str) else source["urls"]
        assert all(u.startswith(f"{TINY_DATA}/{source['source']}/") for u in urls)
    assert tiny["trainer"]["logger"]["init_args"] == {"save_dir": "lightning_logs/tiny", "name": name}


# ------------------------------------------------------------------ the tiny twins train through every stage


class StageRecorder(Callback):
    """Records, at the first micro-batch of every optimizer step, the stage, policy, data settings, learning
    rate and batch shape; snapshots the backbones at the start to compare with the end."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.neftune_active: list[bool] = []

    @staticmethod
    def backbone_state(pl_module) -> dict[str, torch.Tensor]:
        """Backbone base weights by adapter-free name (``q_proj.base_layer.weight`` as ``q_proj.weight``)."""
        state = {}
        for component in ("vision_tower", "language_model"):
            for name, param in getattr(pl_module.model, component).named_parameters():
                if "lora_" not in name:
                    state[f"{component}.{name.replace('.base_layer', '')}"] = param.detach().clone()
        return state

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.backbone_state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        embedding = pl_module.model.language_model.get_input_embeddings()
        self.neftune_active.append(bool(embedding._forward_hooks))
        if batch_idx % trainer.accumulate_grad_batches:
            return
        transition = next((c for c in trainer.callbacks if isinstance(c, StageTransition)), None)
        data, group = trainer.datamodule, trainer.optimizers[0].param_groups[0]
        trainable = {n for n, p in pl_module.model.named_parameters() if p.requires_grad}
        optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        labels, mask = batch["labels"], batch["document_ids"] > 0
        self.steps[trainer.global_step] = {
            "stage": None if transition is None else transition.stage_index,
            "policy": copy.deepcopy(pl_module.policy),
            "mixture": data.mixture_weights,
            "max_resolution": data.max_resolution,
            "max_seq_len": data.max_seq_len,
            "row_len": batch["input_ids"].shape[1],
            "lr": group["lr"] / group["lr_scale"],
            "trainable": trainable,
            "optimizer_follows_policy": optimized
            == {id(p) for p in pl_module.parameters() if p.requires_grad},
            "loss_fraction": float((labels[mask] != -100).float().mean()),
            "labelled_text": data.processor.tokenizer.decode(batch["input_ids"][labels != -100]),
            "tiles_per_image": batch["tiles_per_image"].tolist() if "tiles_per_image" in batch else [],
            "pixel_side": pixel_side(batch),
        }


def pixel_side(batch: dict) -> int:
    """The longest real (unpadded) side of the batch's tiles, in pixels."""
    mask = batch.get("pixel_attention_mask")
    if mask is None:
        return 0
    return max(int(mask.any(-1).sum(-1).max()), int(mask.any(-2).sum(-1).max()))


def check_trainable_names(names: set[str], policy: TrainingPolicy) -> None:
    """What requires gradients matches each component's mode."""
    for component in ("vision_tower", "connector", "language_model"):
        mode = getattr(policy, component)
        mine = {n for n in names if n.startswith(f"{component}.")}
        if mode == "frozen" and component == "language_model" and policy.train_new_token_embeddings:
            assert mine == {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
        elif mode == "frozen":
            assert not mine, component
        elif mode in ("lora", "dora"):
            adapters = {n for n in mine if "lora_" in n}
            assert adapters and any("lora_magnitude" in n for n in adapters) == (mode == "dora"), component
            assert mine - adapters <= {
                "language_model.model.embed_tokens.weight",
                "language_model.lm_head.weight",
            }
        else:
            assert mine, component


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One working directory for the twins: their relative data_root is shared, so the synthetic shards
    of a source are written once."""
    return tmp_path_factory.mktemp("recipes")


def run_twin(name: str, workdir: Path, monkeypatch, *overrides: str):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", [name])  # LightningCLI is given its args: no pytest ones
    recorder = f"{StageRecorder.__module__}.{StageRecorder.__qualname__}"
    return main(["fit", *twin_args(name), f"--trainer.callbacks+={recorder}", *overrides])


def normalised(mixture: dict[str, float], sources: list[str]) -> list[float]:
    total = sum(mixture.values())
    return [mixture.get(source, 0.0) / total for source in sources]


def test_model_fusion_override_alone_switches_the_data_too(workdir, monkeypatch):
    """``--model.fusion cross_attention`` on a recipe: the DataModule follows the model (its ``fusion``
    defaults to the LightningModule's), so the text gets one ``<image>`` marker per image."""
    cli = run_twin("idefics2", workdir, monkeypatch, "--model.fusion=cross_attention")
    assert cli.model.config.fusion == cli.datamodule.processor.fusion == "cross_attention"
    assert cli.trainer.global_step == load("idefics2", tiny=True)["trainer"]["max_steps"]


@pytest.mark.parametrize("name", FULL)
def test_tiny_twin_trains_through_every_stage(name, workdir, monkeypatch):
    cli = run_twin(name, workdir, monkeypatch)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    config = load(name, tiny=True)
    table = stage_table(config)
    recorder = next(c for c in trainer.callbacks if isinstance(c, StageRecorder))
    max_steps = config["trainer"]["max_steps"]
    assert trainer.global_step == max_steps and sorted(recorder.steps) == list(range(max_steps))
    sources = [s["source"] for s in config["data"]["init_args"]["sources"]]
    recipe = config["model"]["init_args"]["recipe"]
    tile = config["data"]["init_args"]["image_processor"].get("tile_size")
    for step, seen in recorder.steps.items():
        index = max(i for i, s in enumerate(table) if s["start_step"] <= step)
        stage = table[index]
        if len(table) > 1:
            assert seen["stage"] == index, (step, seen["stage"])
        assert seen["policy"] == TrainingPolicy(**stage["policy"]), step
        check_trainable_names(seen["trainable"], seen["policy"])
        assert seen["optimizer_follows_policy"], step
        if "mixture" in stage:
            assert seen["mixture"] == pytest.approx(normalised(stage["mixture"], sources)), step
        if "max_seq_len" in stage:
            assert seen["max_seq_len"] == stage["max_seq_len"] and seen["row_len"] <= stage["max_seq_len"]
        if "max_resolution" in stage:
            assert seen["max_resolution"] == stage["max_resolution"], step
            if recipe == "idefics2":
                assert seen["pixel_side"] <= stage["max_resolution"]
            else:  # at most (resolution / tile)^2 tiles + the global image
                assert max(seen["tiles_per_image"], default=1) <= (stage["max_resolution"] // tile) ** 2 + 1
        assert 0 < seen["lr"] <= 1e-4 * (1 + 1e-6)
        assert 0 < seen["loss_fraction"] <= 1
    # the last stage is in effect at the end
    last = table[-1]
    assert module.policy == TrainingPolicy(**last["policy"])
    if "mixture" in last:
        assert data.mixture_weights == pytest.approx(normalised(last["mixture"], sources))
        stats = data.record_stats()
        assert all(stats[s].read > 0 for s, w in last["mixture"].items() if w > 0)  # really read
    if "max_resolution" in last:
        assert data.max_resolution == last["max_resolution"]
    if len(table) > 1:
        transition = next(c for c in trainer.callbacks if isinstance(c, StageTransition))
        assert transition.stage_index == len(table) - 1
        raw = callback_args(config, "callbacks.StageTransition")["stages"]
        starts = [s["start_step"] for s in raw if Stage(**{**s, "policy": None}).sets_schedule()]
        assert module.lr_schedule.start_step == (starts[-1] if starts else 0)  # the last schedule runs
    # the weights the policies freeze did not move: backbones under LoRA/DoRA or frozen, and the rows of
    # the embedding / output head other than the new tokens'
    end = StageRecorder.backbone_state(module)
    assert end.keys() == recorder.start.keys()
    new_rows = sorted(set(module.model.special_token_ids.values()))
    moved = []
    for key, before in recorder.start.items():
        after = end[key]
        if key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            keep = torch.ones(before.shape[0], dtype=torch.bool)
            keep[new_rows] = False
            before, after = before[keep], after[keep]
        if not torch.equal(before, after):
            flat_before, flat_after = before.reshape(len(before), -1), after.reshape(len(after), -1)
            rows = int((flat_before != flat_after).any(1).sum())
            diff = float((after - before).abs().max())
            moved.append(f"{key}: {rows} of {len(before)} rows (max |diff| {diff:.1e})")
    assert not moved, f"frozen weights changed: {moved}"
    # SFT recipes: the loss on the answers only (never on the user turns of the chat template)
    if config["data"]["init_args"].get("mode") == "sft":
        assert all(seen["loss_fraction"] < 0.9 for seen in recorder.steps.values())
        assert not any("User:" in seen["labelled_text"] for seen in recorder.steps.values())
        assert all("<end_of_utterance>" in seen["labelled_text"] for seen in recorder.steps.values())
    # SFT recipes: NEFTune noising the embeddings during training (its hook removed at the end)
    neftune = callback_args(config, "callbacks.NEFTune") is not None
    assert recorder.neftune_active == [neftune] * len(recorder.neftune_active)
    assert not any(isinstance(c, NEFTune) and c._handle is not None for c in trainer.callbacks)
    if config["data"]["init_args"]["image_processor"].get("split_fraction"):
        tiles = {n for seen in recorder.steps.values() for n in seen["tiles_per_image"]}
        assert tiles == {1, 5}  # split (4 crops + the image) and not split, both seen


@pytest.mark.slow
def test_pretraining_twin_exports_to_transformers_and_fine_tuning_starts_from_it(
    workdir, monkeypatch, tmp_path
):
    """The path the SFT configs document: the pre-training run's last checkpoint, its adapters merged,
    exported with ``vlm.hf.to_transformers``, is the ``from_transformers`` of the fine-tuning run, which
    starts from exactly those weights."""
    from vlm.hf import to_transformers

    pretraining = run_twin("idefics2", workdir, monkeypatch)
    module = VLMModule.load_from_checkpoint(pretraining.trainer.checkpoint_callback.last_model_path)
    assert module.merge_adapters() > 0
    exported = StageRecorder.backbone_state(module)
    to_transformers(module.model).save_pretrained(tmp_path / "base")
    sft = run_twin("idefics2_sft", workdir, monkeypatch, f"--model.from_transformers={tmp_path / 'base'}")
    start = next(c for c in sft.trainer.callbacks if isinstance(c, StageRecorder)).start
    assert start.keys() == exported.keys()
    assert all(torch.equal(start[key], exported[key]) for key in exported)
    assert sft.trainer.global_step == load("idefics2_sft", tiny=True)["trainer"]["max_steps"]
