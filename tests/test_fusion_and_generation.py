"""Fusion switch at model level, and generate(): KV cache, sampling, stop strings, for both fusions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm.config import CrossAttentionConfig, LanguageConfig, get_preset
from vlm.cross_attention import find_decoder_layers
from vlm.model import VisionLanguageModel
from vlm.vision import size_groups

SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
DECODER_FAMILIES = {
    "llama": LanguageConfig("llama", dict(SMALL, num_key_value_heads=2)),
    "mistral": LanguageConfig("mistral", dict(SMALL, num_key_value_heads=2)),
    "qwen2": LanguageConfig("qwen2", dict(SMALL, num_key_value_heads=2)),
    "gpt2": LanguageConfig("gpt2", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def build(fusion: str, gates: float = 0.0, family: str = "mistral") -> VisionLanguageModel:
    config = dataclasses.replace(
        get_preset("idefics2-tiny"),
        language=DECODER_FAMILIES[family],
        fusion=fusion,
        cross_attention=CrossAttentionConfig(every_n_layers=1, heads=2, dim_head=16),
    )
    torch.manual_seed(0)
    model = VisionLanguageModel(config).eval()
    if fusion == "cross_attention" and gates:
        with torch.no_grad():
            for block in model.cross_attention.blocks:
                block.attn_gate.fill_(gates)
                block.ff_gate.fill_(gates)
    return model


def prompt(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Row 0: two images; row 1: one image, left-padded by two."""
    torch.manual_seed(1)
    per_image = 1 if model.config.fusion == "cross_attention" else model.config.connector.num_latents
    img = [model.image_token_id] * per_image
    rows = [[5, 6, *img, 7, *img, 8], [0, 0, 9, *img, 10, 11]]
    width = max(map(len, rows))
    rows = [[0] * (width - len(r)) + r for r in rows]
    input_ids = torch.tensor(rows)
    attention_mask = (input_ids != 0).long()
    pixel_values = torch.zeros(2, 2, 3, 32, 32)
    pixel_values[0] = torch.randn(2, 3, 32, 32)
    pixel_values[1, 0] = torch.randn(3, 32, 32)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


def test_cross_attention_gates_receive_gradients_through_the_model():
    model = build("cross_attention").train()
    batch = prompt(model)
    model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    for block in model.cross_attention.blocks:
        assert block.attn_gate.grad is not None and block.attn_gate.grad.abs().item() > 0
        assert block.ff_gate.grad is not None and block.ff_gate.grad.abs().item() > 0


def test_cross_attention_images_change_only_text_after_them():
    model = build("cross_attention", gates=0.5)
    batch = prompt(model)
    other = dict(batch, pixel_values=batch["pixel_values"].clone())
    other["pixel_values"][0, 1] = torch.randn(3, 32, 32)  # second image of row 0
    with torch.no_grad():
        a, b = model(**batch).logits[0], model(**other).logits[0]
    second_marker = (batch["input_ids"][0] == model.image_token_id).nonzero()[1, 0]
    assert torch.equal(a[:second_marker], b[:second_marker])
    assert not torch.allclose(a[second_marker:], b[second_marker:])


def naive_greedy(model: VisionLanguageModel, batch: dict, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: a full forward per new token."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    features = model.encode_images(batch["pixel_values"])
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, image_features=features
        ).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
@pytest.mark.parametrize(("fusion", "gates"), [("autoregressive", 0.0), ("cross_attention", 0.5)])
def test_cached_greedy_generation_equals_full_recomputation(fusion, gates, family):
    model = build(fusion, gates, family)
    batch = prompt(model)
    with torch.no_grad():
        expected = naive_greedy(model, batch, 6)
    assert torch.equal(model.generate(**batch, max_new_tokens=6), expected)


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_cross_attention_at_init_equals_bare_lm_on_every_family(family):
    model = build("cross_attention", family=family)
    batch = prompt(model)
    with torch.no_grad():
        fused = model(**batch).logits
        bare = model.language_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    assert torch.equal(fused, bare)
    assert len(model.cross_attention.blocks) == model.language_model.config.num_hidden_layers


