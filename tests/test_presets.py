"""Full-scale presets build on the meta device with exactly the released architectures' parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
)

from vlm.config import get_preset
from vlm.model import VisionLanguageModel

# Mistral-7B and Llama-3.1-8B share these shapes; they differ in vocabulary (and RoPE settings).
LM_8B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14
)


def idefics2_8b_config() -> Idefics2Config:
    """HuggingFaceM4/idefics2-8b: SigLIP-SO400M at 980, Mistral-7B (+3 special tokens), perceiver 3 x 64."""
    text = dict(model_type="mistral", vocab_size=32003, **LM_8B_SHAPE)
    perceiver = dict(
        hidden_size=4096,
        resampler_n_latents=64,
        resampler_depth=3,
        resampler_n_heads=16,
        resampler_head_dim=96,
        num_key_value_heads=4,
    )
    return Idefics2Config(
        text_config=text, vision_config=dict(image_size=980, **SIGLIP_SO400M), perceiver_config=perceiver
    )


def idefics3_8b_config() -> Idefics3Config:
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP-SO400M on 364 tiles, Llama-3.1-8B (+3 tokens), shuffle 2."""
    text = dict(model_type="llama", vocab_size=128259, **LM_8B_SHAPE)
    return Idefics3Config(
        text_config=text, vision_config=dict(image_size=364, **SIGLIP_SO400M), scale_factor=2
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("preset", "hf_cls", "hf_config", "image_token_id"),
    [
        ("idefics2", Idefics2ForConditionalGeneration, idefics2_8b_config, 32001),
        ("idefics3", Idefics3ForConditionalGeneration, idefics3_8b_config, 128257),
    ],
)
def test_full_scale_preset_matches_transformers_on_meta(preset, hf_cls, hf_config, image_token_id):
    with torch.device("meta"):
        ours = VisionLanguageModel(get_preset(preset))
        ref = hf_cls(hf_config())
    assert n_params(ours) == n_params(ref)
    assert n_params(ours) > 8e9
    assert ours.image_token_id == image_token_id == ref.config.image_token_id
    for part, hf_part in [("vision_tower", ref.model.vision_model), ("connector", ref.model.connector)]:
        assert n_params(getattr(ours, part)) == n_params(hf_part), part


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
@pytest.mark.parametrize("preset", ["idefics2-tiny", "idefics3-tiny"])
def test_tiny_presets_build_and_run_with_either_fusion(preset, fusion):
    model = VisionLanguageModel(dataclasses.replace(get_preset(preset), fusion=fusion)).eval()
    image = torch.randn(1, 1, 3, 32, 48)
    n_tokens = model.encode_images(image).shape[1] if fusion == "autoregressive" else 1
    input_ids = torch.tensor([[5] + [model.image_token_id] * n_tokens + [6, 7]])
    out = model(input_ids=input_ids, pixel_values=image, labels=input_ids)
    assert out.logits.shape == (1, input_ids.shape[1], model.language_model.config.vocab_size)
    assert torch.isfinite(out.loss)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(KeyError, match="idefics2-tiny"):
        get_preset("idefics5")
