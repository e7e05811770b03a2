"""Padding-free packed batches through the model: documents isolated (attention, cross-attention, loss),
the varlen arguments reaching the language model, and the dense-mask baseline agreeing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packing import encode, image
from test_processor import tiny_processor

from datamodules.packing import TokenizedDocument, collate_rows
from vlm import attention
from vlm.config import IGNORE_INDEX

TEXTS = [
    "a cat<image> sits on the mat",  # image in the middle
    "first some words, then<image> and<image> two pictures",  # text before its first image
    "hello world, no image here at all",
    "<image>a red square on a table",
]


def documents(processor, text_only: bool = True) -> list[TokenizedDocument]:
    """Four documents; the third has no image unless ``text_only`` is off.

    Cross-attention fusion runs its blocks (gated feed-forward included) only for batches that hold
    images, as open_flamingo does: a text-only document alone would skip them, so it is not compared.
    """
    texts = TEXTS if text_only else [*TEXTS[:2], TEXTS[2].replace("no image", "<image>"), TEXTS[3]]
    images = [[image(0)], [image(1, (64, 32)), image(2)], [] if text_only else [image(4)], [image(3)]]
    return [encode(processor, text, imgs) for text, imgs in zip(texts, images)]


def packed_model(preset: str, fusion: str, immediate: bool = True):
    torch.manual_seed(0)
    processor, model = tiny_processor(preset, fusion)
    if fusion == "cross_attention":  # gates at 0 would make the blocks the identity: nothing to isolate
        with torch.no_grad():
            for block in model.cross_attention.blocks:
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(0.7)
                block.attn.only_attend_immediate_media = immediate
    return processor, model.double()


def summed_loss(out, labels: torch.Tensor) -> float:
    """The mean loss times the number of labelled positions: a sum over the predicted tokens."""
    return float(out.loss) * int((labels[..., 1:] != IGNORE_INDEX).sum())


CASES = [
    ("idefics2-tiny", "autoregressive", True),
    ("idefics3-tiny", "autoregressive", True),
    ("idefics2-tiny", "cross_attention", True),
    ("idefics3-tiny", "cross_attention", True),
    ("idefics3-tiny", "cross_attention", False),
]


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "dense_baseline"])
@pytest.mark.parametrize(("preset", "fusion", "immediate"), CASES)
def test_packed_loss_is_the_sum_of_the_documents_losses(preset, fusion, immediate, padding_free):
    """Two rows (images in several documents of a row, a row ending in padding), fp32 and sdpa."""
    processor, model = packed_model(preset, fusion, immediate)
    model.float()
    docs = documents(processor, text_only=fusion == "autoregressive")
    rows = [docs[:2], docs[2:]]
    batch = collate_rows(rows, pad_token_id=0, seq_len=max(sum(map(len, r)) for r in rows) + 3,
                         padding_free=padding_free)  # fmt: skip
    assert ("cu_seq_lens_q" in batch) == padding_free and ("attention_mask" in batch) != padding_free
    with torch.no_grad():
        packed = model(**batch)
        alone = [collate_rows([[doc]], pad_token_id=0) for doc in docs]
        losses = [summed_loss(model(**single), single["labels"]) for single in alone]
    assert summed_loss(packed, batch["labels"]) == pytest.approx(sum(losses), rel=1e-5, abs=1e-5)
    with torch.no_grad():
        returned = model(**batch, return_logits=False)  # the training path: loss from hidden states
    assert float(returned.loss) == pytest.approx(float(packed.loss), rel=1e-5)
    for r, row in enumerate(rows):  # and every document's logits, at its place in the packed rows
        start = 0
        for doc in row:
            single = alone[docs.index(doc)]
            expected = model(**single).logits[0]
            torch.testing.assert_close(
                packed.logits[r, start : start + len(doc)], expected, atol=1e-4, rtol=1e-4
            )
            start += len(doc)


def reference_varlen(
    q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """torch's varlen_attn contract (CUDA only) on CPU: each sequence through sdpa on its own."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert max_q == max_k == int(cu_q.diff().max())
    assert window_size[0] == -1 or window_size[0] >= max_q  # a sliding window longer than every sequence
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        parts = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        causal = window_size[1] == 0
        out[start:end] = F.scaled_dot_product_attention(
            *parts, is_causal=causal, scale=scale, enable_gqa=enable_gqa
        ).transpose(0, 1)
    return out


def decoder_calls(model, batch) -> list[dict]:
    """The keyword arguments of every call of the language model's decoder during a packed forward."""
    seen = []
    decoder = model.language_model.base_model
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, return_logits=False)
    finally:
        handle.remove()
    return seen


def test_a_varlen_kernel_gets_the_flattened_rows_and_no_mask(monkeypatch):
    """Spy on the decoder's call: flattened position_ids, cu_seq_lens / max_length, no attention mask."""
    monkeypatch.setattr(attention.torch_varlen, "varlen_attn", reference_varlen)  # CUDA-only kernel
    processor, model = packed_model("idefics3-tiny", "autoregressive")
    model.float().language_model.config._attn_implementation = "varlen"
    docs = documents(processor)
    batch = collate_rows([docs[:2], docs[2:]], pad_token_id=0, seq_len=200)
    (kwargs,) = decoder_calls(model, batch)
    assert kwargs["attention_mask"] is None
    assert kwargs["inputs_embeds"].shape[:2] == (1, 400)
    torch.testing.assert_close(kwargs["position_ids"], batch["position_ids"].reshape(1, -1))
    lengths = [len(d) for d in docs[:2]] + [200 - len(docs[0]) - len(docs[1])]
    lengths += [len(d) for d in docs[2:]] + [200 - len(docs[2]) - len(docs[3])]
    expected = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert kwargs[key].dtype == torch.int32 and torch.equal(kwargs[key], expected)
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == max(lengths)


def test_sdpa_keeps_the_rows_and_gets_no_mask():
    """sdpa: rows kept (flattened, it would compute every cross-row block), per-row position_ids, no mask
    from us (transformers builds each row's boolean block mask from the position ids)."""
    processor, model = packed_model("idefics3-tiny", "autoregressive")
    docs = documents(processor)
    batch = collate_rows([docs[:2], docs[2:]], pad_token_id=0, seq_len=200)
    (kwargs,) = decoder_calls(model, batch)
    assert kwargs["attention_mask"] is None and kwargs["inputs_embeds"].shape[:2] == (2, 200)
    assert torch.equal(kwargs["position_ids"], batch["position_ids"])
    assert not any(key.startswith(("cu_seq_lens", "max_length")) for key in kwargs)


def test_a_partial_padding_free_batch_is_refused():
    processor, model = packed_model("idefics2-tiny", "autoregressive")
    batch = collate_rows([documents(processor)[2:3]], pad_token_id=0)
    del batch["max_length_k"]
    with pytest.raises(ValueError, match="max_length_k missing"):
        model(**batch)
    batch = collate_rows([documents(processor)[2:3]], pad_token_id=0)
    with pytest.raises(ValueError, match="no attention_mask"):
        model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
