"""Build hooks only (metadata lives in setup.cfg): ship ``idefics_lightning_main.pth``.

``python -m lightning ...`` needs a ``lightning.__main__``, which the ``lightning`` package does
not ship. Without touching that package, both wheels (``pip install .`` and ``pip install -e .``)
carry a one-line ``.pth`` at their root (site-packages) that imports ``_idefics_lightning_hook``;
the hook adds a ``sys.meta_path`` finder answering only for ``lightning.__main__`` with
``runners/__main__.py``.

- regular wheel: ``build_py`` writes the ``.pth`` into ``build_lib`` and lists it in its outputs;
- editable wheel: setuptools ignores extra ``build_py`` outputs there, so ``editable_wheel``
  wraps the editable strategy (private ``_select_strategy``: setuptools is pinned in
  ``pyproject.toml``) to also write the ``.pth`` into the wheel.

The ``.pth`` name sorts after setuptools' ``__editable__.*.pth``, whose finder must be installed
before ours imports ``_idefics_lightning_hook`` from the source tree. ``.ci/run`` tests both modes.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "idefics_lightning_main.pth"
PTH_LINE = "import _idefics_lightning_hook\n"


class BuildPyWithPth(build_py):
    def _pth_path(self):
        return os.path.join(self.build_lib, PTH_NAME)

    def run(self):
        super().run()
        if not self.editable_mode:
            os.makedirs(self.build_lib, exist_ok=True)
            with open(self._pth_path(), "w", encoding="utf-8") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs = [*outputs, self._pth_path()]
        return outputs


class _StrategyWithPth:
    """Wraps setuptools' editable strategy: same behaviour, plus our ``.pth`` in the wheel."""

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, wheel, files, mapping):
        result = self._inner(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("utf-8"))
        return result

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._inner.__exit__(*exc_info)


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithPth(super()._select_strategy(name, tag, build_lib))


if not hasattr(editable_wheel, "_select_strategy"):  # private API moved: fail the build, not the install
    raise RuntimeError(
        "setuptools.command.editable_wheel has no _select_strategy: setup.py's editable hook needs the "
        "setuptools version pinned in pyproject.toml [build-system] requires"
    )

setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
