"""Can this machine run the parsed config? Checked by the CLI before any class is built.

A full recipe (``configs/idefics2.yaml``: 8 nodes x 8 GPUs, hub weights, ``${DATA_ROOT}`` shards) on a
machine without them would otherwise end in a raw Lightning traceback, or hang waiting for the other
nodes of a distributed run. ``preflight_report`` reads the parsed config only (no file names are
special): the trainer's accelerator / devices / num_nodes against the CUDA devices and the launcher
here, every ``pretrained`` / ``from_transformers`` / ``tokenizer`` value of the model and data against
the file system and the Hugging Face cache, every ``urls`` of the data against its environment
variables and shards. It returns what is missing, what the recipe expects, and the CPU twin
(the overlay ``<config dir>/tiny/<same name>``, given after the recipe) when there is one; ``None``
when nothing is missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: Config keys naming weights or a tokenizer to load: a local path or a Hugging Face hub name.
WEIGHT_KEYS = ("pretrained", "from_transformers", "tokenizer")

#: ``namespace/name``, the form of a hub repository id (anything else that is not a folder is a path).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ENV_VAR = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")
_SHOWN = 4  # items listed per problem before "and N more"


def _walk(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf and dict of a parsed config, ``init_args`` left out of the
    keys (``model.model.language.pretrained``, as on the command line)."""
    if isinstance(tree, dict):
        yield prefix, tree
        for key, value in tree.items():
            yield from _walk(value, prefix if key == "init_args" else f"{prefix}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _walk(value, f"{prefix}[{index}]")
    else:
        yield prefix, tree


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _devices_needed(devices: Any) -> int:
    """CUDA devices one node needs for ``trainer.devices`` (a count, ``-1`` / ``"auto"``, or indices)."""
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            return 1
        if "," not in devices:
            return int(devices)
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, (list, tuple)):
        return max(devices) + 1 if devices else 0
    return 1 if devices in (None, -1) else int(devices)


def _multi_node_launcher() -> bool:
    """Was this process started by a launcher that starts the other nodes' processes too?"""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    launchers = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, MPIEnvironment)
    return "NODE_RANK" in os.environ or any(env.detect() for env in launchers)


def _hardware(trainer: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, expectations) of ``trainer.accelerator`` / ``devices`` / ``num_nodes`` here."""
    import torch

    accelerator, devices = trainer.get("accelerator") or "auto", trainer.get("devices") or "auto"
    num_nodes = int(trainer.get("num_nodes") or 1)
    problems, expects = [], []
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda"):
        needed, found = _devices_needed(devices), torch.cuda.device_count()
        expects.append(
            f"{num_nodes * needed} CUDA devices: trainer.num_nodes {num_nodes} x trainer.devices {devices} "
            f"(trainer.accelerator {accelerator})"
        )
        if found < needed:
            problems.append(
                f"not enough CUDA devices: trainer.devices {devices} needs {needed} on this node "
                f"(x trainer.num_nodes {num_nodes}), torch.cuda.device_count() finds {found}."
            )
    if num_nodes > 1:
        expects.append(f"{num_nodes} nodes, each process started by SLURM (srun) or torchrun")
        if not _multi_node_launcher():
            problems.append(
                f"trainer.num_nodes {num_nodes}, but no multi-node launcher started this process (SLURM "
                "srun, torchrun, or NODE_RANK and MASTER_ADDR set on each node): it would wait for the "
                f"other {num_nodes - 1} nodes forever."
            )
    return problems, expects


def _weight(key: str, value: str, offline: bool) -> tuple[str | None, str]:
    """(problem or None, expectation) of one ``WEIGHT_KEYS`` value."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from vlm.language_model import resolve_path

    resolved = resolve_path(value)
    unset = sorted(set(_ENV_VAR.findall(resolved)))
    if unset:
        return f"{key} {value}: {', '.join(unset)} not set.", f"{key} = {value}"
    if os.path.exists(resolved):
        return None, f"{key} = {value} (found)"
    if not _HUB_ID.fullmatch(value):
        return (
            f"{key}: {resolved} does not exist; pass --{key} <folder> (a local copy of the weights).",
            f"{key} = {value} (a local folder)",
        )
    cache = Path(constants.HF_HUB_CACHE)
    snapshots = cache / repo_folder_name(repo_id=value, repo_type="model") / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return None, f"{key} = {value} (hub name, in the Hugging Face cache)"
    if offline:
        return (
            f"{key}: {value} is neither a local folder nor in the Hugging Face cache ({cache}), "
            f"and the hub is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): pass --{key} <folder>.",
            f"{key} = {value} (hub name)",
        )
    return None, f"{key} = {value} (hub name, not cached: downloaded on first use)"


