"""``python -m runners fit|validate|test|predict ...``, and ``python -m lightning ...``: the installed
``_idefics_lightning_hook`` loads this file as ``lightning.__main__`` (so absolute imports only, and no
classes here: they would live in ``__main__`` and not pickle)."""

from runners.cli import main

if __name__ == "__main__":
    main()
