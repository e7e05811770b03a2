"""LightningModules that wrap `vlm.model.VisionLanguageModel` for training, fine-tuning and evaluation."""

from lit_modules.policy import TrainingPolicy
from lit_modules.vlm_module import VLMModule

__all__ = ["TrainingPolicy", "VLMModule"]
