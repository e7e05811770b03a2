"""Model core of the codebase: vision towers, connectors, language model, fusion and HF interop.

Pure PyTorch + transformers/timm/open_clip: nothing here imports Lightning, so notebooks and
scripts can build a model, process an image and generate without a Trainer.
"""
