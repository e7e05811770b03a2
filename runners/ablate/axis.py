"""Ablation axis files (``configs/ablations/*.yaml``): the base recipes, shared overrides and
variants of one axis, and the merged config of each variant."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runners.ablate.overrides import apply_overrides

ROOT = Path(__file__).resolve().parents[2]
AXIS_KEYS = {"name", "title", "table", "paper_metric", "paper_setup", "base", "tiny_base", "set", "full"}
AXIS_KEYS |= {"tiny", "eval", "tiny_steps", "variants", "tiny_note"}
VARIANT_KEYS = {"paper", "label", "note", "set", "full", "tiny", "eval"}


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
        base = self.base(tiny)
        config = yaml.safe_load(base.read_text())
        if isinstance(config.get("data"), str):  # `data: data/<name>.yaml`, relative to the recipe
            config["data"] = yaml.safe_load((base.parent / config["data"]).read_text())
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
