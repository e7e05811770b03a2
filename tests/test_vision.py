"""Vision towers: parity with transformers' Idefics2/Idefics3 towers, timm and open_clip, padding, errors."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionTransformer
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionConfig, Idefics3VisionTransformer

from vlm.config import VisionConfig
from vlm.vision import (
    OpenClipVisionTower,
    SiglipVisionTower,
    TimmVisionTower,
    VisionTower,
    build_vision_tower,
    patch_attention_mask_from_pixels,
    siglip_to_timm_state_dict,
)

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
# The same sizes under transformers' names, for Idefics2VisionConfig / Idefics3VisionConfig.
HF_TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)
SIGLIP = VisionConfig(backend="siglip", **TINY)
TIMM_SIGLIP = VisionConfig(backend="timm", model_name="vit_so400m_patch14_siglip_384", **TINY)
OPEN_CLIP_VIT = "vlm-test-tiny-vit"  # open_clip's own ViT (class token), registered below
OPEN_CLIP_TIMM = "vlm-test-tiny-timm-map"  # timm trunk with a register token and a MAP head, like SigLIP
OPEN_CLIP_VIT_CFG = VisionConfig(backend="open_clip", model_name=OPEN_CLIP_VIT)
OPEN_CLIP_TIMM_CFG = VisionConfig(backend="open_clip", model_name=OPEN_CLIP_TIMM)
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_models(tmp_path_factory):
    """Registers two tiny open_clip architectures so open_clip towers build in milliseconds."""
    text_cfg = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    configs = {
        OPEN_CLIP_VIT: {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        OPEN_CLIP_TIMM: {"timm_model_name": "test_vit3", "timm_pool": "map", "timm_proj": "none"},
    }
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, vision_cfg in configs.items():
        (folder / f"{name}.json").write_text(
            json.dumps({"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": text_cfg})
        )
    open_clip.add_model_config(folder)


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Perturbs every weight (layer norms included) so a misplaced one cannot go unnoticed."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return module.eval()


def _tower(cfg: VisionConfig, **changes) -> VisionTower:
    torch.manual_seed(0)
    return _randomize(build_vision_tower(dataclasses.replace(cfg, **changes)))


def _padded_batch(sizes: list[tuple[int, int]], canvas: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the given sizes, zero-padded bottom-right to ``canvas`` (as the processors do)."""
    pixels = torch.zeros(len(sizes), 3, *canvas)
    pixel_mask = torch.zeros(len(sizes), *canvas, dtype=torch.long)
    for i, (height, width) in enumerate(sizes):
        pixels[i, :, :height, :width] = torch.randn(3, height, width)
        pixel_mask[i, :height, :width] = 1
    return pixels, pixel_mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_patch_mask_rules():
    pixel_mask = torch.zeros(1, 8, 12, dtype=torch.long)
    pixel_mask[0, :6, :9] = 1
    all_real = patch_attention_mask_from_pixels(pixel_mask, 4, "all")
    any_real = patch_attention_mask_from_pixels(pixel_mask, 4, "any")
    assert all_real.dtype == torch.bool and all_real.shape == (1, 2, 3)
    assert all_real[0].tolist() == [[True, True, False], [False, False, False]]
    assert any_real[0].tolist() == [[True, True, True], [True, True, True]]


@pytest.mark.parametrize("reference_cls", [Idefics2VisionTransformer, Idefics3VisionTransformer])
def test_siglip_state_dict_keys_are_the_idefics_ones(reference_cls):
    tower = _tower(SIGLIP)
    config_cls = Idefics2VisionConfig if reference_cls is Idefics2VisionTransformer else Idefics3VisionConfig
    reference = reference_cls(config_cls(**HF_TINY))
    reference.load_state_dict(tower.vit.state_dict(), strict=True)
    tower.vit.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize(
    ("reference_cls", "config_cls", "rule"),
    [
        (Idefics2VisionTransformer, Idefics2VisionConfig, "all"),
        (Idefics3VisionTransformer, Idefics3VisionConfig, "any"),
    ],
)
def test_siglip_tower_matches_idefics_on_padded_batch(reference_cls, config_cls, rule):
    tower = _tower(SIGLIP)
    assert isinstance(tower, SiglipVisionTower)
    reference = reference_cls(config_cls(**HF_TINY)).eval()
    reference.load_state_dict(tower.vit.state_dict())
    # Sizes that are not multiples of the patch: the two rules disagree on the edge patches.
    pixels, pixel_mask = _padded_batch([(48, 80), (37, 50), (20, 67)], canvas=(48, 80))
    patch_mask = patch_attention_mask_from_pixels(pixel_mask, 8, rule)
    with torch.no_grad():
        ours = tower(pixels, patch_mask)
        theirs = reference(pixels, patch_attention_mask=patch_mask).last_hidden_state
    assert ours.shape == (3, 6 * 10, 32)
    assert _max_diff(ours, theirs) <= ATOL


