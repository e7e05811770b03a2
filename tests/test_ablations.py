"""The ablation axes (``configs/ablations/*.yaml``) and their runner (``python -m runners.ablate``).

- One axis file per ablation table of the Idefics2 paper, citing the paper's numbers (checked against a
  transcription of the tables here).
- Every variant of every axis resolves at full scale through ``fit --print_config`` (``runners.cli.main``),
  with its overrides in the resolved config; the fusion variants build on the ``meta`` device with the
  paper's trainable-parameter counts (§3.2); every connector gives the visual-token count the data expects.
- Every tiny twin builds on the CPU and answers a held-out question through its own processor; the
  fusion x frozen/LoRA and connector axes train and evaluate through the runner here, every axis in the
  ``slow`` test.
- The committed results (``docs/ablations/``) are the runner's outputs for those two axes, and
  ``notebooks/05_ablations.ipynb`` plots them (executed by ``tests/test_notebooks.py``).
"""

from __future__ import annotations

import csv
import json
import math
import random
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lit_modules import VLMModule
from runners import ablate
from runners.ablate import Axis, apply_overrides, get_override, load_axis, set_override

ROOT = Path(__file__).resolve().parents[1]
AXES = {path.stem: load_axis(path) for path in ablate.axis_files()}
COMMITTED = ("fusion", "connector")  # the axes whose tiny results are in docs/ablations/

# The paper's tables (Idefics2, arXiv 2405.02246), transcribed independently of the axis files.
PAPER = {
    "lm_backbone": ("Table 1", {"llama1_7b": 62.5, "mistral_7b": 67.6}),
    "vision_encoder": (
        "Table 2",
        {"clip_vit_h_224": 57.4, "eva_clip_5b_224": 60.2, "siglip_so400m_384": 60.7},
    ),
    "fusion": (
        "Table 3",
        {
            "fa_no_perceiver_frozen": 51.8,
            "fa_frozen": 60.3,
            "ca_frozen": 66.7,
            "ca_lora": 67.3,
            "fa_lora": 69.5,
        },
    ),
    "visual_tokens": ("Table 4", {"latents_128": 71.2, "latents_64": 71.7}),
    "aspect_ratio": ("Table 5", {"square_768": 73.1, "ar_preserving_378_768": 72.1}),
    "captions": ("Table 6", {"alt_text": 49.8, "synthetic": 52.9}),
    "ocr_resolution": ("Table 7", {"without_ocr_384": 22.6, "without_ocr_768": 42.9, "with_ocr_768": 49.9}),
    "image_splitting": ("Table 9", {"split_50": 70.4, "split_50_eval_split": 73.0}),
    "connector": ("Table 11", {"linear_projection": 44.5, "mapping_network": 51.8, "perceiver": 60.3}),
    "perceiver_layers": ("Table 12", {"layers_1": 69.3, "layers_3": 68.6, "layers_12": 69.0}),
    "mlp_projection": ("Table 13", {"with_mlp": 71.4, "without_mlp": 69.6}),
}
FULL_VARIANTS = [(axis, variant) for axis in AXES for variant in AXES[axis].variants]


# ------------------------------------------------------------------ the axis files


def test_one_axis_per_paper_table_with_its_numbers():
    assert set(AXES) == set(PAPER)
    for name, (table, numbers) in PAPER.items():
        axis = AXES[name]
        assert axis.spec["table"].startswith(table), name
        assert (ROOT / axis.spec["base"]).is_file() and (ROOT / axis.spec["tiny_base"]).is_file()
        assert (
            axis.spec["tiny_base"] == "configs/demo.yaml"
        )  # the tiny protocol: the demo's held-out questions
        assert {v: axis.variant(v).get("paper") for v in numbers} == numbers, name
        assert all("paper" in axis.variant(v) for v in axis.variants), name  # null where the paper has none
        header = axis.path.read_text().split("\nname:")[0]
        assert all(f"{n:g}" in header or f"{n}" in header for n in numbers.values()), (
            name
        )  # cited in comments
        assert table.split()[-1] in header and "Tiny twin" in header, name