def _weights(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, expectations) of every ``WEIGHT_KEYS`` value of ``model`` and ``data`` that names a
    path or a hub model (bare names such as the ``tiny`` tokenizer are not files)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0")
    problems, expects = [], []
    for key, value in _walk({"model": config.get("model"), "data": config.get("data")}, ""):
        if key.rsplit(".", 1)[-1] in WEIGHT_KEYS and isinstance(value, str) and re.search(r"[/~$]", value):
            problem, expect = _weight(key.lstrip("."), value, bool(offline))
            problems += [problem] if problem else []
            expects.append(expect)
    return problems, expects


def _under(pattern: str, root: str | None) -> bool:
    return root is not None and os.path.abspath(pattern).startswith(os.path.abspath(root) + os.sep)


def _data(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, expectations) of every ``urls`` of the data: unset environment variables, local
    patterns matching no shard. Remote URLs are checked when opened; shards the DataModule writes
    itself (``synthetic`` under ``data_root``) are not there yet."""
    from datamodules.datamodule import expand_env
    from datamodules.sources import expand_urls

    init = data.get("init_args", data) if isinstance(data, dict) else {}
    root = init.get("data_root") if init.get("synthetic") or init.get("val_synthetic") else None
    unset: dict[str, list[str]] = {}
    unmatched, expects = [], []
    for key, node in _walk(data, "data"):
        if not (isinstance(node, dict) and node.get("urls")):
            continue
        written = node["urls"]
        written = [written] if isinstance(written, str) else list(written)
        name = f"{key} ({node['source']})" if node.get("source") else key
        expects += written
        expanded = expand_env(node)["urls"]
        for raw, pattern in zip(written, [expanded] if isinstance(expanded, str) else expanded):
            missing = _ENV_VAR.findall(pattern)
            for var in missing:
                unset.setdefault(var, []).append(raw)
            if missing or _under(pattern, root) or pattern.startswith("pipe:"):
                continue
            if "://" in pattern and not pattern.startswith("file://"):
                continue
            try:
                expand_urls(pattern)
            except FileNotFoundError:
                unmatched.append(f"{name}: {pattern}")
    problems = [
        f"{var} is not set; the data's urls read {_listed(patterns)}: "
        f"export {var}=<the folder holding the shards>."
        for var, patterns in unset.items()
    ]
    if unmatched:
        problems.append(f"no shard matches the data's urls: {_listed(unmatched)}.")
    return problems, ([f"data shards: {_listed(expects)}"] if expects else [])


def preflight_report(config: dict[str, Any], config_files: Sequence[str] = ()) -> str | None:
    """What this machine lacks to run ``config`` (a parsed CLI config as a dict: ``trainer``, ``model``,
    ``data``), what the config expects, and its CPU twin; ``None`` when nothing is missing.

    ``config_files``: the ``--config`` files as given, to name the config and find a twin
    ``<dir>/tiny/<name>`` next to it.
    """
    hardware = _hardware(config.get("trainer") or {})
    weights = _weights(config)
    data = _data(config.get("data") or {})
    problems = hardware[0] + weights[0] + data[0]
    if not problems:
        return None
    name = config_files[-1] if config_files else "this config"
    lines = [f"{name} cannot run on this machine (checked before building the model):"]
    lines += [f"  - {p}" for p in problems]
    lines += ["It expects:"] + [f"  - {e}" for e in hardware[1] + weights[1] + data[1]]
    twin = os.path.join(os.path.dirname(name), "tiny", os.path.basename(name))
    if config_files and os.path.isfile(twin):
        lines.append(
            "Its CPU twin runs here (tiny model, synthetic data; an overlay on this recipe): "
            f"python -m lightning fit --config {name} --config {twin}"
        )
    return "\n".join(lines)
