"""The CLI before and while training: a full recipe on a machine without its GPUs, weights or data stops
at once with a message (``runners.preflight``); progress shows as plain lines when stdout is a file and as
a bar over optimizer steps on a terminal (``callbacks.progress``)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, IterableDataset

from callbacks import PlainProgress, StepProgressBar
from callbacks.progress import progress_callbacks

ROOT = Path(__file__).resolve().parents[1]


def _lightning_fit(configs: list[str], cwd: Path, stdout, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    args = [
        sys.executable,
        "-m",
        "lightning",
        "fit",
        *(a for c in configs for a in ("--config", str(ROOT / c))),
    ]
    return subprocess.run(
        args, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has the recipe's GPUs per node")
@pytest.mark.parametrize("name", ["idefics2", "idefics3_sft"])
def test_full_recipe_on_this_machine_stops_with_what_is_missing(name, tmp_path):
    start = time.monotonic()
    result = _lightning_fit([f"configs/{name}.yaml"], tmp_path, subprocess.PIPE, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode != 0
    error = result.stderr
    assert "Traceback" not in error, error[-3000:]
    assert f"{name}.yaml cannot run on this machine" in error
    assert "not enough CUDA devices: trainer.devices 8" in error
    assert "no multi-node launcher" in error
    assert "DATA_ROOT is not set" in error
    assert f"configs/tiny/{name}.yaml" in error
    if name == "idefics3_sft":
        assert "model.from_transformers: /path/to/idefics3-pretrained does not exist" in error
    else:
        assert "model.model.language.pretrained" in error and "mistralai/Mistral-7B-v0.1" in error
    assert not (tmp_path / "lightning_logs").exists()  # nothing built


def test_redirected_stdout_gets_plain_progress_lines(tmp_path):
    log = tmp_path / "out.txt"
    with open(log, "w") as stdout:
        twin = ["configs/idefics3_sft.yaml", "configs/tiny/idefics3_sft.yaml"]  # the recipe + its CPU overlay
        result = _lightning_fit(twin, tmp_path, stdout, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"step {s}/4 ({25 * s}%)" for s in range(1, 5)]
    for line in lines:
        fields = [f.split(" ")[0] for f in line.split(" | ")]
        assert fields == ["step", "loss", "lr", "tokens/s", "elapsed", "ETA"], line


class Endless(IterableDataset):
    """A stream without a length, like VLMDataModule's training stream."""

    def __iter__(self):
        while True:
            x = torch.randn(4)
            yield x, x.sum(0, keepdim=True)


def test_step_bar_totals_are_max_steps_on_an_endless_stream(tmp_path):
    from cli_fixtures import TinyModule

    bar = StepProgressBar()
    trainer = Trainer(
        max_steps=5,
        accumulate_grad_batches=2,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), DataLoader(Endless(), batch_size=2))
    assert bar.train_progress_bar.total == 5 and bar.train_progress_bar.n == 5
    assert bar.train_progress_bar.desc.strip().rstrip(":") == "Epoch 0"


def test_progress_callbacks_follow_stdout():
    added, enabled = progress_callbacks([], True, terminal=True)
    assert [type(c) for c in added] == [StepProgressBar] and enabled
    added, enabled = progress_callbacks([], True, terminal=False)
    assert [type(c) for c in added] == [PlainProgress] and not enabled
    assert progress_callbacks([PlainProgress(3)], False, terminal=False) == ([], False)
    with pytest.raises(ValueError, match="every_n_steps"):
        PlainProgress(0)


def test_preflight_report_reads_the_config(tmp_path, monkeypatch):
    from runners.preflight import preflight_report

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    data = {
        "init_args": {"tokenizer": "tiny", "sources": [{"source": "s", "urls": "${ROOT19}/shards/*.tar"}]}
    }
    config = {"trainer": {"accelerator": "cpu", "devices": 1}, "model": {"init_args": {}}, "data": data}
    monkeypatch.delenv("ROOT19", raising=False)
    assert "ROOT19 is not set" in preflight_report(config)
    monkeypatch.setenv("ROOT19", str(tmp_path / "elsewhere"))
    assert "no shard matches" in preflight_report(config)
    monkeypatch.setenv("ROOT19", str(tmp_path))
    assert preflight_report(config) is None  # found shards; "tiny" is a name, not a path
    config["model"]["init_args"]["from_transformers"] = str(tmp_path / "missing")
    assert f"model.from_transformers: {tmp_path / 'missing'} does not exist" in preflight_report(config)
