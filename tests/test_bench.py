"""The benchmark scripts run end to end at small sizes and end with the documented JSON line (``slow``:
about a minute each). Their own checks (same loss on the unpacked batch, identical greedy tokens, outputs
equal to the reference processor's) stop them with an error, so a pass here means those checks held;
the figures themselves are in BENCHMARKS.md (no timing threshold here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
KEYS = {"measure", "ours", "reference", "unit", "ratio", "goal"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "measures"),
    [
        (
            "training.py",
            ["--docs", "8", "--repeats", "1"],
            {"training tokens/s", "training peak memory", "training MFU"},
        ),
        (
            "training.py",
            ["--docs", "8", "--repeats", "1", "--dtype", "bfloat16"],
            {"training tokens/s", "training peak memory", "training MFU"},
        ),
        ("generation.py", ["--prompts", "2", "--new-tokens", "4", "--repeats", "1"], {"generation tokens/s"}),
        (
            "gpu_training.py",
            ["--rows", "2", "--steps", "1", "--repeats", "1"],
            {f"a/{side} {m}" for side in "bc" for m in ("tokens/s", "peak memory", "MFU")},
        ),
        (
            "packed_attention.py",
            ["--lengths", "512", "--repeats", "1"],
            {
                "packed forward+backward tokens/s, 512 tokens",
                "packed forward+backward peak memory, 512 tokens",
            },
        ),
        (
            "generation.py",
            ["--prompts", "2", "--new-tokens", "4", "--repeats", "1", "--dtype", "bfloat16"],
            {"generation tokens/s"},
        ),
    ],
)
def test_benchmark_runs_and_ends_with_its_json_line(script, args, measures):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["measure"] for r in results} == measures
    for result in results:
        assert set(result) == KEYS and result["ours"] > 0 and result["reference"] > 0 and result["ratio"] > 0


@pytest.mark.slow
def test_resume_benchmark_seeks_to_the_replayed_batch():
    """bench/resume.py stops with an error unless the batch after a seek equals the replayed one."""
    args = ["--positions", "20", "300", "--samples", "600"]
    command = [sys.executable, str(BENCH / "resume.py"), *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["measure"] for r in results] == [
        f"time to first batch, resume at {n} samples" for n in (20, 300)
    ]
    assert all(set(r) == KEYS and r["ours"] > 0 and r["reference"] > 0 for r in results)
