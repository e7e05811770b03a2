"""Parity with transformers: same weights and inputs give the same logits, tokens and state dicts."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from idefics_fixtures import left_padded, mixed_batch, tiny_idefics2, tiny_idefics3

from vlm.hf import from_transformers, to_transformers

CASES = {
    "idefics2": (tiny_idefics2, 8),  # perceiver latents per image
    "idefics3": (tiny_idefics3, 9),  # (48 / 8)^2 patches / scale 2^2
    "idefics3-tied-embeddings": (partial(tiny_idefics3, tie_word_embeddings=True), 9),  # SmolVLM-style
}


@pytest.fixture(params=sorted(CASES))
def pair(request):
    make, tokens_per_image = CASES[request.param]
    hf_model = make()
    return hf_model, from_transformers(hf_model).eval(), mixed_batch(tokens_per_image)


def test_logits_and_loss_match_transformers(pair):
    hf_model, model, batch = pair
    with torch.no_grad():
        ref = hf_model(**batch)
        ours = model(**batch)
    real = batch["attention_mask"].bool()
    assert ours.logits.shape == ref.logits.shape
    torch.testing.assert_close(ours.logits[real], ref.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    hf_model, model, batch = pair
    batch = left_padded(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    eos = hf_model.config.text_config.eos_token_id
    ref = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ours = model.generate(**inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_round_trip_reproduces_state_dict_exactly(pair):
    hf_model, model, _ = pair
    back = to_transformers(model)
    assert type(back) is type(hf_model)
    ref_sd, back_sd = hf_model.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys()
    for key, value in ref_sd.items():
        assert torch.equal(value, back_sd[key]), key


def test_idefics2_canvas_not_a_multiple_of_the_patch_size_matches_transformers():
    """The Idefics2 processor pads a batch to its largest image (e.g. 980x735, not a multiple of 14);
    transformers drops the partial edge patches, the model here masks them: same logits."""
    hf_model = tiny_idefics2()
    model = from_transformers(hf_model).eval()
    batch = mixed_batch(8, size=50)
    with torch.no_grad():
        ref, ours = hf_model(**batch).logits, model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)
