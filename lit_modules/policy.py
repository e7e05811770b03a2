"""What each component of a VisionLanguageModel trains: frozen, full, LoRA or DoRA (peft).

Idefics2 (paper, section 3.2, Finding 3) adapts the pre-trained backbones with LoRA and fully
trains the newly initialised parameters (connector, cross-attention): that is the default
``TrainingPolicy``. Adapters are injected in place with ``peft.inject_adapter_in_model`` on each
component, so the rest of the model keeps its state-dict keys (an adapted ``q_proj`` becomes
``q_proj.base_layer`` + ``q_proj.lora_A/B``); ``merge_adapters`` folds them back into plain layers
(at a stage boundary, or before export).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from vlm.model import VisionLanguageModel

TrainMode = Literal["frozen", "full", "lora", "dora"]
COMPONENTS = ("vision_tower", "connector", "language_model", "cross_attention")
BACKBONES = ("vision_tower", "language_model")

ADAPTER_NAME = "default"


@dataclass
class TrainingPolicy:
    """Per-component training mode and the LoRA/DoRA hyper-parameters.

    Defaults follow Idefics2: LoRA on the backbones, full training of the new parameters;
    ``r=8``, ``alpha=8``, ``dropout=0.1`` as the Idefics2 fine-tuning recipe published with the
    model. ``train_new_token_embeddings``: when the language model is not fully trained, still
    train the embedding and output rows of the recipe's special tokens (``<image>``,
    ``<end_of_utterance>``...), which a frozen or LoRA-adapted vocabulary cannot learn otherwise.
    """

    vision_tower: TrainMode = "lora"
    connector: TrainMode = "full"
    language_model: TrainMode = "lora"
    cross_attention: TrainMode = "full"
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    train_new_token_embeddings: bool = False

    def mode(self, component: str) -> TrainMode:
        return getattr(self, component)


def lora_targets(component: nn.Module, blocks: list[nn.Module] | None = None) -> list[str]:
    """Names (relative to ``component``) of the linear layers LoRA adapts.

    In a backbone, the linear layers inside the ``blocks`` it declares (attention and MLP projections;
    not the patch embedding, heads or ``lm_head``); in a new component (``blocks=None``: connector,
    cross-attention), every linear layer.
    """
    inside = None if blocks is None else {id(module) for block in blocks for module in block.modules()}
    return [
        name
        for name, module in component.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and (inside is None or id(module) in inside)
    ]


def target_regex(names: list[str], module_names: list[str]) -> str:
    """A peft ``target_modules`` regex matching exactly ``names`` among ``module_names``: block indices
    generalised (``model\\.layers\\.\\d+\\.self_attn\\.q_proj``, one pattern per layer kind, short at full
    scale) unless that would also match a module that is not a target, then the names themselves."""
    patterns = {re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", re.escape(name)) for name in names}
    regex = "|".join(sorted(patterns))
    if {name for name in module_names if re.fullmatch(regex, name)} == set(names):
        return regex
    return "|".join(re.escape(name) for name in sorted(names))


def _inject(
    component: nn.Module, mode: TrainMode, policy: TrainingPolicy, blocks: list[nn.Module] | None
) -> None:
    targets = lora_targets(component, blocks)
    if not targets:
        where = " in the repeated_blocks() it declares" if blocks is not None else ""
        raise ValueError(f"{type(component).__name__} has no linear layer{where} for {mode}.")
    config = LoraConfig(
        r=policy.lora_r,
        lora_alpha=policy.lora_alpha,
        lora_dropout=policy.lora_dropout,
        use_dora=mode == "dora",
        target_modules=target_regex(targets, [name for name, _ in component.named_modules()]),
    )
    inject_adapter_in_model(config, component, adapter_name=ADAPTER_NAME)


def _train_rows(weight: nn.Parameter, rows: list[int]) -> RemovableHandle:
    """Train only ``rows`` of an embedding matrix: the gradient of the other rows is zeroed."""
    mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    mask[rows] = True
    weight.requires_grad_(True)
    return weight.register_hook(lambda grad: grad * mask.to(grad.dtype))


def apply_policy(model: VisionLanguageModel, policy: TrainingPolicy) -> list[RemovableHandle]:
    """Freeze, fully train or attach LoRA/DoRA adapters to each component, in place.

    Call on a model without adapters (``merge_adapters`` first when switching policies).
    Components the model lacks (``cross_attention`` with autoregressive fusion) are skipped.
    Returns the gradient hooks of ``train_new_token_embeddings`` (remove them before the next policy).
    """
    blocks = model.repeated_blocks()
    for name in COMPONENTS:
        component = getattr(model, name, None)
        if component is None:
            continue
        mode = policy.mode(name)
        if mode in ("lora", "dora"):
            _inject(component, mode, policy, blocks[name] if name in BACKBONES else None)
        for param_name, param in component.named_parameters():
            adapter = "lora_" in param_name
            param.requires_grad_(mode == "full" or (mode in ("lora", "dora") and adapter))
    weights, rows = new_token_rows(model, policy)
    return [_train_rows(weight, rows) for weight in weights]


def new_token_rows(
    model: VisionLanguageModel, policy: TrainingPolicy
) -> tuple[list[nn.Parameter], list[int]]:
    """The embedding and output matrices (one if tied) of which ``train_new_token_embeddings`` trains
    only the special tokens' rows, and those rows; none unless it is on and the language model is not
    fully trained."""
    if not policy.train_new_token_embeddings or policy.language_model == "full":
        return [], []
    lm = model.language_model
    weights = {id(m.weight): m.weight for m in (lm.get_input_embeddings(), lm.get_output_embeddings())}
    return list(weights.values()), sorted(set(model.special_token_ids.values()))


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


@torch.no_grad()
def merge_adapters(model: nn.Module) -> int:
    """Merge every LoRA/DoRA adapter into its base layer and put the plain layer back; returns
    how many layers were merged. The model's outputs are unchanged and its keys are the
    adapter-free ones again (``q_proj.weight``)."""
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for module in model.modules():
        if hasattr(module, "peft_config"):  # set by inject_adapter_in_model on each adapted component
            del module.peft_config
    return len(adapted)
