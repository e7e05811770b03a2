"""The vision tower packs (NaViT): the real patches of a padded batch run as one sequence, each image
attending only to itself, under flex attention (a document BlockMask) or a varlen kernel (the batch's
cu_seq_lens), and give the visual tokens of each image encoded alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_padding_free import reference_varlen

from vlm import attention
from vlm.config import get_preset
from vlm.model import VisionLanguageModel

CANVAS = 32


def build(attn_implementation: str, position_embedding: str = "bucketed") -> VisionLanguageModel:
    """The Idefics2 tiny recipe (perceiver connector) with the given tower attention, fp32."""
    preset = get_preset("idefics2-tiny")
    vision = dataclasses.replace(
        preset.vision, attn_implementation=attn_implementation, position_embedding=position_embedding
    )
    torch.manual_seed(0)
    return VisionLanguageModel(dataclasses.replace(preset, vision=vision)).float()


def padded_batch(patch: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Images of four sizes on one zero-padded canvas, with their pixel mask."""
    sizes = [(CANVAS, CANVAS), (2 * patch, 3 * patch), (3 * patch, patch), (patch, 2 * patch)]
    torch.manual_seed(2)
    images = [torch.randn(3, h, w) for h, w in sizes]
    pixel_values = torch.zeros(len(images), 3, CANVAS, CANVAS)
    pixel_mask = torch.zeros(len(images), CANVAS, CANVAS, dtype=torch.long)
    for i, image in enumerate(images):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[i, : image.shape[1], : image.shape[2]] = 1
    return images, pixel_values, pixel_mask


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """torch's varlen kernel is CUDA-only: the tower is built as on a GPU and the kernel replaced by a
    per-sequence reference with its signature. Returns the calls of the ``varlen`` attention function."""
    monkeypatch.setattr(attention.torch_varlen, "varlen_attn", reference_varlen)
    calls = []
    varlen = attention.ALL_ATTENTION_FUNCTIONS["varlen"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append({"attention_mask": attention_mask, **kwargs})
        return varlen(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, "varlen", spy)
    with monkeypatch.context() as during_build:
        during_build.setattr(torch.cuda, "is_available", lambda: True)
        model = build("varlen")
    return model, calls


@pytest.mark.parametrize("position_embedding", ["bucketed", "interpolated"])
def test_varlen_packed_tower_gives_each_image_alone_its_tokens(varlen_on_cpu, position_embedding):
    """One tower call over the real patches only; every layer's kernel receives the images' cu_seq_lens
    and no mask; tokens equal the canvas encoding and (bucketed) each image alone; gradients too."""
    model, calls = varlen_on_cpu
    model.config.vision.position_embedding = position_embedding
    model.vision_tower.position_embedding = position_embedding
    tower = model.vision_tower
    assert tower.supports_packing and tower.vit.config._attn_implementation == "packed_varlen"
    patch = tower.patch_size
    images, pixel_values, pixel_mask = padded_batch(patch)
    encoder_inputs = []
    hook = tower.vit.encoder.register_forward_pre_hook(
        lambda _, args, kwargs: encoder_inputs.append(kwargs), with_kwargs=True
    )
    packed = model.encode_images(pixel_values, pixel_mask)
    hook.remove()
    lengths = [h * w // patch**2 for _, h, w in (image.shape for image in images)]
    assert len(encoder_inputs) == 1 and encoder_inputs[0]["inputs_embeds"].shape[:2] == (1, sum(lengths))
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    assert len(calls) == model.config.vision.num_layers
    for call in calls:
        assert call["attention_mask"] is None
        assert torch.equal(call["cu_seq_lens_q"], cu_seq_lens) and torch.equal(
            call["cu_seq_lens_k"], cu_seq_lens
        )
        assert call["max_length_q"] == call["max_length_k"] == max(lengths)

    tower.vit.config._attn_implementation = "sdpa"  # the same weights on the padded canvas
    canvas = model.encode_images(pixel_values, pixel_mask)
    torch.testing.assert_close(packed, canvas, atol=1e-5, rtol=0)
    (grad_packed,) = torch.autograd.grad(
        packed.square().sum(), tower.vit.encoder.layers[0].self_attn.q_proj.weight
    )
    (grad_canvas,) = torch.autograd.grad(
        canvas.square().sum(), tower.vit.encoder.layers[0].self_attn.q_proj.weight
    )
    torch.testing.assert_close(grad_packed, grad_canvas, atol=1e-4, rtol=1e-4)
    if position_embedding == "bucketed":  # interpolated positions depend on the canvas by design
        with torch.no_grad():
            alone = torch.cat([model.encode_images(im[None], torch.ones(1, *im.shape[1:])) for im in images])
        torch.testing.assert_close(packed.detach(), alone, atol=1e-5, rtol=0)


def test_flex_attention_packed_tower_gives_each_image_alone_its_tokens():
    """Inference mode (flex attention runs forward on CPU): checks the document BlockMask a GPU uses.
    Static shapes, as in test_attention (inductor's CPU flex template fails on dynamic shapes)."""
    torch._dynamo.reset()
    model = build("flex_attention").eval()
    tower = model.vision_tower
    assert tower.supports_packing
    images, pixel_values, pixel_mask = padded_batch(tower.patch_size)
    masks = []
    hook = tower.vit.encoder.register_forward_pre_hook(
        lambda _, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64), torch.no_grad():
        packed = model.encode_images(pixel_values, pixel_mask)
        hook.remove()
        alone = torch.cat([model.encode_images(im[None], torch.ones(1, *im.shape[1:])) for im in images])
    assert [type(mask).__name__ for mask in masks] == ["BlockMask"]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_towers_that_cannot_pack_say_so():
    model = build("sdpa")
    assert not model.vision_tower.supports_packing
    _, pixel_values, _ = padded_batch(model.vision_tower.patch_size)
    with pytest.raises(ValueError, match=r"cannot pack images.*flex_attention"):
        model.vision_tower(pixel_values, packed=True)
    with pytest.raises(ValueError, match="'sdpa' cannot run packed sequences"):
        attention.packed_sequences_mask("sdpa", torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="not a varlen kernel"):
        attention.packed_implementation("sdpa")
