"""Attention implementation as config: choices, clear errors, flex_attention's document BlockMask and the
varlen adapter on packed rows (packed logits equal each document's logits alone)."""

from __future__ import annotations

import pytest
import torch
from test_padding_free import documents, packed_model, reference_varlen

from datamodules.packing import collate_rows
from vlm import attention
from vlm.attention import resolve_attention
from vlm.config import get_preset
from vlm.model import VisionLanguageModel


def assert_documents_alone(model, docs, rows):
    """Logits of every document in the packed rows equal the document's logits alone."""
    batch = collate_rows(rows, pad_token_id=0, seq_len=max(sum(map(len, r)) for r in rows) + 2)
    with torch.no_grad():
        packed = model(**batch).logits
        for r, row in enumerate(rows):
            start = 0
            for doc in row:
                alone = model(**collate_rows([[doc]], pad_token_id=0)).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(doc)], alone, atol=1e-4, rtol=1e-4)
                start += len(doc)


def test_unknown_and_unavailable_choices_name_the_key(monkeypatch):
    with pytest.raises(ValueError, match=r"language\.attn_implementation='fast'.*choose one of"):
        resolve_attention("fast", "language.attn_implementation")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"vision\.attn_implementation='varlen' is not available.*CUDA"):
        resolve_attention("varlen", "vision.attn_implementation")
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(ValueError, match="pip install flash-attn"):
        resolve_attention("flash_attention_2", "language.attn_implementation")
    assert resolve_attention("auto", "language.attn_implementation") == "sdpa"  # no GPU: sdpa
    config = get_preset("idefics3-tiny")
    config.vision.backend, config.vision.model_name = "timm", "vit_base_patch16_224"
    config.vision.attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"vision\.attn_implementation='eager'.*sdpa"):
        VisionLanguageModel(config)


def test_auto_prefers_the_flash_kernels_then_torch_varlen_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: True)
    assert resolve_attention("auto", "language.attn_implementation") == "flash_attention_2"
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: False)
    assert resolve_attention("auto", "language.attn_implementation") == "varlen"


@pytest.mark.parametrize("preset", ["idefics2-tiny", "idefics3-tiny"])
def test_flex_attention_packed_logits_equal_each_document_alone(preset):
    """Inference mode (flex attention runs forward on CPU): checks the document BlockMask the GPU uses.

    transformers compiles flex attention; inductor's CPU template for it fails to compile a kernel for
    dynamic shapes (torch 2.14.1: ``cur_qSplitSize3`` undeclared), so every shape is compiled static."""
    torch._dynamo.reset()
    static = torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64)
    processor, model = packed_model(preset, "autoregressive")
    model.float().language_model.config._attn_implementation = "flex_attention"
    docs = documents(processor)
    seen = []
    flex = attention.AttentionInterface._global_mapping["flex_attention"]
    spy = lambda *args, **kwargs: seen.append(type(args[4]).__name__) or flex(*args, **kwargs)  # noqa: E731
    attention.AttentionInterface._global_mapping["flex_attention"] = spy
    try:
        with static:
            assert_documents_alone(model, docs, [docs[:2], docs[2:]])
    finally:
        attention.AttentionInterface._global_mapping["flex_attention"] = flex
    assert seen and set(seen) == {"BlockMask"}


@pytest.mark.parametrize("preset", ["idefics2-tiny", "idefics3-tiny"])
def test_varlen_adapter_runs_packed_rows_as_their_documents(preset, monkeypatch):
    """The registered ``varlen`` function hands the kernel the batch's cu_seq_lens (the kernel itself is
    CUDA-only: replaced here by a per-sequence reference with its signature)."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[3])
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(attention.torch_varlen, "varlen_attn", kernel)
    processor, model = packed_model(preset, "autoregressive")
    model.float().language_model.config._attn_implementation = "varlen"
    docs = documents(processor)
    assert_documents_alone(model, docs, [docs[:2], docs[2:]])
    assert calls and all(c.dtype == torch.int32 for c in calls)
