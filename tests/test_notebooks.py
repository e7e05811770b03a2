"""The notebooks of ``notebooks/`` run top to bottom offline, in a fresh ``python3`` kernel of this
environment (cwd = ``notebooks/``, as Jupyter runs them), without an error and with their plots; the
committed copies carry their outputs (executed, plots embedded) and stay small.

Re-execute the notebooks and save them with their outputs (after changing one, or the code it shows)::

    python tests/test_notebooks.py --update                      # all of them
    python tests/test_notebooks.py --update 02_processing.ipynb  # some
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra: pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="needs the notebooks extra: pip install -e '.[notebooks]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SLOW: set[str] = set()  # names of notebooks too long for the default run (marked `slow`)
MAX_BYTES = 300_000  # a committed notebook, outputs included
CELL_TIMEOUT_S = 300
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def execute(path: Path) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` top to bottom in a fresh ``python3`` kernel (this interpreter,
    cwd = the notebook's folder, hub offline) and return it with its outputs; raises
    ``nbclient.exceptions.CellExecutionError`` at the first cell that fails."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)  # the kernel inherits this environment
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,  # no timestamps in the saved outputs: small diffs
    )
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    ]


def errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}" for o in outputs(notebook) if o.get("output_type") == "error"
    ]


def png_count(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs(notebook))


def params() -> list:
    return [
        pytest.param(path, id=path.name, marks=[pytest.mark.slow] if path.name in SLOW else [])
        for path in NOTEBOOKS
    ]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", params())
def test_notebook_runs_offline_top_to_bottom_with_its_plots(path: Path):
    notebook = execute(path)  # raises CellExecutionError naming the failing cell
    assert not errors(notebook)
    assert png_count(notebook) >= 1, f"{path.name} shows no plot"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in NOTEBOOKS])
def test_committed_notebook_carries_its_outputs_and_stays_small(path: Path):
    """What readers see on GitHub: every code cell executed in order, no error, plots embedded."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{path.name} is not saved executed top to bottom: run python tests/test_notebooks.py --update"
    )
    assert not errors(notebook)
    assert png_count(notebook) >= 1
    assert path.stat().st_size < MAX_BYTES, (
        f"{path.name}: {path.stat().st_size} bytes; lower the figures' dpi"
    )


def update(names: list[str]) -> None:
    """Execute the named notebooks (default: all) and save them with their outputs, in place."""
    paths = [NOTEBOOK_DIR / name for name in names] if names else NOTEBOOKS
    for path in paths:
        start = time.perf_counter()
        notebook = execute(path)
        nbformat.write(notebook, path)
        size = path.stat().st_size
        print(f"{path.name}: {time.perf_counter() - start:.1f}s, {png_count(notebook)} plots, {size} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-execute notebooks/ and save them with outputs.")
    parser.add_argument("--update", action="store_true", help="execute and save (the only action)")
    parser.add_argument("names", nargs="*", help="notebook file names (default: all of notebooks/)")
    args = parser.parse_args()
    if not args.update:
        parser.error(
            "pass --update (the tests themselves run with: python -m pytest tests/test_notebooks.py)"
        )
    update(args.names)
    sys.exit(0)
