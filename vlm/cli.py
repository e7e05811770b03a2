"""Command line entry of the project: ``python -m lightning <subcommand> ...`` or ``python -m vlm ...``.

``LightningCLI`` in subclass mode: no fixed classes, so the YAML (or the command line) picks the
LightningModule and LightningDataModule by import path::

    model:
      class_path: lit_modules.VLMModule
      init_args: {...}
    data:
      class_path: datamodules.VLMDataModule
      init_args: {...}

Subcommands: ``fit``, ``validate``, ``test``, ``predict``. Everything LightningCLI/jsonargparse
offers works: ``--config``, ``--print_config``, ``--model.init_args.x 1`` (or ``--model.x 1`` once
the class is known), ``--trainer.max_steps 10``, ``--ckpt_path ...``. Unknown keys and bad values
are reported by jsonargparse with the key's name and a non-zero exit.

``python -m lightning`` reaches this file through ``_idefics_lightning_hook`` (installed by
``pip install .`` or ``pip install -e .``; see ``setup.py``), which loads it under the name
``lightning.__main__``. So: absolute imports only, and no classes defined here (they would live in
``__main__`` and not pickle): the CLI class is ``vlm.lightning_cli.VLMCLI``, LightningCLI plus a
check that this machine has what the config needs (``vlm.preflight``: a full recipe on a CPU machine
stops at once, naming what is missing and its CPU twin) and the progress display fit for stdout (a
step bar on a terminal, plain lines in a log file: ``callbacks.progress``). Lightning is imported
inside ``main()`` only, so importing ``vlm.cli`` stays as light as the rest of ``vlm``.
"""

import sys
from typing import Any

#: Default for ``--seed_everything``: a fixed seed (saved in config.yaml) so runs are reproducible;
#: ``--seed_everything true`` picks a random one, ``false`` disables seeding.
SEED_EVERYTHING_DEFAULT = 42


def _prog() -> str:
    """``python -m lightning`` / ``python -m vlm`` in usage lines instead of ``cli.py``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    if name.endswith(".__main__"):
        name = name[: -len(".__main__")]
    return f"python -m {name}" if name else "python -m vlm"


def main(args: list[str] | dict | None = None) -> Any:
    """Run ``VLMCLI`` (LightningCLI). ``args``: a list of strings or a dict (default: ``sys.argv[1:]``)."""
    from vlm.lightning_cli import VLMCLI

    return VLMCLI(
        save_config_kwargs={"overwrite": True},
        seed_everything_default=SEED_EVERYTHING_DEFAULT,
        parser_kwargs={"prog": _prog()},
        args=args,
    )


if __name__ == "__main__":
    main()
