"""Interop with transformers' Idefics2/Idefics3: released checkpoints in, trained models back out.

``from_transformers`` translates the config and maps the state dict of an
``Idefics2ForConditionalGeneration`` / ``Idefics3ForConditionalGeneration`` (Idefics2, Idefics3,
SmolVLM weights) into a ``VisionLanguageModel``; ``to_transformers`` does the reverse. Only the
module prefixes differ, so the mapping is a prefix swap in both directions.
``processor_to_transformers`` gives the ``Idefics2Processor`` / ``Idefics3Processor`` of a
``VLMProcessor`` (``VLMProcessor.from_transformers`` is the reverse). ``save_model_dir`` writes a model and
its processor as a folder (transformers' format where it has the architecture, else this project's);
``load_model_dir`` reads either back.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
)
from transformers.initialization import no_init_weights
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from vlm.config import ConnectorConfig, VisionConfig, VLMConfig
from vlm.generation import stop_token_ids
from vlm.language_model import language_config_of, text_dims
from vlm.model import CONFIG_FILE, VisionLanguageModel
from vlm.processing import ImageProcessor, VLMProcessor
from vlm.processing.text import IDEFICS_CHAT_TEMPLATE
from vlm.vision import siglip_config_kwargs

HFIdefics = Idefics2ForConditionalGeneration | Idefics3ForConditionalGeneration

# (ours, transformers) module prefixes.
PREFIXES = (
    ("vision_tower.vit.", "model.vision_model."),
    ("connector.", "model.connector."),
    ("language_model.model.", "model.text_model."),
    ("language_model.lm_head.", "lm_head."),
)


def _rename(key: str, source: int) -> str:
    for pair in PREFIXES:
        if key.startswith(pair[source]):
            return pair[1 - source] + key[len(pair[source]) :]
    raise KeyError(f"No mapping for parameter {key!r}; known prefixes: {[p[source] for p in PREFIXES]}.")


def state_dict_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a VisionLanguageModel state dict to transformers' Idefics2/Idefics3 keys."""
    return {_rename(k, 0): v for k, v in state_dict.items()}


