"""Export a training checkpoint as a model folder:
``python -m runners.export --ckpt_path run.ckpt --out dir/``.

The checkpoint is restored as training would resume it (``VLMModule.load_from_checkpoint``: frozen
weights the checkpoint left out are read again from their paths), its LoRA/DoRA adapters are merged,
then:

- an autoregressive Idefics2/Idefics3-architecture model becomes a transformers folder
  (``vlm.hf.to_transformers``): ``model.safetensors``, ``config.json``, ``generation_config.json``
  (stops at eos and ``<end_of_utterance>``) and the ``Idefics2Processor`` / ``Idefics3Processor`` of
  the training data (tokenizer with its special tokens, chat template, image settings), loadable with
  ``AutoModelForImageTextToText.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)``;
- any other model (cross-attention fusion, timm / open_clip towers) is saved in this project's format
  (``VisionLanguageModel.save_pretrained``, reloaded by ``from_pretrained``) with the same processor
  files, and the command says why transformers has no class for it.

The processor comes from the data settings stored in the checkpoint (``VLMDataModule``'s
hyper-parameters); ``--config`` (the training YAML, or the ``config.yaml`` LightningCLI saved beside
the logs) gives them, and the model's, for a checkpoint without them. Writing the folder is
``vlm.hf.save_model_dir`` (pure: no Lightning); this runner adds reading the checkpoint.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from datamodules import VLMDataModule
from lit_modules import VLMModule
from vlm.hf import save_model_dir
from vlm.processing import VLMProcessor

#: How LightningCLI records the class of a module in its hyper-parameters (rebuilt with jsonargparse).
CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def _config_section(config: str | os.PathLike, key: str) -> dict[str, Any]:
    """The ``key`` (``model`` / ``data``) init arguments of a LightningCLI YAML, in the form LightningCLI
    stores hyper-parameters (``_class_path`` and its instantiator)."""
    section = (yaml.safe_load(Path(config).read_text()) or {}).get(key)
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{config} has no {key}: {{class_path: ..., init_args: ...}} section.")
    return {
        "_class_path": section["class_path"],
        "_instantiator": CLI_INSTANTIATOR,
        **section.get("init_args", {}),
    }


def load_checkpoint(
    ckpt_path: str | os.PathLike, config: str | os.PathLike | None = None
) -> tuple[VLMModule, VLMProcessor]:
    """The ``VLMModule`` of a checkpoint (eval mode, on the CPU, adapters not merged) and the processor
    of the data it was trained on. ``config``: a LightningCLI YAML whose ``model`` / ``data`` settings
    replace those the checkpoint stores (needed when it stores no data settings)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {ckpt_path}")
    model_args = {} if config is None else _config_section(config, "model")
    module = VLMModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **model_args)
    if config is not None:
        data = _config_section(config, "data")
        data.pop("_instantiator")
        data.pop("_class_path")
        datamodule = VLMDataModule(**data)
    else:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        if VLMDataModule.CHECKPOINT_HYPER_PARAMS_KEY not in checkpoint:
            raise ValueError(
                f"{ckpt_path} holds no data settings (it was not trained with VLMDataModule, or before they "
                "were saved), so the processor is unknown: pass --config with the training YAML."
            )
        datamodule = VLMDataModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    datamodule.connect(module)  # the model's tokenizer, recipe, fusion and visual tokens per tile
    return module.eval(), datamodule.processor


def export(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None
) -> Literal["transformers", "vlm"]:
    """Write the checkpoint's model, adapters merged, and its processor to ``out``
    (``vlm.hf.save_model_dir``); returns the format written: ``"transformers"`` or this project's
    ``"vlm"``."""
    module, processor = load_checkpoint(ckpt_path, config)
    print(f"{module.merge_adapters()} adapted layers merged.")
    return save_model_dir(module.model, processor, out)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m runners.export --ckpt_path run.ckpt --out dir/ [--config train.yaml]``."""
    parser = argparse.ArgumentParser(prog="python -m runners.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of a VLMModule")
    parser.add_argument("--out", required=True, help="folder to write (created if absent)")
    parser.add_argument("--config", help="training YAML, for a checkpoint without its data settings")
    args = parser.parse_args(argv)
    export(args.ckpt_path, args.out, args.config)


if __name__ == "__main__":
    main()
