"""How the runner scores a trained variant, always through ``validate`` (``runners.cli.main``, what
``python -m lightning validate`` runs) and ``callbacks.BenchmarkEvaluation``'s predictions: the tiny
scale's held-out shapes accuracy (the variant's own ``val/acc``, per question type, K-shot through
``EvalDataModule(sources=...)``), the full scale's paper benchmarks (``configs/eval/*.yaml``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torchmetrics import Metric

from runners.ablate.axis import Axis, resolve
from runners.ablate.overrides import apply_overrides
from vlm.metrics import ExactMatch, VQAAccuracy

QUESTION_TYPES = {"how many": "count", "what colour": "colour", "what shape": "shape"}
PAPER_BENCHMARKS = ("vqav2", "textvqa", "okvqa", "coco")


def cli_main(args: list[str]):
    """``runners.cli.main(args)`` (LightningCLI) with this program's own arguments hidden from it."""
    from runners.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return main(args)
    finally:
        sys.argv = argv


def question_type(question: str) -> str:
    """``count`` / ``colour`` / ``shape`` (or ``other``) of a synthetic shapes question, bare or in a prompt
    template ("Question: How many ...")."""
    text = question.replace("<image>", "").strip().lower()
    return next((kind for phrase, kind in QUESTION_TYPES.items() if phrase in text), "other")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def per_question_type(
    records: Sequence[dict[str, Any]], metric: type[Metric], prefix: str
) -> dict[str, float]:
    """``metric`` of the predictions records of each question type, as ``<prefix><type>``."""
    out = {}
    for kind in sorted({question_type(r["question"]) for r in records}):
        mine = [r for r in records if question_type(r["question"]) == kind]
        score = metric()
        score.update([r["prediction"] for r in mine], [r["answers"] for r in mine])
        out[f"{prefix}{kind}"] = float(score.compute())
    return out


