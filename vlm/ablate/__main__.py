"""``python -m vlm.ablate``: see ``vlm.ablate``."""

from vlm.ablate.runner import main

main()
