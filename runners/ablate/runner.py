"""Running an axis: each variant's merged config through ``runners.cli.main`` (fit, then evaluation), and
the command line of ``python -m runners.ablate``."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from runners.ablate.axis import ROOT, Axis, load_axis
from runners.ablate.evaluation import cli_main, fewshot_shapes, held_out_accuracy, paper_eval
from runners.ablate.overrides import apply_overrides, parse_set
from runners.ablate.report import write_outputs


def print_config(axis: Axis, variant: str, tiny: bool, workdir: Path, extra: dict | None = None) -> dict:
    """``fit --config <variant's config> --print_config`` through ``runners.cli.main``: the resolved
    config."""
    path = workdir / f"{axis.name}-{variant}-{'tiny' if tiny else 'full'}.yaml"
    path.write_text(yaml.safe_dump(axis.config(variant, tiny, extra), sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main(["fit", "--config", str(path), "--print_config"])
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
    """Fit one variant through ``runners.cli.main``, save ``final.ckpt``, evaluate it; returns its table
    row."""
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
        cli = cli_main(["fit", "--config", str(path)])
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
            row.update(held_out_accuracy(config, run_dir))
            if shots:
                row.update(fewshot_shapes(config, run_dir, shots))
        elif evaluate:
            row.update(paper_eval(axis, variant, config, run_dir))
    finally:
        torch.set_num_threads(threads)
    row["seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / "metrics.json").write_text(json.dumps(row, indent=2))
    del cli
    gc.collect()
    return row


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
    command = command or f"python -m runners.ablate {shown}{' --tiny' if tiny else ''}"
    return rows, write_outputs(axis, rows, tiny, Path(out), command)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runners.ablate", description=__doc__.split("\n\n")[0])
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
        else "python -m runners.ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    _, paths = run_axis(
        axis, args.tiny, args.out or "lightning_logs/ablations", args.runs, args.max_steps, names, extra,
        args.shots, args.quiet, command, args.report,
    )  # fmt: skip
    print(paths["md"].read_text())
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