def state_dict_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers Idefics2/Idefics3 state dict to VisionLanguageModel keys."""
    return {_rename(k, 1): v for k, v in state_dict.items()}


def _vision_config(hf_vision, patch_mask_rule: str) -> VisionConfig:
    return VisionConfig(
        backend="siglip",
        image_size=hf_vision.image_size,
        patch_size=hf_vision.patch_size,
        hidden_size=hf_vision.hidden_size,
        num_layers=hf_vision.num_hidden_layers,
        num_heads=hf_vision.num_attention_heads,
        intermediate_size=hf_vision.intermediate_size,
        hidden_act=hf_vision.hidden_act,
        layer_norm_eps=hf_vision.layer_norm_eps,
        position_embedding="bucketed",
        patch_mask_rule=patch_mask_rule,
    )


def config_from_transformers(hf_config: Idefics2Config | Idefics3Config) -> VLMConfig:
    """Translate a transformers Idefics2Config / Idefics3Config into a VLMConfig."""
    text = hf_config.text_config
    if isinstance(hf_config, Idefics2Config):
        perceiver = hf_config.perceiver_config
        connector = ConnectorConfig(
            type="perceiver",
            mlp_before=True,
            mlp_intermediate_size=text.intermediate_size,
            mlp_act=text.hidden_act,
            num_latents=perceiver.resampler_n_latents,
            depth=perceiver.resampler_depth,
            num_heads=perceiver.resampler_n_heads,
            head_dim=perceiver.resampler_head_dim,
            num_key_value_heads=perceiver.num_key_value_heads,
            perceiver_act=perceiver.hidden_act,
            rms_norm_eps=perceiver.rms_norm_eps,
        )
        vision = _vision_config(hf_config.vision_config, "all")
    elif isinstance(hf_config, Idefics3Config):
        connector = ConnectorConfig(type="pixel_shuffle", scale_factor=hf_config.scale_factor)
        vision = _vision_config(hf_config.vision_config, "any")
    else:
        raise TypeError(f"Expected an Idefics2Config or Idefics3Config, got {type(hf_config).__name__}.")
    return VLMConfig(
        vision=vision,
        connector=connector,
        language=language_config_of(text),
        fusion="autoregressive",
        image_token_id=hf_config.image_token_id,
    )


def from_transformers(hf_model: HFIdefics) -> VisionLanguageModel:
    """Build a VisionLanguageModel holding the weights of a transformers Idefics2/Idefics3 model."""
    if not isinstance(hf_model, Idefics2ForConditionalGeneration | Idefics3ForConditionalGeneration):
        raise TypeError(
            "from_transformers expects Idefics2ForConditionalGeneration or "
            f"Idefics3ForConditionalGeneration, got {type(hf_model).__name__}; "
            "load it with AutoModelForImageTextToText.from_pretrained(path)."
        )
    config = config_from_transformers(hf_model.config)
    config.language.attn_implementation = hf_model.config.text_config._attn_implementation or "sdpa"
    with no_init_weights():
        model = VisionLanguageModel(config)
    model.load_state_dict(state_dict_from_transformers(hf_model.state_dict()), strict=True)
    return model.to(dtype=hf_model.dtype, device=hf_model.device)


def config_to_transformers(model: VisionLanguageModel) -> Idefics2Config | Idefics3Config:
    """Translate a model's configuration to transformers, or explain why it has no Idefics equivalent."""
    cfg = model.config
    text_config = model.language_model.config.to_dict()
    dims = text_dims(model.language_model.config)
    if (
        cfg.fusion != "autoregressive"
        or cfg.vision.backend != "siglip"
        or cfg.vision.position_embedding != "bucketed"
    ):
        raise ValueError(
            "Only autoregressive fusion with the 'siglip' vision backend and bucketed positions exists in "
            f"transformers' Idefics2/Idefics3 (got fusion={cfg.fusion!r}, "
            f"vision.backend={cfg.vision.backend!r}, "
            f"vision.position_embedding={cfg.vision.position_embedding!r}); save the state dict instead."
        )
    vision = cfg.vision
    vision_config = siglip_config_kwargs(vision)
    conn = cfg.connector
    idefics2_like = (
        conn.type == "perceiver"
        and conn.mlp_before
        and (conn.mlp_intermediate_size or dims.intermediate_size) == dims.intermediate_size
        and conn.mlp_act == text_config.get("hidden_act")
        and vision.patch_mask_rule == "all"
    )
    if idefics2_like:
        perceiver_config = dict(
            hidden_size=dims.hidden_size,
            hidden_act=conn.perceiver_act,
            resampler_n_latents=conn.num_latents,
            resampler_depth=conn.depth,
            resampler_n_heads=conn.num_heads,
            resampler_head_dim=conn.head_dim,
            num_key_value_heads=conn.num_key_value_heads,
            rms_norm_eps=conn.rms_norm_eps,
        )
        return Idefics2Config(
            vision_config=vision_config,
            perceiver_config=perceiver_config,
            text_config=text_config,
            image_token_id=model.image_token_id,
        )
    if conn.type == "pixel_shuffle" and vision.patch_mask_rule == "any":
        return Idefics3Config(
            vision_config=vision_config,
            text_config=text_config,
            scale_factor=conn.scale_factor,
            image_token_id=model.image_token_id,
        )
    raise ValueError(
        "transformers has Idefics2 (perceiver connector with gated MLP of the LM's width/activation, "
        "patch_mask_rule 'all') and Idefics3 (pixel_shuffle connector, patch_mask_rule 'any'); "
        f"connector.type={conn.type!r} with patch_mask_rule={vision.patch_mask_rule!r} matches neither."
    )


def to_transformers(model: VisionLanguageModel) -> HFIdefics:
    """Export to transformers' Idefics2/Idefics3ForConditionalGeneration (e.g. to push a trained model)."""
    hf_config = config_to_transformers(model)
    cls = (
        Idefics2ForConditionalGeneration
        if isinstance(hf_config, Idefics2Config)
        else Idefics3ForConditionalGeneration
    )
    with no_init_weights():
        hf_model = cls(hf_config)
    hf_model.load_state_dict(state_dict_to_transformers(model.state_dict()), strict=True)
    param = next(model.parameters())
    return hf_model.to(dtype=param.dtype, device=param.device)


