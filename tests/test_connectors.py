"""Connectors: shapes, padding invariance, and pixel-shuffle order equal to transformers' Idefics3."""

from __future__ import annotations

import pytest
import torch
from transformers import Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from vlm.config import ConnectorConfig
from vlm.connectors import build_connector, pixel_shuffle

VISION_DIM, TEXT_DIM = 16, 24


def make(type_: str, **kw):
    cfg = ConnectorConfig(
        type=type_,
        num_latents=5,
        depth=2,
        num_heads=2,
        head_dim=8,
        num_key_value_heads=1,
        mapping_hidden_size=32,
        **kw,
    )
    torch.manual_seed(0)
    return build_connector(cfg, VISION_DIM, TEXT_DIM, text_intermediate=48).eval()


@pytest.mark.parametrize(
    ("type_", "tokens"),
    [("linear", 24), ("mlp", 24), ("perceiver", 5), ("mapping_network", 5), ("pixel_shuffle", 6)],
)
def test_output_shapes(type_, tokens):
    features = torch.randn(3, 24, VISION_DIM)
    assert make(type_)(features, (4, 6)).shape == (3, tokens, TEXT_DIM)


@pytest.mark.parametrize("type_", ["perceiver", "mapping_network"])
def test_pooling_connectors_ignore_padded_patches(type_):
    connector = make(type_)
    features = torch.randn(2, 24, VISION_DIM)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[:, 12:] = False
    changed = features.clone()
    changed[:, 12:] = torch.randn(2, 12, VISION_DIM) * 10
    torch.testing.assert_close(connector(features, (4, 6), mask), connector(changed, (4, 6), mask))
    assert not torch.allclose(connector(features, (4, 6)), connector(changed, (4, 6)))


def test_pixel_shuffle_matches_transformers_order():
    config = Idefics3Config(
        vision_config=dict(hidden_size=VISION_DIM),
        text_config=dict(hidden_size=TEXT_DIM, num_attention_heads=4),
    )
    reference = Idefics3Connector(config)
    features = torch.randn(2, 36, VISION_DIM)
    assert torch.equal(pixel_shuffle(features, (6, 6), 2), reference.pixel_shuffle(features, 2))


def test_pixel_shuffle_non_square_keeps_spatial_neighbours():
    grid = torch.arange(4 * 6).float().view(1, 24, 1)  # patch index as feature
    out = pixel_shuffle(grid, (4, 6), 2)
    assert out.shape == (1, 6, 4)
    # token (0, 1) of the 2x3 output gathers patches at rows 0-1, columns 2-3 of the 4x6 grid
    assert sorted(out[0, 1].tolist()) == [2, 3, 8, 9]


def test_pixel_shuffle_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="scale_factor=2"):
        pixel_shuffle(torch.randn(1, 15, 4), (3, 5), 2)


def test_unknown_connector_type_lists_choices():
    with pytest.raises(ValueError, match="pixel_shuffle"):
        make("qformer")