def test_generate_encodes_images_once():
    model = build("autoregressive")
    calls = []
    model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    model.generate(**prompt(model), max_new_tokens=4)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("fusion", "family", "through_transformers"),
    [
        ("autoregressive", "mistral", False),
        ("autoregressive", "gpt2", True),
        ("cross_attention", "mistral", False),
        ("cross_attention", "gpt2", True),
    ],
)
def test_generate_decodes_llama_family_models_with_the_cached_decoder(fusion, family, through_transformers):
    """Llama-family models decode through vlm.decoder.CachedDecoder with either fusion (their
    transformers decoder layers never run); other LMs through transformers' modules."""
    model = build(fusion, family=family)
    calls = []
    for layer in find_decoder_layers(model.language_model):
        layer.register_forward_hook(lambda *_: calls.append(1))
    model.generate(**prompt(model), max_new_tokens=3)
    assert bool(calls) == through_transformers


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = build("autoregressive")
    batch = prompt(model)
    greedy = model.generate(**batch, max_new_tokens=5)
    top1 = model.generate(**batch, max_new_tokens=5, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)
    draws = [
        model.generate(
            **batch,
            max_new_tokens=5,
            do_sample=True,
            temperature=5.0,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def test_stop_strings_and_eos_end_rows():
    model = build("autoregressive")
    batch = prompt(model)
    free = model.generate(**batch, max_new_tokens=6)
    new = free[:, batch["input_ids"].shape[1] :]
    tokenizer = word_tokenizer(model.language_model.config.vocab_size)
    stopped = model.generate(
        **batch, max_new_tokens=6, stop_strings=[f"w{new[0, 2].item()}"], tokenizer=tokenizer
    )
    first_hit = (new[0] == new[0, 2]).nonzero()[0, 0].item()
    stopped_new = stopped[:, batch["input_ids"].shape[1] :]
    assert torch.equal(stopped_new[0, : first_hit + 1], new[0, : first_hit + 1])
    eos = model.generate(**batch, max_new_tokens=6, eos_token_id=new[1, 0].item(), pad_token_id=3)
    assert (eos[1, batch["input_ids"].shape[1] + 1 :] == 3).all()
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**batch, max_new_tokens=2, stop_strings=["w1"])


@pytest.mark.parametrize("max_size_groups", [8, 2, 1])
def test_padded_images_are_encoded_on_their_own_extent_with_the_same_tokens(max_size_groups):
    """Idefics2 recipe (bucketed positions + perceiver): each image of a padded canvas goes through the
    tower at its own size (same-sized images together; with fewer groups allowed, extents merge, and
    ``max_size_groups=1`` is the plain canvas), and its visual tokens equal both the canvas encoding
    (what transformers computes) and the image encoded alone."""
    model = build("autoregressive")
    model.config.vision.max_size_groups = max_size_groups
    patch = model.vision_tower.patch_size
    small, large = 2 * patch, 3 * patch
    sizes = [(32, 32), (small, large), (large, small), (small, large)]
    torch.manual_seed(2)
    images = [torch.randn(3, h, w) for h, w in sizes]
    pixel_values = torch.zeros(len(images), 3, 32, 32)
    pixel_mask = torch.zeros(len(images), 32, 32, dtype=torch.long)
    for i, image in enumerate(images):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[i, : image.shape[1], : image.shape[2]] = 1
    seen = []
    hook = model.vision_tower.register_forward_hook(lambda _, args, __: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        tokens = model.encode_images(pixel_values, pixel_mask)
        hook.remove()
        patch_mask = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch).flatten(3).all(3)
        canvas = model.connector(
            model.vision_tower(pixel_values, patch_mask), (32 // patch, 32 // patch), patch_mask.flatten(1)
        )
        alone = torch.cat(
            [model.encode_images(image[None], torch.ones(1, *image.shape[1:])) for image in images]
        )
    expected_calls = {
        8: [(1, 3, 32, 32), (2, 3, small, large), (1, 3, large, small)],
        2: [(1, 3, 32, 32), (3, 3, large, large)],  # the two 2x3 / 3x2 extents merge into 3x3
        1: [(4, 3, 32, 32)],
    }
    assert sorted(seen) == sorted(expected_calls[max_size_groups])
    torch.testing.assert_close(tokens, canvas, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, alone, atol=1e-5, rtol=0)


def test_size_groups_merge_neighbouring_extents_beyond_the_limit():
    extents = [(4, 4), (2, 3), (3, 2), (2, 3), (1, 1)]
    assert size_groups(extents, 8) == [((1, 1), [4]), ((2, 3), [1, 3]), ((3, 2), [2]), ((4, 4), [0])]
    assert size_groups(extents, 2) == [((2, 3), [4, 1, 3]), ((4, 4), [2, 0])]
    assert size_groups(extents, 1) == [((4, 4), [4, 1, 3, 2, 0])]
    with pytest.raises(ValueError, match="max_size_groups"):
        size_groups(extents, 0)
    with pytest.raises(ValueError, match=r"vision\.max_size_groups must be >= 1"):
        dataclasses.replace(get_preset("idefics2-tiny").vision, max_size_groups=0)
