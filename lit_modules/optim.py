"""AdamW parameter groups (weight decay and learning rate per component) and warmup + decay schedules."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lit_modules.policy import COMPONENTS
from vlm.model import VisionLanguageModel

Schedule = Literal["cosine", "linear", "constant"]


def no_weight_decay(model: VisionLanguageModel) -> set[str]:
    """Names of the parameters that take no weight decay: 1-D parameters (norm weights, biases,
    tanh gates, DoRA magnitudes), embedding tables (the language model's output projection
    included: with ``train_new_token_embeddings`` only a few rows train, and decay would shrink all
    of them) and what the components declare (``VisionLanguageModel.no_weight_decay``: perceiver
    latents, mapping-network queries)."""
    names = {name for name, param in model.named_parameters() if param.dim() < 2}
    names |= model.no_weight_decay()
    output_embeddings = model.language_model.get_output_embeddings()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or module is output_embeddings:
            names |= {
                f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters()
            }
    return names


def param_groups(
    model: VisionLanguageModel, lr: float, weight_decay: float, lr_multipliers: dict[str, float] | None = None
) -> list[dict]:
    """AdamW groups of the trainable parameters, one per (top-level component, decay or not).

    ``lr_multipliers`` scales the learning rate of a component (``{"vision_tower": 0.1}``); one the
    model lacks (``cross_attention`` under autoregressive fusion) is ignored, as in the policy, so a
    config keeps working when ``--model.fusion`` swaps the fusion. The groups carry ``name`` (e.g.
    ``connector/no_decay``) for logging. Empty groups are left out.
    """
    lr_multipliers = dict(lr_multipliers or {})
    unknown = set(lr_multipliers) - set(COMPONENTS)
    if unknown:
        raise ValueError(
            f"lr_multipliers names {sorted(unknown)}, not model components; choose from {list(COMPONENTS)}."
        )
    skip_decay = no_weight_decay(model)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = name.split(".", 1)[0]
        decay = name not in skip_decay
        key = f"{component}/{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": lr * lr_multipliers.get(component, 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def lr_lambda(
    schedule: Schedule, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warmup over ``warmup_steps`` (step ``i`` at ``(i + 1) / (warmup_steps + 1)``: no step is
    spent at a learning rate of 0), then ``cosine`` or ``linear`` decay to
    ``min_lr_ratio`` at ``max_steps`` (held there after), or ``constant``.
    """
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"Unknown schedule {schedule!r}; choose 'cosine', 'linear' or 'constant'.")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return multiplier


@dataclass
class LRSchedule:
    """The learning rate over global steps ``[start_step, end_step)``: warmup to ``lr``, then
    ``schedule`` down to ``min_lr`` at ``end_step`` (``None``: the end of training).

    A function of the trainer's global step rather than of a scheduler's own counter, so a stage
    transition (a new schedule from its first step) and a resume both give the same learning rates.
    """

    lr: float
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    start_step: int = 0
    end_step: int | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"Need 0 <= min_lr <= lr and lr > 0; got lr={self.lr}, min_lr={self.min_lr}.")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be after start_step ({self.start_step}).")

    def lr_at(self, step: int, last_step: int) -> float:
        """The learning rate at global step ``step`` (``last_step``: the end when ``end_step`` is unset)."""
        end = self.end_step if self.end_step is not None else last_step
        multiplier = lr_lambda(self.schedule, self.warmup_steps, end - self.start_step, self.min_lr / self.lr)
        return self.lr * multiplier(max(step - self.start_step, 0))
