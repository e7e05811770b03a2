"""How the runner scores a trained variant: the tiny scale's held-out shapes accuracy (overall, per
question type, K-shot), the full scale's paper benchmarks (``validate`` with ``configs/eval/*.yaml``)."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from runners.ablate.axis import Axis, resolve
from runners.ablate.overrides import apply_overrides

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
    text = question.replace("<image>", "").strip().lower()
    return next((kind for prefix, kind in QUESTION_TYPES.items() if text.startswith(prefix)), "other")


@torch.no_grad()
def generation_accuracy(module, datamodule) -> dict[str, Any]:
    """Held-out generation accuracy of a trained module on its DataModule's ``val_generate`` questions
    (each asked alone, greedy, exact match after ``normalize_answer``): overall and per question type."""
    from lit_modules.vlm_module import normalize_answer

    loader = datamodule.val_dataloader()
    questions = loader.dataset.questions
    was_training = module.training
    module.eval()
    hits: dict[str, list[bool]] = {}
    seen = 0
    for batch in loader:
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        predictions = module.generate_answers(batch)
        for question, prediction in zip(questions[seen : seen + len(predictions)], predictions):
            hit = normalize_answer(prediction) == normalize_answer(question.answer)
            hits.setdefault(question_type(question.question), []).append(hit)
        seen += len(predictions)
    module.train(was_training)
    every = [h for values in hits.values() for h in values]
    out = {"val_acc": sum(every) / max(len(every), 1), "n_questions": len(every)}
    out.update({f"acc_{kind}": sum(v) / len(v) for kind, v in sorted(hits.items())})
    return out


def write_shapes_vqav2(questions: Sequence, path: Path, question_id0: int = 0) -> Path:
    """Shapes questions (``datamodules.datamodule.Question``) as a VQAv2-layout parquet file (10 identical
    reference answers, ``question_type`` = count / colour / shape) for ``EvalDataModule``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm.evaluation.fakes import IMAGE_TYPE

    def png(image) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [
        {
            "question_type": question_type(q.question),
            "multiple_choice_answer": q.answer,
            "answers": [
                {"answer": q.answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)
            ],
            "image_id": question_id0 + i,
            "answer_type": "number" if q.answer.isdigit() else "other",
            "question_id": question_id0 + i,
            "question": q.question.replace("<image>", "").strip(),
            "image": png(q.images[0]),
        }
        for i, q in enumerate(questions)
    ]
    table = pa.Table.from_pylist(rows)
    index = table.schema.get_field_index("image")
    table = table.set_column(index, pa.field("image", IMAGE_TYPE), table["image"].cast(IMAGE_TYPE))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def benchmark_eval(eval_config: Path | dict, ckpt: Path, out_dir: Path, overrides: dict[str, Any]) -> dict:
    """``validate --config <eval config + overrides> --ckpt_path ckpt`` through ``runners.cli.main``; returns
    the ``BenchmarkEvaluation`` results (``value`` is the metric in [0, 1], CIDEr unbounded)."""
    config = (
        yaml.safe_load(resolve(eval_config).read_text()) if isinstance(eval_config, Path) else eval_config
    )
    overrides = {
        "trainer.logger.init_args.save_dir": str(out_dir),
        "trainer.callbacks[BenchmarkEvaluation].init_args.output_dir": str(out_dir),
        **overrides,
    }
    config = apply_overrides(config, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmark = config["data"]["init_args"]["benchmark"]
    path = out_dir / f"{benchmark}_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli_main(["validate", "--config", str(path), "--ckpt_path", str(ckpt)])
    return json.loads((out_dir / f"{benchmark}_results.json").read_text())


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
    """The evaluated model's processor settings: tokenizer, recipe, tokens per image and image processing
    (the longest edge capped at the resolution training ended with)."""
    data = train["data"]["init_args"]
    images = dict(data.get("image_processor") or {})
    resolution = final_resolution(train)
    if resolution is not None:
        images["longest_edge"] = min(resolution, images.get("longest_edge") or resolution)
        images["shortest_edge"] = min(images.get("shortest_edge", resolution), images["longest_edge"])
    return {
        "data.init_args.tokenizer": data.get("tokenizer", "tiny"),
        "data.init_args.recipe": data.get("recipe", "idefics2"),
        "data.init_args.image_seq_len": data.get("image_seq_len", 64),
        "data.init_args.image_processor": images,
        "model.init_args.tokenizer": train["model"]["init_args"].get("tokenizer"),
    }


def shapes_benchmark(cli, run_dir: Path, max_shots: int) -> tuple[Path, Path]:
    """The held-out shapes questions (and, as the support split, questions of the training conversations) as
    VQAv2-layout parquet files under ``run_dir/shapes_vqav2``."""
    from datamodules.datamodule import questions_of
    from datamodules.sources import iter_samples

    data = cli.datamodule
    held_out = data.val_dataloader().dataset.questions
    source = next(s for s in data.mixture.sources if s.source == "cauldron")
    support: list = []
    for sample in iter_samples("cauldron", source.urls, **source.options):
        support += [q for q in questions_of(sample) if len(q.images) == 1]
        if len(support) >= max(60, 20 * max_shots):
            break
    folder = run_dir / "shapes_vqav2"
    return (
        write_shapes_vqav2(held_out, folder / "validation-00000-of-00001.parquet"),
        write_shapes_vqav2(support, folder / "train-00000-of-00001.parquet", 10**6),
    )


def fewshot_shapes(cli, train: dict, run_dir: Path, shots: Sequence[int]) -> dict[str, Any]:
    """K-shot VQA accuracy on the held-out shapes questions for each K of ``shots``, through
    ``configs/eval/vqav2.yaml`` (``EvalDataModule`` + ``BenchmarkEvaluation``, the paper's VQA prompt) on the
    CPU with the final checkpoint; shots drawn from training conversations; also per question type."""
    from vlm.metrics import VQAAccuracy

    query_file, support_file = shapes_benchmark(cli, run_dir, max(shots))
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
            "data.init_args.files": str(query_file),
            "data.init_args.support_files": str(support_file),
            "data.init_args.num_shots": k,
            "data.init_args.batch_size": 50,
            "data.init_args.fusion": None,
        }
        folder = run_dir / f"eval_{k}shot"
        results = benchmark_eval(Path("configs/eval/vqav2.yaml"), run_dir / "final.ckpt", folder, overrides)
        out[f"shapes_{k}shot"] = results["value"]
        records = [json.loads(line) for line in (folder / "vqav2_predictions.jsonl").open()]
        for kind in sorted({r["metadata"]["question_type"] for r in records}):
            mine = [r for r in records if r["metadata"]["question_type"] == kind]
            metric = VQAAccuracy()
            metric.update([r["prediction"] for r in mine], [r["answers"] for r in mine])
            out[f"shapes_{k}shot_{kind}"] = float(metric.compute())
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
