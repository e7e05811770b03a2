"""LightningDataModules and dataset readers (one reader per shard format) that feed `VisionLanguageModel`."""
