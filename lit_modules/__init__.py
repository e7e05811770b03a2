"""LightningModules that wrap `vlm.model.VisionLanguageModel` for training, fine-tuning and evaluation."""
