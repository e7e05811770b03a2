"""``vlm.loss.linear_cross_entropy`` equals the plain logits + ``F.cross_entropy`` loss (value and gradients),
and ``VisionLanguageModel.forward(return_logits=False)`` (what training calls) gives the loss and parameter
gradients of the full-logits path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm.config import get_preset
from vlm.loss import linear_cross_entropy
from vlm.model import VisionLanguageModel
from vlm.processing import load_tiny_tokenizer


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_value_and_gradients_equal_the_plain_loss(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (23,), generator=g)
    ours = linear_cross_entropy(hidden, weight, targets, bias, chunk=chunk)
    grads = torch.autograd.grad(ours * 3.0, [t for t in (hidden, weight, bias) if t is not None])
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    expected = torch.autograd.grad(plain * 3.0, [t for t in (hidden, weight, bias) if t is not None])
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_labelled_token_gives_nan_like_cross_entropy_and_bad_shapes_are_named():
    hidden, weight = torch.randn(0, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    assert math.isnan(float(linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long)).detach()))
    with pytest.raises(ValueError, match=r"hidden \(n, dim\) and targets \(n,\)"):
        linear_cross_entropy(torch.randn(2, 3, 4), weight, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_model_loss_without_logits_equals_the_full_logits_loss(fusion):
    """Same loss and the same gradient for every parameter, image-token and padding labels ignored."""
    torch.manual_seed(0)
    tokenizer = load_tiny_tokenizer()
    config = get_preset("idefics2-tiny")
    config.fusion = fusion
    model = VisionLanguageModel(config, tokenizer).double()
    n_image_tokens = 1 if fusion == "cross_attention" else config.connector.num_latents
    image = [model.image_token_id] * n_image_tokens
    rows = [[305, 306, *image, 307, 308, 309, 310], [311, *image, 312, 313, 0, 0, 0]]
    rows = [row + [0] * (max(map(len, rows)) - len(row)) for row in rows]
    input_ids = torch.tensor(rows)
    attention_mask = (input_ids != 0).long()
    labels = input_ids.masked_fill((input_ids == model.image_token_id) | (attention_mask == 0), -100)
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=torch.randn(2, 3, 32, 32, dtype=torch.float64),
    )
    losses, grads = [], []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(**batch, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("vision_tower") for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
