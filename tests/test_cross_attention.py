"""Gated cross-attention: parity with open_flamingo 2.0.1, masking, gates, and fusion into decoder LMs."""

import functools
import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vlm.config import CrossAttentionConfig
from vlm.cross_attention import (
    CrossAttentionFusion,
    GatedCrossAttentionBlock,
    find_decoder_layers,
    text_image_index,
)

DIM, DIM_VISUAL, HEADS, DIM_HEAD = 32, 24, 4, 8
IMAGE_TOKEN_ID = 1


@functools.cache
def open_flamingo_helpers() -> ModuleType:
    """open_flamingo's ``src/helpers.py``, loaded alone: importing the package would pull in its pins."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None:
        pytest.fail(
            "open_flamingo is the reference implementation: run `pip install --no-deps open-flamingo==2.0.1`"
        )
    path = Path(spec.submodule_search_locations[0]) / "src" / "helpers.py"
    module_spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_block(only_attend_immediate_media: bool, attn_gate: float = 0.7, ff_gate: float = -0.4):
    block = GatedCrossAttentionBlock(
        DIM, DIM_VISUAL, DIM_HEAD, HEADS, only_attend_immediate_media=only_attend_immediate_media
    )
    with torch.no_grad():
        block.attn_gate.fill_(attn_gate)
        block.ff_gate.fill_(ff_gate)
    return block


def flatten_media(media: torch.Tensor, num_images: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """open_flamingo's media ``(B, T_img, n, Dv)`` as ``(B, T_img * n, Dv)`` and each token's image index."""
    batch, max_images, n = media.shape[:3]
    index = torch.arange(1, max_images + 1).repeat_interleave(n).expand(batch, -1).clone()
    index[index > torch.tensor(num_images)[:, None]] = 0
    return media.flatten(1, 2), index


@pytest.mark.parametrize("only_attend_immediate_media", [True, False])
def test_block_matches_open_flamingo(only_attend_immediate_media):
    torch.manual_seed(0)
    reference = open_flamingo_helpers().GatedCrossAttentionBlock(
        dim=DIM,
        dim_visual=DIM_VISUAL,
        dim_head=DIM_HEAD,
        heads=HEADS,
        only_attend_immediate_media=only_attend_immediate_media,
    )
    with torch.no_grad():
        reference.attn_gate.fill_(0.7)
        reference.ff_gate.fill_(-0.4)
    block = GatedCrossAttentionBlock(
        DIM, DIM_VISUAL, DIM_HEAD, HEADS, only_attend_immediate_media=only_attend_immediate_media
    )
    block.load_state_dict(reference.state_dict(), strict=True)

    x = torch.randn(3, 12, DIM)
    media = torch.randn(3, 3, 5, DIM_VISUAL)
    media_locations = torch.zeros(3, 12, dtype=torch.bool)
    media_locations[0, [2, 5, 9]] = True  # text before the first image
    media_locations[1, [0, 4, 7]] = True
    media_locations[2, [3, 8]] = True  # two images of three: the third is padding
    flat_media, media_index = flatten_media(media, num_images=[3, 3, 2])
    flat_media[2, media_index[2] == 0] = 1e4  # padding must be ignored whatever it holds

    out = block(x, flat_media, media_index, text_image_index(media_locations))

    def run_reference() -> torch.Tensor:  # the last sample alone, on its two images only
        return torch.cat(
            [
                reference(x[:2], media[:2], media_locations[:2]),
                reference(x[2:], media[2:, :2], media_locations[2:]),
            ]
        )

    expected = run_reference()
    if not only_attend_immediate_media:
        # open_flamingo's all-previous mode lets text before any image attend to every image; like
        # Flamingo (and its own immediate mode), we give that text no cross-attention output.
        reference.attn.only_attend_immediate_media = True
        before_image = text_image_index(media_locations) == 0
        expected[before_image] = run_reference()[before_image]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def changed_positions(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return torch.nonzero((a - b).abs().amax(dim=-1)[0] > 1e-6).flatten().tolist()


@pytest.mark.parametrize("only_attend_immediate_media", [True, False])
def test_text_attends_only_to_images_before_it(only_attend_immediate_media):
    torch.manual_seed(0)
    block = make_block(only_attend_immediate_media)
    x = torch.randn(1, 6, DIM)
    media = torch.randn(1, 6, DIM_VISUAL)
    media_index = torch.tensor([[1, 1, 1, 2, 2, 2]])
    # [t, IMG1, t, t, IMG2, t]
    text_index = text_image_index(torch.tensor([[False, True, False, False, True, False]]))
    out = block(x, media, media_index, text_index)

    def perturbed(image: int) -> torch.Tensor:
        return block(x, media + 5 * (media_index == image)[..., None], media_index, text_index)

    assert changed_positions(perturbed(2), out) == [4, 5]
    assert changed_positions(perturbed(1), out) == (
        [1, 2, 3] if only_attend_immediate_media else [1, 2, 3, 4, 5]
    )


def test_block_is_identity_at_init_and_gates_get_gradients():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(DIM, DIM_VISUAL, DIM_HEAD, HEADS)
    assert block.attn_gate.item() == 0 and block.ff_gate.item() == 0
    x = torch.randn(2, 5, DIM)
    media = torch.randn(2, 4, DIM_VISUAL)
    media_index = torch.tensor([[1, 1, 2, 2], [1, 1, 0, 0]])
    text_index = torch.tensor([[0, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
    out = block(x, media, media_index, text_index)
    assert torch.equal(out, x)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    assert block.attn_gate.grad.abs().item() > 0 and block.ff_gate.grad.abs().item() > 0


TINY_DECODER = dict(
    vocab_size=64,
    hidden_size=DIM,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LANGUAGE_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY_DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY_DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY_DECODER)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64, n_embd=DIM, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    ),
}


def build(family: str) -> tuple[nn.Module, CrossAttentionFusion]:
    torch.manual_seed(0)
    language_model = LANGUAGE_MODELS[family]().eval()
    cfg = CrossAttentionConfig(every_n_layers=2, heads=HEADS, dim_head=DIM_HEAD)
    return language_model, CrossAttentionFusion(language_model, cfg, DIM_VISUAL)


def multimodal_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``(2, 10)`` with two ``<image>`` markers per sample, and the media of those images."""
    input_ids = torch.randint(2, 64, (2, 10))
    input_ids[0, [3, 9]] = IMAGE_TOKEN_ID  # the last token is an image marker
    input_ids[1, [2, 5]] = IMAGE_TOKEN_ID
    media = torch.randn(2, 7, DIM_VISUAL)
    media_index = torch.tensor([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 0, 0]])  # images of 4+3 and 3+2 tokens
    return input_ids, media, media_index


