"""LightningDataModules and dataset readers: shards -> ``Sample`` -> processor -> packed batches."""

from datamodules.sample import Sample

__all__ = ["Sample"]
