"""Next-token loss without materialising the logits of the whole batch.

A causal LM's loss needs logits only where a label is set, and even there only one chunk at a time:
``linear_cross_entropy`` projects the labelled hidden states through the output embedding chunk by
chunk and computes the loss and its gradients in the forward pass (the gradient of a mean
cross-entropy is ``(softmax - onehot) / n``), so a step holds one ``(chunk, vocab)`` block instead of
the ``(batch, seq, vocab)`` logits, their log-softmax and their gradient (each 2 GB for 8 x 2,048
tokens of a 32,000-token vocabulary in fp32). The value and gradients equal
``F.cross_entropy(hidden @ weight.T + bias, targets)`` up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int
    ) -> Tensor:
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least (bf16 logits lose the loss)
        loss = hidden.new_zeros((), dtype=acc)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        )
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / n, computed in place over the logits.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
            grad_logits.div_(n)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if has else None for has in ctx.has]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` (``(n, dim)`` by ``(vocab, dim)``) against
    ``targets`` ``(n,)``, computed ``chunk`` rows at a time; every target must be a real class (select the
    labelled positions first; with none the loss is NaN, as ``F.cross_entropy``'s mean). Gradients flow
    to ``hidden``, ``weight`` and ``bias``."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy takes hidden (n, dim) and targets (n,); got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}."
        )
    if hidden.shape[0] == 0:  # no labelled token: NaN, as F.cross_entropy (VLMModule skips such steps)
        return (hidden.sum() + weight.sum()) * float("nan")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
