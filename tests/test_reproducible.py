"""Reproducible data: the same shards give the same training batches wherever they are stored.

Sample keys seed each sample's random choices (turn order, image splitting), so they must name the
data relative to its root, never by the folder it sits in.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from recipe_configs import load

from datamodules import VLMDataModule
from datamodules.sources import iter_samples, shard_names
from datamodules.synthetic import write_shards


def sft_twin_data(data_root: Path) -> VLMDataModule:
    """The data of the Idefics2 SFT twin (turn shuffling, image splitting on half of the samples),
    its synthetic shards written under ``data_root`` (an absolute path, as a user would give)."""
    args = load("idefics2_sft", tiny=True)["data"]["init_args"]
    relative = args["data_root"]
    args["data_root"] = str(data_root)
    for source in args["sources"]:
        source["urls"] = source["urls"].replace(relative, str(data_root))
    data = VLMDataModule(**args)
    data.prepare_data()
    return data


def test_the_same_shards_in_two_folders_give_the_same_training_batches(tmp_path):
    here = sft_twin_data(tmp_path / "a")
    there = sft_twin_data(tmp_path / "another" / "deeper" / "folder")
    for step, (ours, theirs) in enumerate(
        zip(islice(here.train_dataloader(), 6), islice(there.train_dataloader(), 6), strict=True)
    ):
        assert ours.keys() == theirs.keys(), step
        for key, value in ours.items():
            equal = torch.equal if isinstance(value, torch.Tensor) else lambda a, b: a == b
            assert equal(value, theirs[key]), (step, key)


def test_sample_keys_name_shards_relative_to_their_root(tmp_path):
    keys = []
    for folder in (tmp_path / "x", tmp_path / "y" / "z"):
        write_shards("cauldron", folder, 24, seed=0)
        keys.append([sample.key for sample in iter_samples("cauldron", f"{folder}/*/train-*.parquet")])
    assert keys[0] == keys[1] and len(set(keys[0])) == len(keys[0]) > 1
    assert not any(str(tmp_path) in key for key in keys[0])


def test_shard_names_are_relative_and_unique():
    assert shard_names(["/data/web/0.tar", "/data/web/1.tar"]) == ["0.tar", "1.tar"]
    assert shard_names(["/data/web/a/0.tar", "/data/web/b/0.tar"]) == ["a/0.tar", "b/0.tar"]
    assert shard_names(["/mnt/disk/data/0.tar"]) == ["0.tar"]
    remote = ["http://host/dir/shard-0.tar", "http://host/dir/sub/shard-1.tar"]
    assert shard_names(remote) == ["shard-0.tar", "sub/shard-1.tar"]
    assert shard_names(["s3://bucket/a/0.tar", "s3://bucket/b/0.tar"]) == ["a/0.tar", "b/0.tar"]