def test_overrides_dotted_keys_selectors_and_extension():
    config = {
        "trainer": {
            "callbacks": [{"class_path": "callbacks.StageTransition", "init_args": {"stages": [{"a": 1}]}}]
        },
        "data": {"init_args": {"sources": [{"source": "obelics", "weight": 0.7}, {"source": "laion_coco"}]}},
    }
    out = apply_overrides(
        config,
        {
            "trainer.callbacks[StageTransition].init_args.stages[0].a": 2,
            "trainer.callbacks[callbacks.StageTransition].init_args.stages[-1].b": 3,
            "data.init_args.sources[laion_coco].options": {"caption": "alt_text"},
            "data.init_args.sources+": [{"source": "cauldron"}],
            "data.init_args.new.key": 5,
            "trainer.callbacks+": {"class_path": "callbacks.threads.TorchThreads"},
        },
    )
    assert out["trainer"]["callbacks"][0]["init_args"]["stages"] == [{"a": 2, "b": 3}]
    assert out["trainer"]["callbacks"][1] == {"class_path": "callbacks.threads.TorchThreads"}
    assert [s["source"] for s in out["data"]["init_args"]["sources"]] == ["obelics", "laion_coco", "cauldron"]
    assert get_override(out, "data.init_args.sources[laion_coco].options.caption") == "alt_text"
    assert out["data"]["init_args"]["new"] == {"key": 5}
    assert config["data"]["init_args"]["sources"][1] == {"source": "laion_coco"}  # the input is not changed
    for key, error in (
        ("data.init_args.sources[pdfa].weight", "matches 0"),
        ("data.init_args.sources[3].weight", "out of range"),
        ("trainer.callbacks.init_args", "mapping key"),
        ("data.init_args[0]", "selects from a list"),
    ):
        with pytest.raises(KeyError, match=error):
            set_override(apply_overrides(config, {}), key, 0)
    axis = Axis(Path("x.yaml"), {"base": "b", "tiny_base": "t", "set": {"k": 1}, "tiny": {"k": 2},
                                 "variants": {"v": {"set": {"k": 3}, "full": {"k": 4}}}})  # fmt: skip
    assert axis.overrides("v", tiny=True) == {"k": 3} and axis.overrides("v", tiny=False) == {"k": 4}
    with pytest.raises(ValueError, match="unknown axis keys"):
        Axis(Path("x.yaml"), {"base": "b", "tiny_base": "t", "variants": {"v": {}}, "bases": 1})


