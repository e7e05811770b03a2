"""LightningDataModules and dataset readers: shards -> ``Sample`` -> processor -> packed batches."""

from datamodules.datamodule import VLMDataModule
from datamodules.sample import Sample

__all__ = ["Sample", "VLMDataModule"]
