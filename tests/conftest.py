"""Shared pytest setup. The environment is set before anything imports huggingface_hub/transformers."""

import os

# Tests never touch the network: with these, an accidental hub call fails in seconds instead of
# retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