def test_timm_siglip_with_transformers_weights_matches_transformers():
    """Acceptance: a timm SigLIP tower loaded with transformers weights gives transformers' features."""
    torch.manual_seed(0)
    reference = _randomize(Idefics2VisionTransformer(Idefics2VisionConfig(**HF_TINY)))
    tower = build_vision_tower(TIMM_SIGLIP).eval()
    assert isinstance(tower, TimmVisionTower) and tower.vit.attn_pool is None
    tower.vit.load_state_dict(siglip_to_timm_state_dict(reference.state_dict()), strict=True)

    pixels = torch.randn(2, 3, 48, 80)
    pixels_padded, pixel_mask = _padded_batch([(48, 80), (32, 56)], canvas=(48, 80))
    patch_mask = patch_attention_mask_from_pixels(pixel_mask, 8, "all")
    with torch.no_grad():
        assert _max_diff(tower(pixels), reference(pixels).last_hidden_state) <= ATOL
        ours = tower(pixels_padded, patch_mask)
        theirs = reference(pixels_padded, patch_attention_mask=patch_mask).last_hidden_state
    real = patch_mask.flatten(1)
    assert _max_diff(ours[real], theirs[real]) <= ATOL


@pytest.mark.parametrize("model_name", ["vit_so400m_patch14_siglip_384", "test_vit", "test_vit2"])
def test_timm_interpolated_matches_timm_dynamic_img_size(model_name):
    """No prefix token, a class token, a register token: all as timm's own forward on a non-square image."""
    tower = _tower(TIMM_SIGLIP, model_name=model_name, position_embedding="interpolated")
    pixels = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ours = tower(pixels)
        theirs = tower.vit.forward_features(pixels)[:, tower.vit.num_prefix_tokens :]
    assert ours.shape == (2, 60, 32)
    assert _max_diff(ours, theirs) <= ATOL


def test_open_clip_vit_b32_native_size_matches_output_tokens():
    cfg = VisionConfig(backend="open_clip", model_name="ViT-B-32", position_embedding="interpolated")
    tower = _tower(cfg)
    assert isinstance(tower, OpenClipVisionTower) and (tower.hidden_size, tower.patch_size) == (768, 32)
    reference = open_clip.create_model("ViT-B-32").visual.eval()
    missing, unexpected = reference.load_state_dict(tower.vit.state_dict(), strict=False)
    assert missing == ["proj"] and unexpected == []
    reference.output_tokens = True
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff(tower(pixels), reference(pixels)[1]) <= ATOL


def test_open_clip_interpolated_matches_timm_resampled_positions():
    tower = _tower(OPEN_CLIP_VIT_CFG, position_embedding="interpolated")
    reference = open_clip.create_model(OPEN_CLIP_VIT).visual.eval()
    reference.load_state_dict(tower.vit.state_dict(), strict=False)
    reference.output_tokens = True
    with torch.no_grad():
        resampled = resample_abs_pos_embed(reference.positional_embedding[None], [6, 10], num_prefix_tokens=1)
        reference.positional_embedding.data = resampled[0]
    pixels = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert _max_diff(tower(pixels), reference(pixels)[1]) <= ATOL


