"""The command line: ``python -m lightning ...`` and ``python -m runners ...`` (subprocess tests).

``python -m lightning`` only works once the project is pip-installed (``pip install -e .`` or
``pip install .``): the installed ``idefics_lightning_main.pth`` imports ``_idefics_lightning_hook``
at interpreter start (see setup.py). Without an install those tests fail, saying to install (the
README's install command does).

The subprocesses run from a temporary directory (not the repo root, so nothing is found through
the working directory) with ``PYTHONPATH=tests`` for ``cli_fixtures``' tiny module/datamodule.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _env(*extra_paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in extra_paths]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _run(args: list[str], cwd: Path, *extra_paths: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(TESTS, *extra_paths),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lightning(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return _run(["-m", "lightning", *args], cwd, **kwargs)


@pytest.fixture(scope="module")
def hook_installed(tmp_path_factory) -> None:
    """Fail, saying how to fix it, unless a fresh interpreter imports our hook at startup."""
    cwd = tmp_path_factory.mktemp("hook")
    probe = _run(["-c", "import sys; print('_idefics_lightning_hook' in sys.modules)"], cwd)
    assert probe.returncode == 0, probe.stderr
    if probe.stdout.strip() != "True":
        pytest.fail("project not pip-installed here (no idefics_lightning_main.pth): run `pip install -e .`")


def _write_config(path: Path, marker: Path, trainer: dict | None = None) -> Path:
    config = {
        "model": {
            "class_path": "cli_fixtures.TinyModule",
            "init_args": {"hidden": 4, "marker_path": str(marker)},
        },
        "data": {"class_path": "cli_fixtures.TinyDataModule", "init_args": {"hidden": 4}},
        "trainer": trainer or {"max_steps": 3},
    }
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------ the hook itself (in-process)


def test_hook_finder_answers_only_lightning_main():
    import _idefics_lightning_hook as hook

    finder = hook.LightningMainFinder
    assert finder.find_spec("lightning") is None
    assert finder.find_spec("lightning.pytorch") is None
    assert finder.find_spec("runners.__main__") is None
    spec = finder.find_spec("lightning.__main__")
    assert spec is not None and spec.name == "lightning.__main__"
    assert Path(spec.origin).name == "__main__.py" and Path(spec.origin).parent.name == "runners"
    hook.install()
    hook.install()
    assert sum(getattr(f, "__name__", None) == "LightningMainFinder" for f in sys.meta_path) == 1


def test_setup_writes_pth_for_both_install_modes():
    """The .pth line imports the hook; setup.py registers both cmdclass overrides."""
    text = (ROOT / "setup.py").read_text()
    assert 'PTH_LINE = "import _idefics_lightning_hook\\n"' in text
    assert '"build_py": BuildPyWithPth' in text and '"editable_wheel": EditableWheelWithPth' in text
    assert "py_modules = _idefics_lightning_hook" in (ROOT / "setup.cfg").read_text()
    assert "setuptools==" in (ROOT / "pyproject.toml").read_text()  # private API used: pinned


# ------------------------------------------------------------------ python -m lightning (needs an install)


def test_lightning_help_from_any_directory(hook_installed, tmp_path):
    result = _lightning(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "python -m lightning" in result.stdout
    for sub in SUBCOMMANDS:
        assert sub in result.stdout


def test_print_config_with_overrides(hook_installed, tmp_path):
    config = _write_config(tmp_path / "c.yaml", tmp_path / "marker.json")
    result = _lightning(
        [
            "fit",
            "--config",
            str(config),
            "--model.lr",  # short form (class already known from the config)
            "0.05",
            "--model.init_args.hidden",
            "8",
            "--trainer.max_steps",
            "7",
            "--print_config",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "cli_fixtures.TinyModule"
    assert printed["model"]["init_args"] == {
        "hidden": 8,
        "lr": 0.05,
        "marker_path": str(tmp_path / "marker.json"),
    }
    assert printed["data"]["class_path"] == "cli_fixtures.TinyDataModule"
    assert printed["trainer"]["max_steps"] == 7
    assert printed["seed_everything"] == 42
    assert not (tmp_path / "marker.json").exists()  # --print_config does not run anything


@pytest.mark.parametrize(
    ("trainer", "extra", "named"),
    [
        ({"max_stepz": 3}, [], "max_stepz"),  # unknown key in the YAML
        # unknown init arg on the command line; bad value (slow: ~6 s of imports each)
        pytest.param({"max_steps": 3}, ["--model.hiddne", "3"], "hiddne", marks=pytest.mark.slow),
        pytest.param({"max_steps": 3}, ["--model.lr", "abc"], '"lr"', marks=pytest.mark.slow),
    ],
    ids=["yaml-key", "cli-init-arg", "bad-value"],
)
def test_bad_config_names_the_key(hook_installed, tmp_path, trainer, extra, named):
    config = _write_config(tmp_path / "c.yaml", tmp_path / "marker.json", trainer)
    result = _lightning(["fit", "--config", str(config), *extra], tmp_path)
    assert result.returncode != 0
    error = result.stderr[result.stderr.rfind("error:") :]
    assert named in error, result.stderr[-2000:]
    assert not (tmp_path / "marker.json").exists()


def _two_step_fit(config: Path, root: Path) -> list[str]:
    """``fit`` arguments for a quiet 2-step CPU run of ``config`` in ``root``."""
    trainer = {
        "max_steps": "2",
        "accelerator": "cpu",
        "logger": "false",
        "enable_checkpointing": "false",
        "enable_progress_bar": "false",
        "default_root_dir": str(root),
    }
    return ["fit", "--config", str(config), *(a for k, v in trainer.items() for a in (f"--trainer.{k}", v))]


def test_fit_trains(hook_installed, tmp_path):
    marker = tmp_path / "marker.json"
    config = _write_config(tmp_path / "c.yaml", marker)
    result = _lightning(_two_step_fit(config, tmp_path / "run"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads(marker.read_text())
    assert done["global_step"] == 2 and len(done["losses"]) == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # save_config_kwargs
    assert saved["trainer"]["max_steps"] == 2


@pytest.mark.slow
def test_fit_ddp_relaunch(hook_installed, tmp_path):
    """strategy=ddp re-launches ``python -m lightning.__main__ ...``: the hook must serve the children too."""
    marker = tmp_path / "marker.json"
    config = _write_config(tmp_path / "c.yaml", marker)
    args = [*_two_step_fit(config, tmp_path / "run"), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = _lightning(args, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(marker.read_text())["global_step"] == 2


# ------------------------------------------ python -m runners (works without an install too)


def test_runners_main_is_the_same_entry(tmp_path):
    result = _run(["-m", "runners", "fit", "--help"], tmp_path, ROOT)
    assert result.returncode == 0, result.stderr
    assert "python -m runners" in result.stdout
    for option in ("--config", "--print_config", "--trainer.max_steps", "--model", "--data", "--ckpt_path"):
        assert option in result.stdout


# ------------------------------------------------------------------ no silent trap


def _text_files():
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if tracked.returncode != 0:  # not a git checkout: walk the tree
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    else:
        names = tracked.stdout.splitlines()
    suffixes = {".py", ".sh", ".yaml", ".yml", ".cfg", ".toml", ".ipynb", ".md", ".txt", ""}
    for name in names:
        path = ROOT / name
        if path.suffix in suffixes and path.is_file() and ".git" not in path.parts:
            yield path


def test_lightning_pytorch_cli_module_is_never_run():
    """That module has no ``__main__`` block: running it exits 0 WITHOUT training. Prose may warn about
    it, but no command (code, scripts, configs, fenced blocks of docs) may run it."""
    run_it = re.compile(r"-m[\s'\",]+lightning\.pytorch\.cli\b")
    offenders = []
    for path in _text_files():
        text = path.read_text(errors="ignore")
        if path.suffix == ".md":
            text = "\n".join(re.findall(r"```.*?```", text, flags=re.DOTALL))
        if run_it.search(text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