def set_gates(fusion: CrossAttentionFusion, attn_gate: float, ff_gate: float) -> None:
    with torch.no_grad():
        for block in fusion.blocks:
            block.attn_gate.fill_(attn_gate)
            block.ff_gate.fill_(ff_gate)


def tiny_opt() -> nn.Module:
    config = OPTConfig(vocab_size=64, hidden_size=DIM, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4)
    return OPTForCausalLM(config)


@pytest.mark.parametrize(
    "make_language_model, path",
    [
        (LANGUAGE_MODELS["llama"], "model.layers"),
        (LANGUAGE_MODELS["mistral"], "model.layers"),
        (LANGUAGE_MODELS["qwen2"], "model.layers"),
        (LANGUAGE_MODELS["gpt2"], "transformer.h"),
        (tiny_opt, "model.decoder.layers"),  # found generically: the one ModuleList of num_hidden_layers
    ],
)
def test_find_decoder_layers(make_language_model, path):
    language_model = make_language_model()
    assert find_decoder_layers(language_model) is language_model.get_submodule(path)


def test_find_decoder_layers_names_the_model_when_it_fails():
    class NoLayers(nn.Module):
        config = SimpleNamespace(num_hidden_layers=2)

    with pytest.raises(ValueError, match="NoLayers"):
        find_decoder_layers(NoLayers())


