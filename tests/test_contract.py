"""The model-data contract (``vlm.processing.contract``): the visual tokens per tile are derived from the
model config and equal what the model makes; the DataModule takes the model's tokenizer, recipe, fusion
and ``image_seq_len``; a data-side value that differs stops with both keys named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from datamodules import VLMDataModule
from lit_modules import VLMModule
from vlm.config import ConnectorConfig, get_preset
from vlm.connectors import visual_tokens_per_tile
from vlm.model import VisionLanguageModel
from vlm.processing import build_processor

CONNECTORS = {
    "mlp": ConnectorConfig(type="mlp"),
    "linear": ConnectorConfig(type="linear"),
    "perceiver": get_preset("idefics2-tiny").connector,
    "pixel_shuffle": ConnectorConfig(type="pixel_shuffle", scale_factor=2),
    "mapping_network": ConnectorConfig(
        type="mapping_network", num_latents=5, depth=1, mapping_hidden_size=32
    ),
}


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
@pytest.mark.parametrize("connector", sorted(CONNECTORS))
@pytest.mark.parametrize("tile", [None, (16, 32)])
def test_derived_tokens_per_tile_are_the_tokens_the_built_model_makes(connector, fusion, tile):
    config = dataclasses.replace(get_preset("idefics2-tiny"), connector=CONNECTORS[connector], fusion=fusion)
    model = VisionLanguageModel(config).eval()
    height, width = tile or (config.vision.image_size,) * 2
    with torch.no_grad():
        made = model.encode_images(torch.randn(2, 3, height, width)).shape[1]
    assert visual_tokens_per_tile(config, tile) == made


@pytest.mark.parametrize(
    ("preset", "tokens"),
    [
        ("idefics2", 64),  # Idefics2 §3.3: a perceiver resampler of 64 latents
        ("idefics3", 169),  # Idefics3: 364 px tiles of 14 px patches (26 x 26), pixel shuffle 2 -> 13 x 13
    ],
)
def test_real_scale_presets_on_the_meta_device(preset, tokens):
    config = get_preset(preset)
    assert visual_tokens_per_tile(config) == tokens
    grid = (config.vision.image_size // config.vision.patch_size,) * 2
    with torch.device("meta"):
        model = VisionLanguageModel(
            dataclasses.replace(config, language=get_preset(f"{preset}-tiny").language)
        )
        features = torch.empty(1, grid[0] * grid[1], config.vision.hidden_size)
    assert model.connector(features, grid).shape[1] == tokens


def test_the_datamodule_takes_the_models_settings():
    module = VLMModule("idefics3-tiny", fusion="cross_attention")
    data = VLMDataModule([], image_processor={"tile_size": 32})
    data.connect(module)
    processor = data.processor
    assert (processor.recipe, processor.image_seq_len, processor.fusion) == ("idefics3", 4, "cross_attention")
    assert data.hparams["image_seq_len"] == 4 and data.hparams["recipe"] == "idefics3"  # kept in checkpoints
    # The tile size is the data's: 64 px tiles of 8 px patches, pixel shuffle 2 -> 16 tokens.
    data = VLMDataModule([], image_processor={"tile_size": 64})
    data.connect(module)
    assert data.processor.image_seq_len == 16
    # idefics2 recipe: the model's image_shape (or its tower's image_size square).
    mlp = dataclasses.replace(get_preset("idefics2-tiny"), connector=ConnectorConfig(type="mlp"))
    demo = VLMModule(mlp, image_shape=(32, 48))
    data = VLMDataModule([])
    data.connect(demo)
    assert (data.processor.recipe, data.processor.image_seq_len) == ("idefics2", 24)


def test_a_model_config_alone_fixes_no_recipe_the_datas_is_used():
    module = VLMModule(get_preset("idefics3-tiny"))  # a VLMConfig, no recipe: the data's
    data = VLMDataModule([], recipe="idefics3", image_processor={"tile_size": 64})
    data.connect(module)
    assert (data.processor.recipe, data.processor.image_seq_len) == ("idefics3", 16)
    data = VLMDataModule([])  # neither says: idefics2, per image of the tower's image_size (32 px)
    data.connect(module)
    assert (data.processor.recipe, data.processor.image_seq_len) == ("idefics2", 4)
    with pytest.raises(
        ValueError, match=r"data\.init_args\.recipe='idefics3' but the model has model\.init_args"
    ):
        VLMDataModule([], recipe="idefics3").connect(
            VLMModule(get_preset("idefics3-tiny"), recipe="idefics2")
        )


def test_without_a_model_unset_keys_are_the_default_models():
    data = VLMDataModule([], recipe="idefics3")
    assert data.processor.recipe == "idefics3"
    assert data.processor.image_seq_len == VLMModule().processor_settings().image_seq_len == 8


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"image_seq_len": 64},
            r"data\.init_args\.image_seq_len=64 but the model \(connector 'pixel_shuffle', 8 px patches, "
            r"32x32 px tiles\) makes 4 visual tokens per tile",
        ),
        (
            {"tokenizer": "other"},
            r"data\.init_args\.tokenizer='other' but the model has model\.init_args\.tokenizer",
        ),
        (
            {"recipe": "idefics2"},
            r"data\.init_args\.recipe='idefics2' but the model has model\.init_args\.recipe",
        ),
    ],
)
def test_a_mismatch_names_both_keys(given, message):
    data = VLMDataModule([], image_processor={"tile_size": 32}, **given)
    with pytest.raises(ValueError, match=message):
        data.connect(VLMModule("idefics3-tiny"))


def test_same_values_given_on_both_sides_are_accepted():
    data = VLMDataModule([], tokenizer="tiny", recipe="idefics2", image_seq_len=8, fusion="autoregressive")
    data.connect(VLMModule())
    assert data.processor.image_seq_len == 8


def test_build_processor_takes_names_and_options():
    processor = build_processor("tiny", {"recipe": "idefics3", "tile_size": 32}, 4, fusion="cross_attention")
    assert (processor.recipe, processor.image_processor.tile_size, processor.fusion) == (
        "idefics3",
        32,
        "cross_attention",
    )
