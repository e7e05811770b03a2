"""Ablation runner: ``python -m vlm.ablate configs/ablations/<axis>.yaml [--tiny] [--out DIR] [--max-steps]``.

An axis file (``configs/ablations/*.yaml``, see ``docs/ABLATIONS.md``) names a base recipe (``base``, full
scale; ``tiny_base``, CPU twin) and lists variants as config overrides on it::

    base: configs/idefics2.yaml
    tiny_base: configs/demo.yaml
    full: {trainer.max_steps: 6000}                 # every full-scale variant (the paper's ablation setup)
    tiny: {data.init_args.image_seq_len: 8}          # every tiny variant
    variants:
      fa_frozen:
        paper: 60.3                                  # the paper's score of this row
        set: {model.init_args.model.fusion: autoregressive}   # both scales
        full: {...}                                  # full scale only
        tiny: {...}                                  # tiny only

Override keys are dotted paths into the YAML config. A list item is picked by ``[index]`` or by
``[value]``, matched against the item's ``class_path`` (or its last dotted part), ``source`` or ``name``
(``trainer.callbacks[StageTransition].init_args.stages[0].max_resolution``,
``data.init_args.sources[laion_coco].options``); a final ``+`` extends a list (``trainer.callbacks+``).
A value replaces what is there (dicts are not merged: set their keys one by one to keep the rest).
Order: base, axis ``set``, axis ``full``/``tiny``, variant ``set``, variant ``full``/``tiny``, ``--set``.

For each variant the runner writes the merged config, runs ``fit`` through ``vlm.cli.main`` (what
``python -m lightning fit --config ...`` runs), saves ``final.ckpt`` and evaluates it:

- full scale (the paper's protocol, Idefics2 §3): ``validate --config configs/eval/<b>.yaml --ckpt_path``
  for each of the axis' ``eval.benchmarks`` (VQAv2, TextVQA, OKVQA, COCO, 4-shot; scores x 100, CIDEr
  included, averaged as the paper's "Avg. score");
- tiny scale: the demo's held-out generation accuracy on the synthetic shapes questions (every held-out
  question asked alone, greedy, exact match), overall (``val_acc``) and per question type (count,
  colour, shape); with ``--shots K`` also a K-shot run of the same held-out questions through
  ``vlm.evaluation.EvalDataModule`` (VQAv2 layout, the paper's VQA prompt, shots from training
  conversations; VQA accuracy).

Outputs: ``<out>/<axis>_<scale>.csv`` and ``.md`` (the table) and ``.png`` (the plot); runs (configs,
logs, checkpoints, ``metrics.json``) under ``<runs>/<axis>_<scale>/<variant>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import io
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
AXIS_KEYS = {"name", "title", "table", "paper_metric", "paper_setup", "base", "tiny_base", "set", "full"}
AXIS_KEYS |= {"tiny", "eval", "tiny_steps", "variants", "tiny_note"}
VARIANT_KEYS = {"paper", "label", "note", "set", "full", "tiny", "eval"}
QUESTION_TYPES = {"how many": "count", "what colour": "colour", "what shape": "shape"}
PAPER_BENCHMARKS = ("vqav2", "textvqa", "okvqa", "coco")


# --------------------------------------------------------------------------------------- axis files


@dataclass
class Axis:
    """One ablation axis file: its base recipes, shared overrides and variants."""

    path: Path
    spec: dict[str, Any]
    name: str = field(init=False)

    def __post_init__(self) -> None:
        unknown = set(self.spec) - AXIS_KEYS
        if unknown:
            raise ValueError(
                f"{self.path}: unknown axis keys {sorted(unknown)}; allowed: {sorted(AXIS_KEYS)}."
            )
        for key in ("base", "tiny_base", "variants"):
            if not self.spec.get(key):
                raise ValueError(f"{self.path}: `{key}` is required.")
        for variant, body in self.spec["variants"].items():
            bad = set(body or {}) - VARIANT_KEYS
            if bad:
                raise ValueError(f"{self.path}: variant {variant!r} has unknown keys {sorted(bad)}.")
        self.name = self.spec.get("name", self.path.stem)

    @property
    def variants(self) -> list[str]:
        return list(self.spec["variants"])

    def variant(self, name: str) -> dict[str, Any]:
        if name not in self.spec["variants"]:
            raise KeyError(f"{self.path}: no variant {name!r}; variants: {', '.join(self.variants)}.")
        return self.spec["variants"][name] or {}

    def base(self, tiny: bool) -> Path:
        return resolve(self.spec["tiny_base" if tiny else "base"])

    def overrides(self, variant: str, tiny: bool) -> dict[str, Any]:
        """The variant's overrides in application order (later keys win)."""
        scale = "tiny" if tiny else "full"
        body = self.variant(variant)
        out: dict[str, Any] = {}
        for layer in (self.spec.get("set"), self.spec.get(scale), body.get("set"), body.get(scale)):
            out.update(layer or {})
        return out

    def config(self, variant: str, tiny: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The variant's full config: the base YAML with the overrides applied."""
        config = yaml.safe_load(self.base(tiny).read_text())
        return apply_overrides(config, {**self.overrides(variant, tiny), **(extra or {})})


def resolve(path: str | Path) -> Path:
    """A path as given if it exists, else relative to the repository root."""
    path = Path(os.path.expandvars(str(path))).expanduser()
    return path if path.is_absolute() or path.exists() else ROOT / path


def load_axis(path: str | Path) -> Axis:
    path = resolve(path)
    return Axis(path, yaml.safe_load(path.read_text()))


def axis_files() -> list[Path]:
    return sorted((ROOT / "configs" / "ablations").glob("*.yaml"))


# --------------------------------------------------------------------------------------- overrides

_TOKEN = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


def split_key(key: str) -> list[str | tuple[str]]:
    """``a.b[x.y].c`` -> ``['a', 'b', ('x.y',), 'c']`` (a tuple is a list selector)."""
    tokens = [(m.group(1),) if m.group(1) is not None else m.group(2) for m in _TOKEN.finditer(key)]
    if not tokens:
        raise KeyError(f"Empty override key {key!r}.")
    return tokens


def _select(items: list, selector: str, key: str) -> int:
    if re.fullmatch(r"-?\d+", selector):
        index = int(selector)
        if not -len(items) <= index < len(items):
            raise KeyError(f"{key}: index [{index}] out of range (the list has {len(items)} items).")
        return index % len(items)
    matches = [
        i
        for i, item in enumerate(items)
        if isinstance(item, dict)
        and any(
            value == selector or (field_ == "class_path" and str(value).rsplit(".", 1)[-1] == selector)
            for field_, value in item.items()
            if field_ in ("class_path", "source", "name")
        )
    ]
    if len(matches) != 1:
        raise KeyError(f"{key}: [{selector}] matches {len(matches)} list items (it must match one).")
    return matches[0]


def set_override(config: dict[str, Any], key: str, value: Any) -> None:
    """Set one dotted ``key`` (see the module docstring) in ``config`` in place."""
    extend = key.endswith("+")
    tokens = split_key(key[:-1] if extend else key)
    node: Any = config
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        if isinstance(token, tuple):
            if not isinstance(node, list):
                raise KeyError(f"{key}: [{token[0]}] selects from a list, found {type(node).__name__}.")
            slot: Any = _select(node, token[0], key)
        else:
            if not isinstance(node, dict):
                raise KeyError(f"{key}: {token!r} is a mapping key, found a {type(node).__name__}.")
            slot = token
            if not last and node.get(token) is None:
                node[token] = {}
        if last:
            if extend:
                current = node[slot] if isinstance(node, list) or slot in node else None
                if current is not None and not isinstance(current, list):
                    raise KeyError(f"{key}: `+` extends a list, found {type(current).__name__}.")
                node[slot] = [*(current or []), *(value if isinstance(value, list) else [value])]
            else:
                node[slot] = copy.deepcopy(value)
        else:
            node = node[slot]


def get_override(config: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (KeyError if absent)."""
    node: Any = config
    for token in split_key(key.rstrip("+")):
        node = node[_select(node, token[0], key)] if isinstance(token, tuple) else node[token]
    return node


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        set_override(config, key, value)
    return config


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items (VALUE parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}.")
        out[key] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------------------- running


def _cli(args: list[str]):
    """``vlm.cli.main(args)`` (LightningCLI) with this program's own arguments hidden from it."""
    from vlm.cli import main

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return main(args)
    finally:
        sys.argv = argv


def print_config(axis: Axis, variant: str, tiny: bool, workdir: Path, extra: dict | None = None) -> dict:
    """``fit --config <variant's config> --print_config`` through ``vlm.cli.main``: the resolved config."""
    path = workdir / f"{axis.name}-{variant}-{'tiny' if tiny else 'full'}.yaml"
    path.write_text(yaml.safe_dump(axis.config(variant, tiny, extra), sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _cli(["fit", "--config", str(path), "--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(
                f"{axis.name}/{variant}: the config does not parse:\n{err.getvalue()}"
            ) from None
    return yaml.safe_load(out.getvalue())


def run_settings(config: dict, run_dir: Path, max_steps: int | None, quiet: bool) -> dict[str, Any]:
    """Overrides of the runner itself: steps, validation interval, where logs and checkpoints go."""
    out: dict[str, Any] = {"trainer.default_root_dir": str(run_dir)}
    if max_steps is not None:
        out["trainer.max_steps"] = max_steps
        out.update(scaled_stages(config, max_steps))
    steps = max_steps or config["trainer"].get("max_steps")
    if steps and config["trainer"].get("val_check_interval") is not None:
        out["trainer.val_check_interval"] = steps // 4 if steps % 4 == 0 and steps >= 4 else steps
    logger = config["trainer"].get("logger")
    if isinstance(logger, dict) and "init_args" in logger:
        out["trainer.logger.init_args.save_dir"] = str(run_dir.parent)
        out["trainer.logger.init_args.name"] = run_dir.name
        out["trainer.logger.init_args.version"] = "logs"
    if quiet:
        out["trainer.enable_progress_bar"] = False
        out["trainer.enable_model_summary"] = False
    return out


def scaled_stages(config: dict, max_steps: int) -> dict[str, Any]:
    """A ``StageTransition``'s stages with their start steps scaled from the config's ``trainer.max_steps``
    to ``max_steps`` (later stages still start before the end): a shorter run goes through every stage."""
    old = config["trainer"].get("max_steps")
    for i, callback in enumerate(config["trainer"].get("callbacks") or []):
        if not (
            isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("StageTransition")
        ):
            continue
        if not old or old == max_steps:
            return {}
        stages = copy.deepcopy(callback["init_args"]["stages"])
        for stage in stages:
            if stage["start_step"]:
                stage["start_step"] = min(max(1, round(stage["start_step"] * max_steps / old)), max_steps - 1)
        return {f"trainer.callbacks[{i}].init_args.stages": stages}
    return {}


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
    """``validate --config <eval config + overrides> --ckpt_path ckpt`` through ``vlm.cli.main``; returns
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
    _cli(["validate", "--config", str(path), "--ckpt_path", str(ckpt)])
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


def parameter_counts(module) -> dict[str, int]:
    """Parameters that learn (of the embedding / output matrices whose other rows are held by
    ``train_new_token_embeddings``, only the new tokens' rows) and all of them (adapters excluded)."""
    from lit_modules.policy import new_token_rows

    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    weights, rows = new_token_rows(module.model, module.policy)
    trainable -= sum(w.numel() - len(rows) * w.shape[1] for w in weights)
    total = sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)
    return {"trainable_params": trainable, "total_params": total}


def run_variant(
    axis: Axis,
    variant: str,
    tiny: bool,
    runs: Path,
    max_steps: int | None = None,
    extra: dict | None = None,
    shots: Sequence[int] = (),
    quiet: bool = False,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Fit one variant through ``vlm.cli.main``, save ``final.ckpt``, evaluate it; returns its table row."""
    scale = "tiny" if tiny else "full"
    run_dir = runs / f"{axis.name}_{scale}" / variant
    run_dir.mkdir(parents=True, exist_ok=True)
    config = axis.config(variant, tiny, extra)
    config = apply_overrides(config, run_settings(config, run_dir, max_steps, quiet))
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    body = axis.variant(variant)
    row: dict[str, Any] = {"axis": axis.name, "variant": variant, "scale": scale, "paper": body.get("paper")}
    threads = torch.get_num_threads()
    start = time.perf_counter()
    cli = None
    try:
        cli = _cli(["fit", "--config", str(path)])
        row["fit_seconds"] = round(time.perf_counter() - start, 1)
        row["torch_threads"] = torch.get_num_threads()
        row["steps"] = cli.trainer.global_step
        row.update(parameter_counts(cli.model))
        cli.trainer.save_checkpoint(run_dir / "final.ckpt")
        summary = next((c for c in cli.trainer.callbacks if type(c).__name__ == "MetricSummary"), None)
        if summary is not None and summary.history:
            row["val_acc_logged"] = summary.history[-1][2]
            row["curve"] = " ".join(f"{step}:{value:.3f}" for step, _, value in summary.history)
        if evaluate and tiny:
            row.update(generation_accuracy(cli.model, cli.datamodule))
            if shots:
                row.update(fewshot_shapes(cli, config, run_dir, shots))
        elif evaluate:
            row.update(paper_eval(axis, variant, config, run_dir))
    finally:
        torch.set_num_threads(threads)
    row["seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / "metrics.json").write_text(json.dumps(row, indent=2))
    del cli
    gc.collect()
    return row


# --------------------------------------------------------------------------------------- table and plot

LEADING = ["axis", "variant", "scale", "paper", "val_acc", "acc_count", "acc_colour", "acc_shape", "avg"]
TRAILING = ["steps", "trainable_params", "total_params", "torch_threads", "fit_seconds", "seconds", "curve"]
HIDDEN = {"axis", "scale", "curve", "val_acc_logged", "n_questions", "torch_threads"}  # in the CSV only


def hidden(key: str) -> bool:
    """Columns of the CSV left out of the Markdown table (the per-type scores of the K-shot runs too)."""
    return key in HIDDEN or bool(re.fullmatch(r"shapes_\d+shot_.+", key))


def columns(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r}
    middle = sorted(present - set(LEADING) - set(TRAILING))
    return [k for k in [*LEADING, *middle, *TRAILING] if k in present]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float) and (key.startswith(("val_acc", "acc_")) or "shot" in key):
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown(axis: Axis, rows: list[dict], tiny: bool, command: str, machine: str) -> str:
    spec = axis.spec
    keys = [k for k in columns(rows) if not hidden(k)]
    lines = [f"# {spec.get('title', axis.name)}: {'tiny' if tiny else 'full'} scale", ""]
    lines += [
        f"Paper: Idefics2 {spec.get('table', '')}, {spec.get('paper_setup', spec.get('paper_metric', ''))}.",
        "",
    ]
    if tiny:
        lines += [
            "Tiny metric: `val_acc` = held-out generation accuracy on the synthetic shapes questions "
            f"(each of the {rows[0].get('n_questions', '?')} held-out questions asked alone, greedy "
            "decoding, exact match; chance ~0.26), `acc_<type>` per question type; `shapes_<K>shot` = "
            "VQA accuracy of the same questions through `EvalDataModule` with K in-context shots (the "
            "paper's VQA prompt). `paper` is the paper's score of the row: another metric at another scale.",
            "",
        ]
        if spec.get("tiny_note"):
            lines += [" ".join(str(spec["tiny_note"]).split()), ""]
    lines += [f"Command: `{command}`", "", f"Machine: {machine}", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k in keys) + " |" for r in rows]
    curves = [r for r in rows if r.get("curve")]
    if curves:
        lines += ["", "val/acc during training (step:value):", ""]
        lines += [f"- {r['variant']}: {r['curve']}" for r in curves]
    return "\n".join(lines) + "\n"


def plot(axis: Axis, rows: list[dict], tiny: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    metric = "val_acc" if tiny else "avg"
    panels = 3 if tiny and any(r.get("curve") for r in rows) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 4.2))
    papers = [r.get("paper") for r in rows]
    axes[0].bar(range(len(rows)), [p if p is not None else 0 for p in papers], color="tab:gray")
    for i, p in enumerate(papers):
        axes[0].text(i, (p or 0), "n/a" if p is None else f"{p:g}", ha="center", va="bottom", fontsize=8)
    axes[0].set_title(f"paper ({axis.spec.get('table', '')})", fontsize=10)
    axes[0].set_ylabel("paper score", fontsize=8)
    kinds = [k for k in ("acc_count", "acc_colour", "acc_shape") if tiny and any(k in r for r in rows)]
    width = 0.8 / (1 + len(kinds))
    for j, key in enumerate([metric, *kinds]):
        values = [r.get(key) or 0 for r in rows]
        axes[1].bar([i + (j - len(kinds) / 2) * width for i in range(len(rows))], values, width, label=key)
    axes[1].set_title(("tiny: held-out val/acc" if tiny else "ours: avg score"), fontsize=10)
    if tiny:
        axes[1].axhline(0.26, color="black", lw=0.8, ls=":", label="chance")
        axes[1].set_ylim(0, 1.05)
    axes[1].legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    if panels == 3:
        for r in rows:
            points = [tuple(map(float, p.split(":"))) for p in r.get("curve", "").split()]
            if points:
                axes[2].plot(*zip(*points), marker="o", ms=3, label=r["variant"])
        axes[2].set_title("tiny: val/acc during training", fontsize=10)
        axes[2].set_xlabel("step")
        axes[2].set_ylim(0, 1.05)
        axes[2].legend(fontsize=7)
    fig.suptitle(axis.spec.get("title", axis.name), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(rows: Sequence[dict] = ()) -> str:
    """CPU model and core count, torch version, the torch threads the runs used."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} cores visible, {os.cpu_count()} usable)" if names else cpu
    threads = sorted({r["torch_threads"] for r in rows if r.get("torch_threads")}) or [
        torch.get_num_threads()
    ]
    return (
        f"{platform.system()} {platform.machine()}, {cpu}; torch {torch.__version__}, "
        f"{'/'.join(map(str, threads))} torch thread(s) per run; Python {platform.python_version()}"
    )


def write_outputs(axis: Axis, rows: list[dict], tiny: bool, out: Path, command: str) -> dict[str, Path]:
    """``<out>/<axis>_<scale>.csv``, ``.md`` and ``.png``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{axis.name}_{'tiny' if tiny else 'full'}"
    paths = {"csv": stem.with_suffix(".csv"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown(axis, rows, tiny, command, machine(rows)))
    plot(axis, rows, tiny, paths["png"])
    return paths


# --------------------------------------------------------------------------------------- command line


def run_axis(
    axis: Axis | str | Path,
    tiny: bool = True,
    out: str | Path = "lightning_logs/ablations",
    runs: str | Path = "lightning_logs/ablations/runs",
    max_steps: int | None = None,
    variants: Sequence[str] | None = None,
    extra: dict | None = None,
    shots: Sequence[int] = (),
    quiet: bool = False,
    command: str | None = None,
    report_only: bool = False,
) -> tuple[list[dict], dict[str, Path]]:
    """Run the variants of an axis and write its table and plot; returns (rows, output paths).
    ``report_only``: run nothing, rebuild the table and plot from the runs' ``metrics.json``."""
    from tqdm.auto import tqdm

    axis = axis if isinstance(axis, Axis) else load_axis(axis)
    if tiny and max_steps is None:
        max_steps = axis.spec.get("tiny_steps")
    names = list(variants or axis.variants)
    folder = Path(runs) / f"{axis.name}_{'tiny' if tiny else 'full'}"
    if report_only:  # the table and plot again, from the runs' metrics.json
        rows = [json.loads((folder / name / "metrics.json").read_text()) for name in names]
        saved = folder / "command.txt"
        command = command or (saved.read_text().strip() if saved.exists() else None)
        return rows, write_outputs(axis, rows, tiny, Path(out), command or "?")
    folder.mkdir(parents=True, exist_ok=True)
    if command:
        (folder / "command.txt").write_text(command + "\n")
    rows = []
    bar = tqdm(names, desc=f"{axis.name} ({'tiny' if tiny else 'full'})", unit="variant", file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        row = run_variant(axis, name, tiny, Path(runs), max_steps, extra, shots, quiet)
        rows.append(row)
        metric = row.get("val_acc", row.get("avg"))
        tqdm.write(
            f"[{axis.name}] {name}: {'val_acc' if tiny else 'avg'}={metric} ({row['seconds']} s)",
            file=sys.stderr,
        )
    shown = axis.path.relative_to(ROOT) if axis.path.is_relative_to(ROOT) else axis.path
    command = command or f"python -m vlm.ablate {shown}{' --tiny' if tiny else ''}"
    return rows, write_outputs(axis, rows, tiny, Path(out), command)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("axis", help="configs/ablations/<axis>.yaml")
    parser.add_argument(
        "--tiny", action="store_true", help="run the CPU twins (tiny_base) instead of full scale"
    )
    parser.add_argument(
        "--out", default=None, help="where the table and plot go (default lightning_logs/ablations)"
    )
    parser.add_argument(
        "--runs", default="lightning_logs/ablations/runs", help="run directories (logs, checkpoints)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="trainer.max_steps of every variant")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra override (YAML value)"
    )
    parser.add_argument(
        "--shots", type=int, nargs="*", default=[], metavar="K", help="tiny: also K-shot EvalDataModule runs"
    )
    parser.add_argument("--quiet", action="store_true", help="no Lightning progress bar / model summary")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from --runs")
    parser.add_argument(
        "--list", action="store_true", help="list the variants and their overrides, then exit"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print each variant's resolved config, then exit"
    )
    args = parser.parse_args(argv)
    axis = load_axis(args.axis)
    names = args.variants.split(",") if args.variants else axis.variants
    extra = parse_set(args.set)
    if args.list or args.print_config:
        workdir = Path(args.runs) / "print_config"
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"# --- {axis.name} / {name} ({'tiny' if args.tiny else 'full'}) ---")
            if args.list:
                print(yaml.safe_dump(axis.overrides(name, args.tiny), sort_keys=False), end="")
            else:
                print(
                    yaml.safe_dump(print_config(axis, name, args.tiny, workdir, extra), sort_keys=False),
                    end="",
                )
        return
    command = (
        None
        if args.report
        else "python -m vlm.ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    _, paths = run_axis(
        axis, args.tiny, args.out or "lightning_logs/ablations", args.runs, args.max_steps, names, extra,
        args.shots, args.quiet, command, args.report,
    )  # fmt: skip
    print(paths["md"].read_text())
    print("Wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
