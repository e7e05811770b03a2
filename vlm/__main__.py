"""``python -m vlm fit|validate|test|predict ...``: the same entry as ``python -m lightning ...``."""

from vlm.cli import main

if __name__ == "__main__":
    main()
