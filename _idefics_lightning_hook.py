"""Startup hook that makes ``python -m lightning ...`` run this project's CLI (``runners/__main__.py``).

The ``lightning`` package (2.6.x) ships no ``lightning/__main__.py``. Rather than shadowing or
editing the installed package, the wheel (regular and editable) ships a one-line
``idefics_lightning_main.pth`` in site-packages that imports this module at interpreter start.
It appends to ``sys.meta_path`` a finder that answers ONLY for the name ``lightning.__main__``,
and only when no earlier finder did (so a future ``lightning/__main__.py`` would win), with a
spec that loads ``runners/__main__.py`` under that name; runpy then executes it as ``__main__``.

This runs in every interpreter of the environment, so it must stay cheap and must never raise:
it imports nothing beyond ``sys`` at startup; ``runners`` is located only when ``lightning.__main__``
is actually requested. See ``setup.py`` for how the ``.pth`` gets into the wheels.
"""

import sys

TARGET = "lightning.__main__"
CLI_MODULE = "runners.__main__"


class LightningMainFinder:
    """``sys.meta_path`` finder: ``lightning.__main__`` -> this project's ``runners/__main__.py``."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        try:
            import importlib.util

            cli_spec = importlib.util.find_spec(CLI_MODULE)
            if cli_spec is None or not cli_spec.has_location or not cli_spec.origin:
                return None
            # A spec of our own name: the CLI module's own spec would fail in runpy
            # ("loader for runners.__main__ cannot handle lightning.__main__").
            return importlib.util.spec_from_file_location(TARGET, cli_spec.origin)
        except Exception:  # never break an import in someone else's process
            return None

    @staticmethod
    def invalidate_caches():
        pass


def install():
    """Append the finder once (idempotent: re-running site or importing twice adds nothing)."""
    try:
        if not any(getattr(f, "__name__", None) == LightningMainFinder.__name__ for f in sys.meta_path):
            sys.meta_path.append(LightningMainFinder)
    except Exception:
        pass


install()