def validate(config: dict, ckpt: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """``validate --config <config> --ckpt_path ckpt`` through ``runners.cli.main``, with a
    ``BenchmarkEvaluation`` writing its results and predictions to ``out_dir``; returns the results
    (``value``: the metric in [0, 1], CIDEr unbounded) and the ``records``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli_main(["validate", "--config", str(path), "--ckpt_path", str(ckpt)])
    results = json.loads((out_dir / f"{name}_results.json").read_text())
    return {**results, "records": _records(out_dir / f"{name}_predictions.jsonl")}


def held_out_accuracy(train: dict, run_dir: Path) -> dict[str, Any]:
    """The tiny scale's held-out accuracy: ``validate`` of the variant's own config on ``final.ckpt`` (its
    ``VLMDataModule(val_generate=True)``: every held-out question asked alone, greedy, ``val/acc`` exact
    match), overall (``val_acc``) and per question type (``acc_<type>``)."""
    out_dir = run_dir / "eval_held_out"
    evaluation = {"class_path": "callbacks.BenchmarkEvaluation", "init_args": {"output_dir": str(out_dir)}}
    config = apply_overrides(train, {"trainer.logger": False, "trainer.callbacks+": [evaluation]})
    results = validate(config, run_dir / "final.ckpt", out_dir, "val")
    records = results["records"]
    out = {"val_acc": results["value"], "n_questions": len(records)}
    return {**out, **per_question_type(records, ExactMatch, "acc_")}


def benchmark_eval(eval_config: Path | dict, ckpt: Path, out_dir: Path, overrides: dict[str, Any]) -> dict:
    """``validate --config <eval config + overrides> --ckpt_path ckpt`` (``validate``): the
    ``BenchmarkEvaluation`` results and records."""
    config = (
        yaml.safe_load(resolve(eval_config).read_text()) if isinstance(eval_config, Path) else eval_config
    )
    overrides = {
        "trainer.logger.init_args.save_dir": str(out_dir),
        "trainer.callbacks[BenchmarkEvaluation].init_args.output_dir": str(out_dir),
        **overrides,
    }
    config = apply_overrides(config, overrides)
    return validate(config, ckpt, out_dir, config["data"]["init_args"]["benchmark"])


def final_resolution(train: dict) -> int | None:
    """The maximum resolution a ``StageTransition`` leaves in effect at ``trainer.max_steps`` (or None)."""
    stages = next(
        (c.get("init_args", {}).get("stages", []) for c in train["trainer"].get("callbacks") or []
         if isinstance(c, dict) and str(c.get("class_path", "")).endswith("StageTransition")),
        [],
    )  # fmt: skip
    steps, resolution = train["trainer"].get("max_steps") or 0, None
    for stage in sorted(stages, key=lambda s: s["start_step"]):
        if stage["start_step"] < max(steps, 1) and stage.get("max_resolution"):
            resolution = stage["max_resolution"]
    return resolution


def eval_data_overrides(train: dict) -> dict[str, Any]:
    """The evaluated model's image processing (the longest edge capped at the resolution training ended
    with) and tokenizer; the recipe and visual tokens per tile are the checkpoint's model's (the
    ``EvalDataModule`` connects to it)."""
    data = train["data"]["init_args"]
    images = dict(data.get("image_processor") or {})
    resolution = final_resolution(train)
    if resolution is not None:
        images["longest_edge"] = min(resolution, images.get("longest_edge") or resolution)
        images["shortest_edge"] = min(images.get("shortest_edge", resolution), images["longest_edge"])
    return {
        "data.init_args.image_processor": images,
        "model.init_args.tokenizer": train["model"]["init_args"].get("tokenizer"),
    }


def fewshot_shapes(train: dict, run_dir: Path, shots: Sequence[int]) -> dict[str, Any]:
    """K-shot VQA accuracy on the held-out shapes questions for each K of ``shots``, through
    ``configs/eval/vqav2.yaml`` (``EvalDataModule`` + ``BenchmarkEvaluation``, the paper's VQA prompt) with
    the variant's validation sources as the examples (``EvalDataModule(sources=...)``) and its training
    conversations' questions as the shots, on the CPU with the final checkpoint; also per question type."""
    data = train["data"]["init_args"]
    keep = ("source", "urls", "options")

    def conversations(sources: list[dict]) -> list[dict]:
        return [{key: s[key] for key in keep if key in s} for s in sources]

    support = [next(s for s in data["sources"] if s["source"] == "cauldron")]
    max_new_tokens = train["model"]["init_args"].get("val_max_new_tokens", 8)
    out: dict[str, Any] = {}
    for k in shots:
        overrides = {
            **eval_data_overrides(train),
            "trainer.accelerator": "cpu",
            "trainer.precision": "32-true",
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "trainer.callbacks[BenchmarkEvaluation].init_args.max_new_tokens": max_new_tokens,
            "trainer.callbacks+": [
                {"class_path": "callbacks.threads.TorchThreads", "init_args": {"num_threads": 1}}
            ],
            "data.init_args.files": None,
            "data.init_args.sources": conversations(data["val_sources"]),
            "data.init_args.support_sources": conversations(support),
            "data.init_args.support_limit": max(60, 20 * max(shots)),
            "data.init_args.num_shots": k,
            "data.init_args.batch_size": 50,
            "data.init_args.fusion": None,
        }
        results = benchmark_eval(
            Path("configs/eval/vqav2.yaml"), run_dir / "final.ckpt", run_dir / f"eval_{k}shot", overrides
        )
        out[f"shapes_{k}shot"] = results["value"]
        out.update(per_question_type(results["records"], VQAAccuracy, f"shapes_{k}shot_"))
    return out


def paper_eval(axis: Axis, variant: str, train: dict, run_dir: Path) -> dict[str, Any]:
    """The paper's protocol at full scale: each of ``eval.benchmarks`` with ``configs/eval/<b>.yaml``, the
    axis' ``eval.num_shots`` / ``eval.chat`` / ``eval.support_files`` and the variant's ``eval`` overrides;
    scores x 100 and their average."""
    spec = {
        "benchmarks": list(PAPER_BENCHMARKS),
        "num_shots": 4,
        "chat": False,
        **(axis.spec.get("eval") or {}),
    }
    scores = {}
    for benchmark in spec["benchmarks"]:
        overrides = {**eval_data_overrides(train), "data.init_args.chat": spec["chat"]}
        if spec["num_shots"]:
            support = (spec.get("support_files") or {}).get(
                benchmark, f"${{EVAL_DATA}}/{benchmark}/train-*.parquet"
            )
            overrides.update(
                {"data.init_args.num_shots": spec["num_shots"], "data.init_args.support_files": support}
            )
        overrides.update(spec.get("set") or {})
        overrides.update(axis.variant(variant).get("eval") or {})
        config = Path(f"configs/eval/{benchmark}.yaml")
        result = benchmark_eval(config, run_dir / "final.ckpt", run_dir / f"eval_{benchmark}", overrides)
        scores[benchmark] = 100 * result["value"]
    return {**scores, "avg": sum(scores.values()) / len(scores)}
