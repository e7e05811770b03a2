"""The top layer: the launcher (``python -m runners`` / ``python -m lightning``) and the research runners
(``runners.ablate``, ``runners.export``, ``runners.chat``, ``runners.lmms_eval``). Imports anything below it:
``callbacks``, ``lit_modules``, ``datamodules``, ``vlm``."""
