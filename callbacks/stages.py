"""Stage transitions: a YAML list of training stages, each switched on at a global step.

Idefics2 (§4.2) pretrains in two stages (max resolution 384 then 980, PDFs added to the mixture);
Idefics3 (§5.2.1) in three (frozen backbones, then DoRA; resolution up to 1820; synthetic data last)
followed by SFT. A ``Stage`` says what changes from its ``start_step`` on: the data mixture, the
maximum image resolution, the packed sequence length (``VLMDataModule`` setters), the training
policy (frozen / full / LoRA / DoRA per component: ``VLMModule.set_policy`` merges the adapters in
place, then the optimizer is rebuilt for the new trainable parameters) and the learning-rate
schedule (``VLMModule.set_lr_schedule``). Fields left unset keep what is in effect.

The first stage is applied in ``setup``, before the model is built and the loader created; later
ones at the end of the batch that reaches their ``start_step`` (after the optimizer step, so at an
accumulation boundary), after which the train stream restarts (``restart_train_stream``) so that no
buffered sample of the previous stage is used. Resume is exact mid-stage: the checkpoint holds the
stage index (this callback), the policy and schedule (``VLMModule``), and the mixture, resolution,
sequence length and data position (``VLMDataModule`` and its loader).

Strategies: single device and DDP (the model is re-wrapped after a policy change). Under FSDP2
(``ModelParallelStrategy``) the parameters are sharded when the model is built, so a stage may change
everything but the policy; run a policy change as a new ``fit`` from the previous stage's checkpoint.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from callbacks.resolution import restart_train_stream
from lit_modules.optim import LRSchedule, Schedule
from lit_modules.policy import TrainingPolicy

_SCHEDULE_FIELDS = ("lr", "schedule", "warmup_steps", "min_lr")
# Stage fields applied to the data pipeline, with the VLMDataModule setter of each.
_DATA_FIELDS = {
    "mixture": "set_mixture_weights",
    "max_resolution": "set_max_resolution",
    "max_seq_len": "set_max_seq_len",
}


@dataclass
class Stage:
    """One training stage: from global step ``start_step`` until the next stage starts (or training ends).

    - ``mixture``: ``{source: weight}`` over the DataModule's ``sources`` (sources left out get 0).
    - ``max_resolution``: the maximum image resolution (longest edge, pixels).
    - ``max_seq_len``: the packed row length (per-source ``max_seq_len`` still caps each document).
    - ``policy``: what each component trains (``TrainingPolicy``); adapters of the previous stage are
      merged into their layers at the boundary.
    - ``lr``, ``schedule``, ``warmup_steps``, ``min_lr``: if any is set, a new schedule starts at
      ``start_step`` and ends when the stage does (unset ones: the ``VLMModule``'s arguments);
      otherwise the schedule in effect continues (one cosine over several stages).
    """

    start_step: int
    name: str | None = None
    mixture: dict[str, float] | None = None
    max_resolution: int | None = None
    max_seq_len: int | None = None
    policy: TrainingPolicy | None = None
    lr: float | None = None
    schedule: Schedule | None = None
    warmup_steps: int | None = None
    min_lr: float | None = None

    def sets_schedule(self) -> bool:
        return any(getattr(self, name) is not None for name in _SCHEDULE_FIELDS)


class StageTransition(Callback):
    """Switch the training stage at the ``start_step`` of each of ``stages`` (see ``Stage``).

    Needs ``VLMModule`` (``set_policy``, ``set_lr_schedule``) and, for the data fields,
    ``VLMDataModule`` (``set_mixture_weights``, ``set_max_resolution``, ``set_max_seq_len``).
    """

    def __init__(self, stages: list[Stage]) -> None:
        stages = [Stage(**s) if isinstance(s, dict) else s for s in stages]
        starts = [s.start_step for s in stages]
        if not stages or starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(
                f"stages need strictly increasing start_step values, the first 0; got start_step {starts}."
            )
        self.stages = stages
        self.stage_index: int | None = None  # the stage applied (checkpointed)

    def stage_at(self, step: int) -> int:
        """Index of the stage in effect at global step ``step``."""
        return bisect.bisect_right([s.start_step for s in self.stages], step) - 1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check(trainer, pl_module)
        # Before configure_model and the train loader: the first stage's policy, schedule and data.
        # A resumed run then restores the checkpoint's (policy, schedule, data settings, stage index).
        self._apply(trainer, pl_module, 0, built=False)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._follow(trainer, pl_module)  # a resumed checkpoint may predate the stage's start

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._follow(trainer, pl_module)

    def _follow(self, trainer: Trainer, pl_module: LightningModule) -> None:
        index = self.stage_at(trainer.global_step)
        if index != self.stage_index and self._apply(trainer, pl_module, index, built=True):
            restart_train_stream(trainer)

    def settings_at(self, index: int) -> dict[str, Any]:
        """What is in effect in stage ``index``: the last value each field was set to by then, and under
        ``"schedule"`` the index of the stage whose learning-rate schedule runs."""
        settings: dict[str, Any] = {}
        for i, stage in enumerate(self.stages[: index + 1]):
            values = {field: getattr(stage, field) for field in (*_DATA_FIELDS, "policy")}
            settings.update({field: value for field, value in values.items() if value is not None})
            if stage.sets_schedule():
                settings["schedule"] = i
        return settings

    def _apply(self, trainer: Trainer, pl_module: LightningModule, index: int, built: bool) -> bool:
        """Make stage ``index`` the one in effect (only what differs from the stage applied before);
        returns whether the data pipeline changed."""
        new = self.settings_at(index)
        old = {} if self.stage_index is None else self.settings_at(self.stage_index)
        changed = [f for f in _DATA_FIELDS if f in new and new[f] != old.get(f)]
        for field in changed:
            getattr(trainer.datamodule, _DATA_FIELDS[field])(new[field])
        if "schedule" in new and new["schedule"] != old.get("schedule"):
            pl_module.set_lr_schedule(self._schedule(pl_module, new["schedule"]))
        policy = new.get("policy")
        if policy is not None and policy != pl_module.policy:
            if pl_module.model is None:
                pl_module.policy = dataclasses.replace(policy)  # configure_model applies it
            else:
                pl_module.set_policy(policy)
                if built:
                    self._rebuild_optimizer(trainer, pl_module)
        self.stage_index = index
        return bool(changed)

    def _schedule(self, pl_module: LightningModule, index: int) -> LRSchedule:
        """The schedule that stage ``index`` starts; it runs until a later stage starts another."""
        stage, hparams = self.stages[index], pl_module.hparams
        fields = {name: getattr(stage, name) for name in _SCHEDULE_FIELDS}
        fields = {name: hparams[name] if value is None else value for name, value in fields.items()}
        later = [s.start_step for s in self.stages[index + 1 :] if s.sets_schedule()]
        end = later[0] if later else hparams.max_steps
        return LRSchedule(**fields, start_step=stage.start_step, end_step=end)

    @staticmethod
    def _rebuild_optimizer(trainer: Trainer, pl_module: LightningModule) -> None:
        """A new optimizer (and scheduler) over the new trainable parameters; DDP re-wrapped first,
        as it records which parameters need gradients when it wraps the model."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = pl_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name in ("set_policy", "set_lr_schedule"):
            if not hasattr(pl_module, name):
                raise TypeError(f"StageTransition needs a LightningModule with {name} (VLMModule).")
        for field, method in _DATA_FIELDS.items():
            used = any(getattr(s, field) is not None for s in self.stages)
            if used and not hasattr(trainer.datamodule, method):
                raise TypeError(f"A stage sets {field}: StageTransition needs a datamodule with {method}.")
        policies = [s.policy for s in self.stages[1:] if s.policy is not None]
        if isinstance(trainer.strategy, ModelParallelStrategy) and policies:
            raise ValueError(
                "A later stage changes the training policy, which FSDP2 (ModelParallelStrategy) cannot do "
                "in a running fit: the parameters were sharded when the model was built. Set the policy on "
                "the first stage only and run each policy as its own fit from the previous checkpoint "
                "(--ckpt_path), or use DDP."
            )
        last = pl_module.hparams.max_steps or trainer.max_steps
        if last is not None and last > 0 and self.stages[-1].start_step >= last:
            raise ValueError(
                f"The last stage starts at step {self.stages[-1].start_step}, not before the end of training "
                f"({last} steps): raise trainer.max_steps or move the stage."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"stage_index": self.stage_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage_index = state_dict["stage_index"]
