"""LightningDataModules and dataset readers: shards -> ``Sample`` -> processor -> packed batches;
benchmark prompts (``EvalDataModule``)."""

from datamodules.datamodule import VLMDataModule
from datamodules.evaluation import EvalDataModule
from datamodules.sample import Sample

__all__ = ["EvalDataModule", "Sample", "VLMDataModule"]
