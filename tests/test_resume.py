"""Kill and resume through Lightning: ``fit``, a checkpoint mid-stream, ``fit(ckpt_path=...)`` on another
number of devices (DDP, gloo) and dataloader workers, twice in a row, with ``persistent_workers``. The
resumed runs train on exactly the global batches of the uninterrupted run (``datamodules.streaming``).

Each run is ``tests/distributed_scripts/resume.py`` in a subprocess (Lightning re-launches it for rank 1
under DDP); it records every row of every optimizer step on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datamodules.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_scripts" / "resume.py"
STEPS = 6


def run(
    data: Path,
    run_dir: Path,
    devices: int,
    workers: int,
    batch: int,
    accumulate: int = 1,
    persistent: bool = False,
    ckpt: Path | None = None,
) -> dict[int, Counter]:
    """One fit; the rows of each optimizer step over all ranks and micro-batches (a multiset per step)."""
    run_dir.mkdir(parents=True)
    args = [str(data), str(run_dir), devices, workers, batch, accumulate, int(persistent), STEPS]
    command = [sys.executable, str(SCRIPT), *map(str, args), *([str(ckpt)] if ckpt else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    steps: dict[int, Counter] = {}
    for rank in range(devices):
        for step, rows in json.loads((run_dir / f"rows.{rank}.json").read_text()).items():
            steps.setdefault(int(step), Counter()).update(tuple(row) for row in rows)
    return steps


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("laion")
    write_shards("laion_coco", root, 64, seed=0)
    return root


def test_resume_on_other_devices_and_workers_twice_sees_the_uninterrupted_batches(data, tmp_path):
    # 4 rows per optimizer step everywhere; the first run (2 devices x 2 workers) fixes 4 partitions
    full = run(data, tmp_path / "full", devices=2, workers=2, batch=2)
    assert sorted(full) == list(range(1, STEPS + 1)) and all(sum(s.values()) == 4 for s in full.values())
    one_device = run(
        data, tmp_path / "one", devices=1, workers=0, batch=4, ckpt=tmp_path / "full/ckpt/step=2.ckpt"
    )
    assert sorted(one_device) == [3, 4, 5, 6]
    assert all(one_device[step] == full[step] for step in one_device)
    again = run(
        data,
        tmp_path / "again",
        devices=1,
        workers=2,
        batch=4,
        persistent=True,
        ckpt=tmp_path / "one/ckpt/step=4.ckpt",
    )
    assert sorted(again) == [5, 6] and all(again[step] == full[step] for step in again)
    accumulated = run(
        data,
        tmp_path / "acc",
        devices=2,
        workers=0,
        batch=1,
        accumulate=2,
        ckpt=tmp_path / "full/ckpt/step=4.ckpt",
    )
    assert sorted(accumulated) == [5, 6] and all(accumulated[step] == full[step] for step in accumulated)
