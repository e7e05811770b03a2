"""FSDP2 sharding and activation checkpointing of a VisionLanguageModel, one repeated block at a time.

A *block* is one layer of a repeated stack, as each component declares them (``repeated_blocks``): a
vision encoder block, a connector layer (perceiver / mapping network), a decoder layer of the language
model, a gated cross-attention block. ``VLMModule.configure_model`` applies
the training policy first (so LoRA/DoRA adapters are part of the blocks), then
``checkpoint_blocks`` (any strategy) and, under Lightning's ``ModelParallelStrategy``, ``shard`` and
``train_rows_sharded`` (the policy's ``train_new_token_embeddings`` on the sharded weights).

Both keep parameter names and state-dict keys unchanged: activation checkpointing uses torch's
composable ``checkpoint`` (forward hooks, no wrapper module) and FSDP2 (``fully_shard``) swaps the
parameters for DTensor shards in place.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.hooks import RemovableHandle

from vlm.cross_attention import find_decoder_layers
from vlm.model import VisionLanguageModel


def repeated_blocks(model: VisionLanguageModel) -> list[nn.Module]:
    """Every repeated block of the model, as its components declare them
    (``VisionLanguageModel.repeated_blocks``): vision tower, connector, cross-attention, decoder layers."""
    return [block for blocks in model.repeated_blocks().values() for block in blocks]


def checkpoint_blocks(model: VisionLanguageModel) -> None:
    """Activation checkpointing: each block keeps only its inputs in forward and recomputes its
    activations in backward. Works with or without FSDP2 (call before ``shard``).

    The cross-attention fusion runs its block from a forward pre-hook of a decoder layer, registered
    when the model was built, so it runs before the checkpoint's own pre-hook: the fused hidden
    states are the decoder layer's checkpointed input, and the recomputation (in backward, outside
    ``CrossAttentionFusion.condition``) never needs the media. The cross-attention blocks are
    checkpointed on their own. (A wrapper module such as ``checkpoint_wrapper`` would run the
    pre-hook inside the checkpoint, and the recomputation, without media, would not match.)
    """
    for block in repeated_blocks(model):
        checkpoint(block)


def compile_decoder_blocks(model: VisionLanguageModel, backend: str = "inductor") -> None:
    """Regional compilation: ``torch.compile`` each decoder layer's ``forward`` (not the whole model).

    Every layer runs the same code, so dynamo compiles it once and reuses the graph for all of them
    (parameters are graph inputs, not constants); the compile takes seconds instead of the whole
    model's minutes. The layer's hooks stay outside the compiled region: the cross-attention
    pre-hook, activation checkpointing and FSDP2 wrap the compiled forward unchanged.
    """
    for layer in find_decoder_layers(model.language_model):
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=None)


def shard(model: VisionLanguageModel, mesh: DeviceMesh, mixed_precision: bool = False) -> None:
    """FSDP2: ``fully_shard`` each block (one all-gather / reduce-scatter per block), then the root,
    which holds the rest (embeddings, output head, norms, connector projections, latents).

    ``mesh`` is the data-parallel mesh (``device_mesh["data_parallel"]`` of ``ModelParallelStrategy``).
    Apply the training policy (adapters, frozen parts) and ``checkpoint_blocks`` first. ``generate``
    is registered as a forward method so that it gathers the root's parameters too.
    ``mixed_precision``: bf16 parameters for compute (and all-gathers), fp32 gradient reduction and
    fp32 sharded weights for the optimizer.
    """
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")


def _mask_grad(param: nn.Parameter, mask: DTensor) -> None:
    param.grad.mul_(mask)


def train_rows_sharded(weights: list[nn.Parameter], rows: list[int]) -> list[RemovableHandle]:
    """``train_new_token_embeddings`` under FSDP2: train only ``rows`` of the sharded ``weights``.

    The gradient hooks ``apply_policy`` registers do not survive ``fully_shard`` (it replaces the
    parameters, and the reduce-scatter writes the sharded gradients). FSDP2 runs the sharded
    parameters' post-accumulate-grad hooks after each reduce-scatter: these zero the other rows.
    """
    handles = []
    for weight in weights:
        if not isinstance(weight, DTensor):
            raise TypeError("train_rows_sharded expects parameters sharded by fully_shard.")
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[rows] = 1
        mask = distribute_tensor(mask, weight.device_mesh, weight.placements)
        handles.append(weight.register_post_accumulate_grad_hook(partial(_mask_grad, mask=mask)))
    return handles