@pytest.mark.parametrize("family", LANGUAGE_MODELS)
def test_fusion_hooks_blocks_without_touching_the_language_model(family):
    torch.manual_seed(0)
    language_model = LANGUAGE_MODELS[family]()
    keys = list(language_model.state_dict())
    fusion = CrossAttentionFusion(language_model, CrossAttentionConfig(every_n_layers=2), DIM_VISUAL)

    assert fusion.layer_indices == (1, 3) and len(fusion.blocks) == 2
    hooked = [i for i, layer in enumerate(find_decoder_layers(language_model)) if layer._forward_pre_hooks]
    assert hooked == [1, 3]
    assert list(language_model.state_dict()) == keys
    assert all(key.startswith("blocks.") for key in fusion.state_dict())
    fusion.remove()
    assert not any(layer._forward_pre_hooks for layer in find_decoder_layers(language_model))


@pytest.mark.parametrize("family", LANGUAGE_MODELS)
def test_fusion_changes_logits_only_from_the_first_image_on(family):
    language_model, fusion = build(family)
    input_ids, media, media_index = multimodal_batch()
    text_index = text_image_index(input_ids == IMAGE_TOKEN_ID)
    bare = language_model(input_ids).logits
    with fusion.condition(media, media_index, text_index):
        assert torch.equal(language_model(input_ids).logits, bare)  # gates at 0

        # The feed-forward is applied to all text (as open_flamingo): with its gate at 0, text before
        # the first image is exactly the bare LM's; with both gates open, it does not depend on media.
        set_gates(fusion, attn_gate=0.7, ff_gate=0.0)
        logits = language_model(input_ids).logits
        set_gates(fusion, attn_gate=0.7, ff_gate=0.5)
        both_gates = language_model(input_ids).logits
    with fusion.condition(media + 1, media_index, text_index):
        both_gates_other_media = language_model(input_ids).logits
    assert torch.equal(language_model(input_ids).logits, bare)  # no-op outside `condition()`

    before_image = text_index == 0
    torch.testing.assert_close(logits[before_image], bare[before_image])
    assert ((logits - bare).abs().amax(dim=-1) > 1e-4)[~before_image].all()
    torch.testing.assert_close(both_gates[before_image], both_gates_other_media[before_image])
    assert ((both_gates - both_gates_other_media).abs().amax(dim=-1) > 1e-4)[~before_image].all()


@pytest.mark.parametrize("family", LANGUAGE_MODELS)
def test_fusion_with_kv_cache_matches_full_forward(family):
    language_model, fusion = build(family)
    set_gates(fusion, attn_gate=0.7, ff_gate=0.5)
    input_ids, media, media_index = multimodal_batch()
    media_locations = input_ids == IMAGE_TOKEN_ID
    with fusion.condition(media, media_index, text_image_index(media_locations)):
        full = language_model(input_ids).logits[:, -1]

    prompt_locations, new_locations = media_locations[:, :-1], media_locations[:, -1:]
    with fusion.condition(media, media_index, text_image_index(prompt_locations)):
        cache = language_model(input_ids[:, :-1], use_cache=True).past_key_values
    with fusion.condition(
        media, media_index, text_image_index(new_locations, offset=prompt_locations.sum(-1))
    ):
        step = language_model(input_ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


def test_fusion_hook_takes_hidden_states_by_position_or_keyword():
    language_model, fusion = build("llama")
    set_gates(fusion, attn_gate=0.7, ff_gate=0.5)
    input_ids, media, media_index = multimodal_batch()
    hidden_states = torch.randn(2, 10, DIM)
    rope = language_model.model.rotary_emb(hidden_states, torch.arange(10)[None])
    layer = find_decoder_layers(language_model)[1]
    with fusion.condition(media, media_index, text_image_index(input_ids == IMAGE_TOKEN_ID)):
        by_position = layer(hidden_states, position_embeddings=rope)
        by_keyword = layer(hidden_states=hidden_states, position_embeddings=rope)
    assert torch.equal(by_position, by_keyword)
    assert not torch.equal(by_position, layer(hidden_states, position_embeddings=rope))


def test_fusion_casts_media_to_the_block_dtype():
    language_model, fusion = build("llama")
    language_model.to(torch.bfloat16)
    fusion.to(torch.bfloat16)
    set_gates(fusion, attn_gate=0.7, ff_gate=0.5)
    input_ids, media, media_index = multimodal_batch()
    with fusion.condition(media, media_index, text_image_index(input_ids == IMAGE_TOKEN_ID)):
        logits = language_model(input_ids).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
