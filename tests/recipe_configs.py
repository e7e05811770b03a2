"""The recipes of ``configs/`` as the tests read them (importable as ``recipe_configs``: pytest puts
``tests/`` on the path): a full recipe with its ``data: data/<name>.yaml`` file read in, and its CPU twin,
the overlay ``configs/tiny/<name>.yaml`` written over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
