"""The recipes of ``configs/`` as the tests read them (importable as ``recipe_configs``: pytest puts
``tests/`` on the path): a full recipe with its ``data: data/<name>.yaml`` file read in, and its CPU twin,
the overlay ``configs/tiny/<name>.yaml`` written over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from callbacks.stages import Stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The full recipes (each has a CPU twin overlay in configs/tiny/).
FULL = ("idefics2", "idefics2_sft", "idefics2_chatty", "idefics3", "idefics3_sft")


def merged(base: Any, overlay: Any) -> Any:
    """``overlay`` written over ``base``: dicts merge key by key, anything else is replaced (what
    jsonargparse does to class arguments; the overlays write plain dicts and lists whole)."""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    return {**base, **{key: merged(base.get(key), value) for key, value in overlay.items()}}


def twin(name: str) -> Path:
    """The CPU twin's overlay of ``configs/<name>.yaml``."""
    return CONFIGS / "tiny" / f"{name}.yaml"


def twin_args(name: str) -> list[str]:
    """``--config`` arguments of a CPU twin: the full recipe, then its overlay."""
    return ["--config", str(CONFIGS / f"{name}.yaml"), "--config", str(twin(name))]


def load(name: str, tiny: bool = False) -> dict[str, Any]:
    """The raw recipe ``configs/<name>.yaml`` with its data file read in, and with ``tiny`` the twin's
    overlay written over it."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["data"] = yaml.safe_load((CONFIGS / config["data"]).read_text())
    return merged(config, yaml.safe_load(twin(name).read_text())) if tiny else config


def callback_args(config: dict, class_path: str) -> dict | None:
    """``init_args`` of the trainer callback ``class_path`` in a (raw or printed) config, or None."""
    found = [
        c.get("init_args", {})
        for c in config["trainer"].get("callbacks", [])
        if c["class_path"] == class_path
    ]
    assert len(found) <= 1
    return found[0] if found else None


def stage_table(config: dict) -> list[dict]:
    """The stages of a config (one stage from step 0 for a config without StageTransition), each with the
    settings in effect in it: StageTransition's ``settings_at`` rules (unset fields carry over), the
    model's policy when no stage sets one."""
    model = config["model"]["init_args"]
    args = callback_args(config, "callbacks.StageTransition")
    stages = [Stage(**{**s, "policy": None}) for s in args["stages"]] if args else [Stage(start_step=0)]
    raw = args["stages"] if args else [{}]
    table, settings = [], {"policy": model.get("policy")}
    for stage, entry in zip(stages, raw):
        settings = {**settings, **{k: v for k, v in entry.items() if v is not None and k != "name"}}
        table.append({**settings, "name": stage.name, "start_step": stage.start_step})
    return table
