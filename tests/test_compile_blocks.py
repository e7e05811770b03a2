"""Regional compilation of the decoder layers: one compile for every layer, same loss and gradients,
with and without activation checkpointing, on a padding-free packed batch."""

from __future__ import annotations

import copy

import pytest
import torch
from test_padding_free import documents, packed_model
from torch._dynamo.testing import CompileCounterWithBackend

from datamodules.packing import collate_rows
from lit_modules.sharding import checkpoint_blocks, compile_decoder_blocks


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_one_compile_serves_every_decoder_layer(fusion, checkpointing):
    processor, model = packed_model("idefics3-tiny", fusion)
    model.float().train()
    docs = documents(processor, text_only=fusion == "autoregressive")
    batch = collate_rows([docs[:2], docs[2:]], pad_token_id=0)
    compiled = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")  # the same tracing as inductor, without C++ builds
    torch._dynamo.reset()
    compile_decoder_blocks(compiled, backend=counter)
    if checkpointing:
        checkpoint_blocks(compiled)
    losses, grads = [], []
    for m in (model, compiled):
        loss = m(**batch, return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert counter.frame_count == 1  # two decoder layers, one graph
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)