#: ``ImageProcessor`` settings transformers' image processors lack, with their neutral values: an
#: exported processor cannot apply them (the training-time ones are off at inference anyway).
TRAINING_ONLY_IMAGE_SETTINGS = {
    "upscale_small_images": True,
    "max_tiles_per_sample": None,
    "split_fraction": None,
    "random_upscale": None,
}


def image_processor_to_transformers(
    image_processor: ImageProcessor,
) -> Idefics2ImageProcessorPil | Idefics3ImageProcessorPil:
    """The transformers (PIL) image processor of the same recipe and settings (see
    ``TRAINING_ONLY_IMAGE_SETTINGS`` for those it cannot hold)."""
    ip = image_processor
    common = dict(
        do_convert_rgb=ip.do_convert_rgb,
        do_resize=True,
        resample=ip.resample,
        do_rescale=True,
        rescale_factor=ip.rescale_factor,
        do_normalize=True,
        image_mean=list(ip.image_mean),
        image_std=list(ip.image_std),
        do_pad=True,
        do_image_splitting=ip.do_image_splitting,
    )
    if ip.recipe == "idefics2":
        size = {"shortest_edge": ip.shortest_edge, "longest_edge": ip.longest_edge}
        return Idefics2ImageProcessorPil(size=size, **common)
    return Idefics3ImageProcessorPil(
        size={"longest_edge": ip.longest_edge}, max_image_size={"longest_edge": ip.tile_size}, **common
    )


def processor_to_transformers(processor: VLMProcessor) -> Idefics2Processor | Idefics3Processor:
    """The transformers ``Idefics2Processor`` / ``Idefics3Processor`` of ``processor``'s recipe: a copy of
    its tokenizer (special tokens included), its image settings, image sequence length and the Idefics
    chat template (as released with the models). Autoregressive fusion only: transformers expands every
    ``<image>``, where cross-attention keeps one marker per image."""
    cls = Idefics2Processor if processor.recipe == "idefics2" else Idefics3Processor
    return cls(
        image_processor_to_transformers(processor.image_processor),
        copy.deepcopy(processor.tokenizer),
        image_seq_len=processor.image_seq_len,
        chat_template=IDEFICS_CHAT_TEMPLATE,
    )


def save_model_dir(
    model: VisionLanguageModel, processor: VLMProcessor, out: str | os.PathLike
) -> Literal["transformers", "vlm"]:
    """Write ``model`` and ``processor`` to the folder ``out``; returns the format written.

    ``"transformers"``: an Idefics2/Idefics3 folder (``to_transformers`` + ``processor_to_transformers``, a
    generation config stopping at eos and ``<end_of_utterance>``) for ``AutoModelForImageTextToText`` /
    ``AutoProcessor``. ``"vlm"``, where ``config_to_transformers`` explains that transformers has no such
    model: ``VisionLanguageModel.save_pretrained`` with the same processor files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lost = {
        name: getattr(processor.image_processor, name)
        for name, neutral in TRAINING_ONLY_IMAGE_SETTINGS.items()
        if getattr(processor.image_processor, name) != neutral
    }
    if lost:
        print(f"Note: transformers' image processors have no {lost}; the exported processor goes without.")
    processor_to_transformers(processor).save_pretrained(out)
    try:
        hf_model = to_transformers(model)
    except ValueError as reason:
        model.save_pretrained(out)
        print(
            f"No transformers folder: {reason}\nSaved in this project's format instead to {out}: "
            "load it with vlm.model.VisionLanguageModel.from_pretrained."
        )
        return "vlm"
    tokenizer = processor.tokenizer
    hf_model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    hf_model.save_pretrained(out)
    print(
        f"Saved {type(hf_model).__name__} and its processor to {out}: load them with "
        "AutoModelForImageTextToText.from_pretrained and AutoProcessor.from_pretrained."
    )
    return "transformers"


def load_model_dir(model_dir: str | os.PathLike) -> tuple[VisionLanguageModel, VLMProcessor]:
    """The model (eval mode) and processor of a folder written by ``save_model_dir`` (either format)."""
    folder = Path(model_dir)
    processor = VLMProcessor.from_transformers(AutoProcessor.from_pretrained(folder))
    if (folder / CONFIG_FILE).is_file():
        model = VisionLanguageModel.from_pretrained(folder)
        processor.fusion = model.config.fusion
    else:
        model = from_transformers(AutoModelForImageTextToText.from_pretrained(folder))
    return model.eval(), processor
