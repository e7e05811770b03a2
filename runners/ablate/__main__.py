"""``python -m runners.ablate``: see ``runners.ablate``."""

from runners.ablate.runner import main

main()
