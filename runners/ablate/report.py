"""An axis' results as a CSV, a Markdown table (with the paper's numbers beside ours) and a plot."""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from runners.ablate.axis import Axis

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