def contains(actual: Any, expected: Any) -> bool:
    """``expected`` (an override value) is in ``actual`` (the resolved config): dicts by their keys, lists
    item by item, numbers to float precision."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list) and len(actual) == len(expected) and all(map(contains, actual, expected))
        )
    if isinstance(expected, float) or isinstance(actual, float):
        return actual is not None and math.isclose(actual, expected)
    return actual == expected


@cache
def printed(axis: str, variant: str, tiny: bool, workdir: Path) -> dict:
    return ablate.print_config(AXES[axis], variant, tiny, workdir)


@pytest.fixture(scope="module")
def print_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("print_config")


@pytest.mark.parametrize(("axis", "variant"), FULL_VARIANTS, ids=[f"{a}-{v}" for a, v in FULL_VARIANTS])
def test_full_scale_variant_resolves_through_lightning_cli(axis, variant, print_dir, monkeypatch):
    """``fit --config <base + overrides> --print_config`` through ``runners.cli.main``, offline, without
    DATA_ROOT; every override is in the resolved config (``+`` items among the list's)."""
    monkeypatch.delenv("DATA_ROOT", raising=False)
    config = printed(axis, variant, False, print_dir)
    assert config["model"]["class_path"] == "lit_modules.VLMModule"
    merged = AXES[axis].config(variant, tiny=False)  # later overrides may refine earlier ones' values
    for key in AXES[axis].overrides(variant, tiny=False):
        value = get_override(merged, key)
        if key.endswith("+"):
            items = get_override(config, key)
            assert all(any(contains(item, v) for item in items) for v in value), key
        else:
            assert contains(get_override(config, key), value), (key, get_override(config, key), value)
    if axis != "image_splitting":  # the §3 ablation setup: 6,000 steps (Table 7: 5,500 + 500)
        assert config["trainer"]["max_steps"] == 6000
    for callback in config["trainer"]["callbacks"]:  # StageTransition refuses a stage after the last step
        if callback["class_path"] == "callbacks.StageTransition":
            assert all(
                s["start_step"] < config["trainer"]["max_steps"] for s in callback["init_args"]["stages"]
            )


# ------------------------------------------------------------------ networks: parameters, visual tokens

MODULE_PARSER = ArgumentParser(exit_on_error=False)
MODULE_PARSER.add_class_arguments(VLMModule, "module")


def build_module(model_args: dict, device: str = "meta", weights: bool = False) -> VLMModule:
    """The VLMModule of a resolved config's ``model.init_args``; without ``weights`` nothing is loaded: no
    pretrained backbone (the sizes spelled out in the config), no checkpoint, no tokenizer."""
    args = json.loads(json.dumps(model_args))
    if not weights:
        args["model"]["vision"]["pretrained"] = None
        args["model"]["language"]["pretrained"] = None
        args.update(tokenizer=None, from_transformers=None, fsdp_mixed_precision=False)
    module = MODULE_PARSER.instantiate(MODULE_PARSER.parse_object({"module": args})).module
    with torch.device(device):
        module.configure_model()
    return module


def trainable(module: VLMModule) -> int:
    return ablate.parameter_counts(module)["trainable_params"]


def test_fusion_variants_have_the_papers_trainable_parameters(print_dir, capsys):
    """§3.2: with frozen backbones "the cross-attention architecture has 1.3B more trainable parameters (2B
    trainable parameters in total) than the fully autoregressive architecture"; LoRA adds adapters only."""
    variants = ("fa_no_perceiver_frozen", "fa_frozen", "ca_frozen", "ca_lora", "fa_lora")
    counts = {
        v: trainable(build_module(printed("fusion", v, False, print_dir)["model"]["init_args"]))
        for v in variants
    }
    with capsys.disabled():
        print("\nfull-scale trainable parameters:", {k: f"{v / 1e9:.3f}B" for k, v in counts.items()})
    assert counts["ca_frozen"] - counts["fa_frozen"] == pytest.approx(1.3e9, abs=0.1e9)
    assert counts["ca_frozen"] == pytest.approx(2.0e9, abs=0.15e9)
    assert (
        counts["fa_no_perceiver_frozen"] < counts["fa_frozen"] / 5
    )  # the MLP alone (92M) vs MLP + perceiver
    for fusion in ("fa", "ca"):
        assert 0 < counts[f"{fusion}_lora"] - counts[f"{fusion}_frozen"] < 0.05e9  # LoRA r=8 on the LM


def connector_tokens(config: dict) -> int:
    """Visual tokens per image of a resolved config's connector, for the images its processor makes of the
    demo's 96x64 scenes (tiny) or of any image (full scale: square sizes for the per-patch connectors)."""
    from vlm.config import ConnectorConfig
    from vlm.connectors import build_connector
    from vlm.processing.resize import idefics2_size

    model, data = config["model"]["init_args"]["model"], config["data"]["init_args"]
    images = data["image_processor"]
    stages = [
        c for c in config["trainer"].get("callbacks") or [] if c["class_path"].endswith("StageTransition")
    ]
    longest = min([images["longest_edge"]] + [s["max_resolution"] for c in stages
                  for s in c["init_args"]["stages"][:1] if s.get("max_resolution")])  # fmt: skip
    height, width = idefics2_size(64, 96, min(images["shortest_edge"], longest), longest)
    patch, vision = model["vision"]["patch_size"], model["vision"]["hidden_size"]
    text = model["language"]["config"]
    grid = (math.ceil(height / patch), math.ceil(width / patch))
    with torch.device("meta"), torch.no_grad():
        cfg = ConnectorConfig(**model["connector"])
        connector = build_connector(cfg, vision, text["hidden_size"], text["intermediate_size"])
        return connector(torch.zeros(1, grid[0] * grid[1], vision), grid).shape[1]


AUTOREGRESSIVE = [(a, v) for a, v in FULL_VARIANTS if a not in ("lm_backbone", "vision_encoder")]


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
def test_visual_tokens_per_image_match_the_data(tiny, print_dir):
    """Under autoregressive fusion the processor writes ``image_seq_len`` <image> tokens per image, derived
    from the model (``vlm.processing.contract``): the connector must output that many for the images the
    processor makes (per-patch connectors: the patch grid of the processed image)."""
    from vlm.processing.contract import connect

    for axis, variant in AUTOREGRESSIVE:
        config = printed(axis, variant, tiny, print_dir)
        if config["model"]["init_args"]["model"]["fusion"] != "autoregressive":
            continue
        model = config["model"]["init_args"]["model"]
        if not tiny and model["connector"]["type"] in ("mlp", "linear", "pixel_shuffle"):
            images = config["data"]["init_args"]["image_processor"]
            assert images["shortest_edge"] == images["longest_edge"] == 378, (
                axis,
                variant,
            )  # square: fixed grid
        images = config["data"]["init_args"]["image_processor"]
        derived = connect(build_module(config["model"]["init_args"]), images, {}).image_seq_len
        assert connector_tokens(config) == derived, (axis, variant)


TINY_VARIANTS = FULL_VARIANTS


@pytest.mark.parametrize(("axis", "variant"), TINY_VARIANTS, ids=[f"{a}-{v}" for a, v in TINY_VARIANTS])
def test_tiny_twin_builds_and_answers_through_its_processor(axis, variant, print_dir):
    """The tiny variant's module (built as the CLI resolves it) generates an answer to a held-out-style
    question encoded by the variant's own processor; its policy freezes what it says."""
    from datamodules import VLMDataModule
    from datamodules.synthetic_content import draw_scene, random_scene
    from vlm.config import IMAGE_TOKEN
    from vlm.evaluation.batch import PromptItem, collate_prompts
    from vlm.evaluation.prompts import PromptTurn

    config = printed(axis, variant, True, print_dir)
    module = build_module(config["model"]["init_args"], device="cpu", weights=True)
    torch.set_num_threads(1)
    for component in ("vision_tower", "language_model"):
        mode = getattr(module.policy, component)
        params = [n for n, p in getattr(module.model, component).named_parameters() if p.requires_grad]
        if mode == "frozen":
            assert set(params) <= {"model.embed_tokens.weight", "lm_head.weight"}, (component, params[:3])
        elif mode == "lora":
            assert params and all(
                "lora_" in n or n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in params
            )
    data = VLMDataModule(**config["data"]["init_args"])
    data.connect(module)  # the model's tokenizer, recipe, fusion and visual tokens per tile
    rng = random.Random(0)
    scene = random_scene(rng)
    question, answer = scene.qa_pairs()[0]
    image = draw_scene(scene, rng)
    item = PromptItem("k", [PromptTurn([image], IMAGE_TOKEN + question)], [answer])
    batch = collate_prompts([(0, item)], data.processor)
    module.eval()
    with torch.no_grad():
        (prediction,) = module.generate_answers(batch)
    assert isinstance(prediction, str)


# ------------------------------------------------------------------ the runner at tiny scale


def small_data(axis: Axis, root: Path) -> dict[str, Any]:
    """Overrides that shrink a tiny axis' synthetic data (a few conversations, small buffers), in ``root``."""
    data = axis.config(axis.variants[0], tiny=True)["data"]["init_args"]
    out: dict[str, Any] = {
        "data.init_args.data_root": str(root),
        "data.init_args.shuffle_block": 8,
        "data.init_args.pack_window": 8,
        "data.init_args.batch_size": 4,
        "data.init_args.val_batch_size": 8,
    }
    for key in ("synthetic", "val_synthetic"):
        for source in data.get(key) or {}:
            out[f"data.init_args.{key}.{source}"] = 8 if key == "val_synthetic" else 32
    for key in ("sources", "val_sources"):
        for i, source in enumerate(data.get(key) or []):
            out[f"data.init_args.{key}[{i}].urls"] = source["urls"].replace(data["data_root"], str(root))
    return out


def run_tiny(axis: str, tmp_path: Path, shots=(), steps: int = 2):
    return ablate.run_axis(
        AXES[axis],
        tiny=True,
        out=tmp_path / "out",
        runs=tmp_path / "runs",
        max_steps=steps,
        extra=small_data(AXES[axis], tmp_path / "data"),
        shots=shots,
        quiet=True,
    )


def check_run(axis: str, rows: list[dict], paths: dict[str, Path], steps: int) -> None:
    assert [r["variant"] for r in rows] == AXES[axis].variants
    for row in rows:
        assert row["steps"] == steps and 0 <= row["val_acc"] <= 1
        assert row["val_acc"] == pytest.approx(row["val_acc_logged"])  # = the fit's last val/acc
        assert row["n_questions"] == 12 and {"acc_count", "acc_colour", "acc_shape"} <= row.keys()
        assert 0 < row["trainable_params"] <= row["total_params"]
    with paths["csv"].open() as f:
        assert [r["variant"] for r in csv.DictReader(f)] == AXES[axis].variants
    assert all(f"| {v} |" in paths["md"].read_text() for v in AXES[axis].variants)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("axis", COMMITTED)
def test_runner_trains_and_evaluates_every_variant(axis, tmp_path, monkeypatch):
    """The committed axes end to end at 2 steps on a few conversations: fit through ``runners.cli.main``,
    held-out generation accuracy per question type, and (connector) 0- and 2-shot runs through
    ``EvalDataModule``; the table and the plot."""
    monkeypatch.chdir(tmp_path)
    shots = (0, 2) if axis == "connector" else ()
    rows, paths = run_tiny(axis, tmp_path, shots=shots)
    check_run(axis, rows, paths, steps=2)
    for row in rows:
        for k in shots:
            assert 0 <= row[f"shapes_{k}shot"] <= 1 and f"shapes_{k}shot_count" in row
    # the policies: frozen rows train fewer parameters than LoRA rows, which train fewer than full ones
    if axis == "fusion":
        counts = {r["variant"]: r["trainable_params"] for r in rows}
        for fusion in ("fa", "ca"):
            assert counts[f"{fusion}_frozen"] < counts[f"{fusion}_lora"] < counts[f"{fusion}_full"]
    # the report again, from the runs' metrics.json
    again, _ = ablate.run_axis(
        AXES[axis], tiny=True, out=tmp_path / "again", runs=tmp_path / "runs", report_only=True
    )
    assert again == rows


@pytest.mark.slow
@pytest.mark.parametrize("axis", sorted(set(AXES) - set(COMMITTED)))
def test_runner_trains_and_evaluates_every_other_axis(axis, tmp_path, monkeypatch):
    """Every other axis' tiny twin, 4 steps per variant, through the runner, with a 1-shot run."""
    monkeypatch.chdir(tmp_path)
    rows, paths = run_tiny(axis, tmp_path, shots=(1,), steps=4)
    check_run(axis, rows, paths, steps=4)


def test_command_line_lists_and_prints_variants(capsys, tmp_path):
    ablate.main(["configs/ablations/connector.yaml", "--list", "--runs", str(tmp_path)])
    listed = capsys.readouterr().out
    assert all(f"# --- connector / {v} (full) ---" in listed for v in AXES["connector"].variants)
    assert "type: pixel_shuffle" in listed
    ablate.main(["configs/ablations/fusion.yaml", "--tiny", "--print-config", "--variants", "ca_lora",
                 "--runs", str(tmp_path)])  # fmt: skip
    resolved = yaml.safe_load(capsys.readouterr().out.split("---\n", 1)[1])
    assert resolved["model"]["init_args"]["model"]["fusion"] == "cross_attention"
    assert resolved["model"]["init_args"]["policy"]["language_model"] == "lora"


# ------------------------------------------------------------------ the committed results and the notebook


@pytest.mark.parametrize("axis", COMMITTED)
def test_committed_results_are_the_runners(axis):
    folder = ROOT / "docs" / "ablations"
    with (folder / f"{axis}_tiny.csv").open() as f:
        rows = list(csv.DictReader(f))
    spec = AXES[axis]
    assert [r["variant"] for r in rows] == spec.variants
    for row in rows:
        assert int(row["steps"]) == spec.spec["tiny_steps"] and int(row["n_questions"]) == 300
        assert 0 <= float(row["val_acc"]) <= 1 and row["shapes_4shot"]
        paper = spec.variant(row["variant"])["paper"]
        assert row["paper"] == ("" if paper is None else str(paper))
    text = (folder / f"{axis}_tiny.md").read_text()
    assert f"python -m runners.ablate configs/ablations/{axis}.yaml --tiny" in text
    assert (folder / f"{axis}_tiny.png").read_bytes()[:4] == b"\x89PNG"
    docs = (ROOT / "docs" / "ABLATIONS.md").read_text()
    assert f"ablations/{axis}_tiny.md" in docs and f"configs/ablations/{axis}.yaml --tiny" in docs
