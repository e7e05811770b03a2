"""Processing: images to tiles and pixel tensors, text to token ids with expanded image tokens.

``VLMProcessor`` gives what transformers' Idefics2/Idefics3 processors give for the same settings
(``VLMProcessor.from_transformers(processor)``), faster, plus training-time options (image-token
budget, no upscaling of small images, split fraction, random up-scaling) and SFT labels.
"""

from vlm.processing.contract import ProcessorSettings
from vlm.processing.image import ImageLayout, ImageProcessor, ProcessedImages, load_image, to_rgb
from vlm.processing.processor import VLMProcessor, build_processor
from vlm.processing.text import apply_chat_template, build_labels, expand_image_tokens
from vlm.processing.tokenizer import load_tiny_tokenizer

__all__ = [
    "ImageLayout",
    "ImageProcessor",
    "ProcessedImages",
    "ProcessorSettings",
    "VLMProcessor",
    "apply_chat_template",
    "build_labels",
    "build_processor",
    "expand_image_tokens",
    "load_image",
    "load_tiny_tokenizer",
    "to_rgb",
]