def test_open_clip_timm_trunk_is_a_timm_tower_without_head():
    tower = _tower(OPEN_CLIP_TIMM_CFG, position_embedding="interpolated")
    assert isinstance(tower, TimmVisionTower) and tower.vit.attn_pool is None
    pixels = torch.randn(1, 3, *tower.vit.patch_embed.img_size)
    with torch.no_grad():
        theirs = tower.vit.forward_features(pixels)[:, tower.vit.num_prefix_tokens :]
        assert _max_diff(tower(pixels), theirs) <= ATOL


BACKENDS = {
    "siglip": SIGLIP,
    "timm-siglip": TIMM_SIGLIP,
    "timm-class-token": dataclasses.replace(TIMM_SIGLIP, model_name="test_vit"),
    "open_clip-vit": OPEN_CLIP_VIT_CFG,
    "open_clip-timm": OPEN_CLIP_TIMM_CFG,
}


@pytest.mark.parametrize("cfg", BACKENDS.values(), ids=BACKENDS.keys())
def test_real_patches_ignore_padding(cfg):
    """An image's features do not change when the batch pads it (bucketed positions, masked keys)."""
    tower = _tower(cfg)
    patch = tower.patch_size
    alone = torch.randn(1, 3, 3 * patch, 5 * patch)
    pixels, pixel_mask = _padded_batch([(6 * patch, 4 * patch)], canvas=(6 * patch, 7 * patch))
    pixels = torch.cat([pixels, torch.zeros_like(pixels)])
    pixels[1, :, : 3 * patch, : 5 * patch] = alone[0]
    pixel_mask = torch.cat([pixel_mask, torch.zeros_like(pixel_mask)])
    pixel_mask[1, : 3 * patch, : 5 * patch] = 1
    patch_mask = patch_attention_mask_from_pixels(pixel_mask, patch, "all")
    with torch.no_grad():
        reference = tower(alone)[0]
        padded = tower(pixels, patch_mask)[1].reshape(6, 7, -1)[:3, :5].reshape(15, -1)
    assert _max_diff(padded, reference) <= ATOL


@pytest.mark.parametrize("cfg", BACKENDS.values(), ids=BACKENDS.keys())
def test_backward_through_padded_batch_is_finite(cfg):
    tower = _tower(cfg).train()
    patch = tower.patch_size
    canvas = (2 * patch, 3 * patch)
    pixels, pixel_mask = _padded_batch([canvas, (patch, patch)], canvas=canvas)
    tower(pixels, patch_attention_mask_from_pixels(pixel_mask, patch, "any")).sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tower.parameters())


def test_pretrained_idefics_vision_dir_loads_in_siglip_and_timm(tmp_path):
    torch.manual_seed(0)
    reference = _randomize(Idefics2VisionTransformer(Idefics2VisionConfig(**HF_TINY)))
    reference.save_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state
        for cfg in (SIGLIP, TIMM_SIGLIP):
            tower = build_vision_tower(dataclasses.replace(cfg, pretrained=str(tmp_path))).eval()
            assert _max_diff(tower(pixels), expected) <= ATOL


def test_image_size_not_a_multiple_of_the_patch_size():
    tower = _tower(SIGLIP)
    with pytest.raises(ValueError, match=r"30x32 .* patch size 8.*vision.patch_size"):
        tower(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="patch size 8"):
        patch_attention_mask_from_pixels(torch.ones(1, 30, 32), 8, "all")


def test_wrong_patch_mask_shape():
    tower = _tower(SIGLIP)
    with pytest.raises(ValueError, match=r"expected \(2, 4, 6\)"):
        tower(torch.randn(2, 3, 32, 48), torch.ones(2, 6, 4, dtype=torch.bool))


def test_unknown_backend_position_mode_and_timm_model():
    with pytest.raises(ValueError, match="siglip, timm, open_clip"):
        build_vision_tower(VisionConfig(backend="clip-from-mars"))
    with pytest.raises(ValueError, match="bucketed, interpolated"):
        build_vision_tower(dataclasses.replace(SIGLIP, position_embedding="rope"))
    with pytest.raises(ValueError, match="Unknown timm model 'vit_from_mars'"):
        build_vision_tower(dataclasses.replace(TIMM_SIGLIP, model_name="vit_from_mars"))
    with pytest.raises(ValueError, match="Unknown patch mask rule"):
        patch_attention_mask_from_pixels(torch.ones(1, 8, 8), 8, "most")
