"""Bad input gets an error that says what is wrong and what to change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm.config import LanguageConfig, VisionConfig, get_preset
from vlm.model import VisionLanguageModel
from vlm.vision import build_vision_tower


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(get_preset("idefics2-tiny")).eval()


def test_image_size_not_a_multiple_of_the_patch_size(model):
    with pytest.raises(ValueError, match="patch"):
        model.encode_images(torch.randn(1, 1, 3, 30, 32))


def test_image_token_count_mismatch(model):
    per_image = model.config.connector.num_latents
    input_ids = torch.tensor([[5] + [model.image_token_id] * (per_image - 1) + [6]])
    with pytest.raises(ValueError, match=rf"1 x {per_image} = {per_image}"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 32, 32))


def test_image_tokens_without_images(model):
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=torch.tensor([[5, model.image_token_id, 6]]))


def test_unknown_vision_backend_lists_choices():
    with pytest.raises(ValueError, match="open_clip"):
        build_vision_tower(VisionConfig(backend="clip-from-mars"))


def test_unknown_fusion_and_language_model_type():
    config = get_preset("idefics2-tiny")
    with pytest.raises(ValueError, match="cross_attention"):
        VisionLanguageModel(dataclasses.replace(config, fusion="late"))
    with pytest.raises(ValueError, match=r"language\.model_type"):
        VisionLanguageModel(dataclasses.replace(config, language=LanguageConfig(model_type="not-a-model")))


def test_generate_needs_left_padding(model):
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(input_ids=torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
