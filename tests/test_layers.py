"""The layers of docs/ARCHITECTURE.md, bottom up: ``vlm`` < ``datamodules`` < ``lit_modules`` < ``callbacks``
< ``runners``. Every import (module level and inside functions or classes, relative ones resolved) may
only point down; ``vlm`` imports no Lightning at all. No exceptions are listed."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What each package must not import (a name, or a name's dotted prefix).
FORBIDDEN = {
    "vlm": ("lightning", "pytorch_lightning", "datamodules", "lit_modules", "callbacks", "runners"),
    "datamodules": ("lit_modules", "callbacks", "runners"),
    "lit_modules": ("callbacks", "runners"),
    "callbacks": ("runners",),
    "runners": (),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file, wherever it stands."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return sorted(found)


def violations(root: Path = ROOT) -> list[str]:
    """``file:line: module`` for every import that points up a layer."""
    out = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imports_of(path, root):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    out.append(f"{path.relative_to(root)}:{line}: {name}")
    return out


def test_imports_point_down():
    assert violations() == []


def test_upward_imports_are_found(tmp_path):
    """Imports inside functions and classes, and relative ones, are seen."""
    (tmp_path / "vlm" / "sub").mkdir(parents=True)
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "vlm" / "sub" / "x.py").write_text(
        "import torch\n"
        "def f():\n    from lightning.pytorch import Callback\n"
        "class C:\n    def g(self):\n        import datamodules.evaluation\n"
        "from ..y import z\n"
    )
    (tmp_path / "callbacks" / "__init__.py").write_text("from .c import D\nfrom runners import cli\n")
    assert imports_of(tmp_path / "vlm" / "sub" / "x.py", tmp_path) == [
        (1, "torch"), (3, "lightning.pytorch"), (6, "datamodules.evaluation"), (7, "vlm.y")
    ]  # fmt: skip
    assert violations(tmp_path) == [
        "vlm/sub/x.py:3: lightning.pytorch",
        "vlm/sub/x.py:6: datamodules.evaluation",
        "callbacks/__init__.py:2: runners",
    ]


def test_vlm_imports_without_lightning():
    code = (
        "import importlib, pkgutil, sys, vlm\n"
        "for info in pkgutil.walk_packages(vlm.__path__, 'vlm.'):\n"
        "    if not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *FORBIDDEN["vlm"]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
