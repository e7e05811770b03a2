"""Shared pytest setup. The environment is set before anything imports huggingface_hub/transformers."""

import os

# Tests never touch the network: with these, an accidental hub call fails in seconds instead of
# retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

#: Environment variables that tests or the code they run set (``DATA_ROOT`` for the data configs,
#: ``PL_GLOBAL_SEED`` by Lightning's ``seed_everything``).
RESTORED_ENV = ("DATA_ROOT", "PL_GLOBAL_SEED")


@pytest.fixture(autouse=True)
def restore_global_state():
    """Give every test the torch thread count and the ``RESTORED_ENV`` variables it started with,
    whatever it (or a training run it starts, e.g. the ``TorchThreads`` callback) changed, so no
    test depends on which tests ran before it."""
    threads = torch.get_num_threads()
    saved = {name: os.environ.get(name) for name in RESTORED_ENV}
    yield
    torch.set_num_threads(threads)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
