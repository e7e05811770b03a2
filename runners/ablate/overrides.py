"""Dotted-path overrides of a YAML config (``trainer.callbacks[StageTransition].init_args...``): get,
set, extend and apply them, and parse ``--set key=value`` arguments."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import yaml

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
