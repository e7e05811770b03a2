"""``VLMModule``: the LightningModule that trains, fine-tunes and validates a VisionLanguageModel.

Every argument is a plain typed value, so LightningCLI builds it from YAML (``--model.fusion
cross_attention``, ``--model.policy.language_model dora``). The network is built in
``configure_model`` (once; Lightning calls it again on restore), so strategies can shard it at
init and ``torch.device("meta")`` builds it without memory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.hooks import RemovableHandle
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_modules.optim import LRSchedule, Schedule, param_groups
from lit_modules.policy import TrainingPolicy, apply_policy, merge_adapters, new_token_rows
from lit_modules.sharding import checkpoint_blocks, compile_decoder_blocks, shard, train_rows_sharded
from vlm.config import (
    ConnectorConfig,
    CrossAttentionConfig,
    Fusion,
    LanguageConfig,
    Recipe,
    VisionConfig,
    VLMConfig,
    get_preset,
)
from vlm.evaluation.batch import PromptBatch, generation_inputs
from vlm.evaluation.scoring import PromptScorer, held_out_accuracy
from vlm.generation import GenerationSettings, generate_answers
from vlm.hf import config_from_transformers
from vlm.hf import from_transformers as convert_from_transformers
from vlm.language_model import TINY_TOKENIZER, load_tokenizer, resolve_path
from vlm.model import VisionLanguageModel
from vlm.processing import ProcessorSettings
from vlm.processing.contract import DEFAULT_PRESET, preset_recipe

FORWARD_KEYS = frozenset(inspect.signature(VisionLanguageModel.forward).parameters) - {"self"}

# The hyper-parameters saved in checkpoints hold these dataclasses: let Lightning's weights-only
# checkpoint loading (the default of torch >= 2.6) accept them.
torch.serialization.add_safe_globals(
    [
        TrainingPolicy,
        LRSchedule,
        VLMConfig,
        VisionConfig,
        ConnectorConfig,
        LanguageConfig,
        CrossAttentionConfig,
        GenerationSettings,
    ]
)


class VLMModule(LightningModule):
    """Train a VisionLanguageModel with a per-component policy (frozen / full / LoRA / DoRA).

    Model:
      - ``model``: a preset name of ``vlm.config.PRESETS`` or a full ``VLMConfig``;
        ``fusion`` overrides its fusion.
      - ``tokenizer``: ``"tiny"`` (the offline test tokenizer), a local path (``~`` and ``${VAR}``
        expanded) or hub name, or ``None`` (no tokenizer: the special tokens get the ids after the
        configured vocabulary, as in the released Idefics vocabularies; no ``val/acc``). It must be
        the data's tokenizer (the data takes it: ``processor_settings``).
      - ``from_transformers``: local path of a transformers Idefics2/Idefics3 checkpoint, converted
        with ``vlm.hf.from_transformers`` (``model`` then only gives the ``cross_attention`` settings
        of ``fusion="cross_attention"``, which adds freshly initialised blocks). Set ``tokenizer``
        to the same path (or ``None``).
      - ``recipe``: the processing the model is trained with (``idefics2`` / ``idefics3`` prompt layout
        and image splitting); ``None``: the ``from_transformers`` checkpoint's family, else the preset's
        (``idefics3*`` presets: idefics3); a ``VLMConfig`` alone fixes none (the data's, else idefics2).
      - ``image_shape``: (height, width) in pixels of the images the model sees when the recipe does not
        cut them into square tiles (idefics2): it fixes the visual tokens per image of connectors that
        keep the patch grid (``mlp``, ``linear``, ``pixel_shuffle``; the demo's 32 x 48 images);
        ``None``: the tower's ``image_size`` square.
    Training: ``policy`` (``TrainingPolicy``); AdamW (``lr``, ``weight_decay``, ``betas``,
    ``eps``, ``lr_multipliers`` per component) with a warmup + ``schedule`` to ``min_lr`` at
    ``max_steps`` (default: the trainer's ``estimated_stepping_batches``); a stage transition replaces
    the policy (``set_policy``) and the schedule (``set_lr_schedule``). A step whose loss is
    not finite is skipped (counted in ``train/nonfinite_steps``); ``max_nonfinite_steps``
    consecutive ones stop the run. Validation: ``val/loss`` on batches with ``labels``; prompt
    batches (``vlm.evaluation.batch.PromptBatch``) are answered and scored by ``prompt_scorer``:
    ``val/acc`` or the DataModule's own (see ``validation_step``). Prediction (``predict_step``,
    ``python -m lightning predict``): answers decoded with ``predict_generation``
    (``vlm.generation.GenerationSettings``: greedy by default).
    Scale: ``activation_checkpointing`` recomputes each block's activations in backward (any
    strategy); ``compile_blocks`` compiles each decoder layer with ``torch.compile`` (regional: one
    compile serves every layer; ``lit_modules.sharding.compile_decoder_blocks``); bf16 comes from the
    trainer's ``precision: bf16-mixed`` (or ``fsdp_mixed_precision`` under FSDP2). Under Lightning's
    ``ModelParallelStrategy`` the model is sharded with FSDP2, block by block
    (``lit_modules.sharding``); ``fsdp_mixed_precision`` then computes in bf16 with fp32 gradient
    reduction and fp32 sharded weights.
    Checkpoints hold the trainable weights (adapters included), the policy and schedule in effect, and
    the frozen weights unless they are still as loaded from a path (``from_transformers``,
    ``vision.pretrained``, ``language.pretrained``; embedding tables always kept): those are read from
    the path again on resume, not duplicated in every checkpoint, unless ``save_frozen_weights``.
    """

    def __init__(
        self,
        model: str | VLMConfig = DEFAULT_PRESET,
        fusion: Fusion | None = None,
        tokenizer: str | None = TINY_TOKENIZER,
        from_transformers: str | None = None,
        recipe: Recipe | None = None,
        image_shape: tuple[int, int] | None = None,
        policy: TrainingPolicy | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_multipliers: dict[str, float] | None = None,
        schedule: Schedule = "cosine",
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        max_steps: int | None = None,
        max_nonfinite_steps: int = 10,
        val_max_new_tokens: int = 8,
        predict_generation: GenerationSettings | None = None,
        activation_checkpointing: bool = False,
        compile_blocks: bool = False,
        fsdp_mixed_precision: bool = False,
        save_frozen_weights: bool = False,
    ) -> None:
        super().__init__()
        # Not predict_generation: `lightning predict --ckpt_path` replaces the model's arguments by the
        # checkpoint's hyper-parameters, and the decoding is chosen when predicting, not when training.
        self.save_hyperparameters(ignore=["predict_generation"])
        self.config = get_preset(model) if isinstance(model, str) else copy.deepcopy(model)
        if fusion is not None:
            self.config.fusion = fusion
        self.policy = copy.deepcopy(policy) if policy is not None else TrainingPolicy()
        self.lr_schedule = LRSchedule(lr, schedule, warmup_steps, min_lr, end_step=max_steps)
        self.predict_generation = copy.deepcopy(predict_generation) or GenerationSettings()
        self.model: VisionLanguageModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._row_hooks: list[RemovableHandle] = []
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0
        self._skip_backward = False
        self.prompt_scorer: PromptScorer | None = None  # of the current validation run
        self._weights_from_path: set[int] = set()  # ids of parameters as loaded from a path, unchanged

    # --- model ----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer named by ``tokenizer`` (loaded on first use; ``None`` if none)."""
        name = self.hparams.tokenizer
        if self._tokenizer is None and name is not None:
            self._tokenizer = load_tokenizer(name)
        return self._tokenizer

    def processor_settings(self, tile_size: int | None = None) -> ProcessorSettings:
        """The processing this model is built for (the model-data contract, ``vlm.processing.contract``):
        its tokenizer, recipe (``None``: not fixed by the model), fusion and visual tokens per ``tile_size``
        px square tile (the data's tiles, idefics3 recipe) or, without one, per ``image_shape`` image.
        Derived from the config without building the model (a ``from_transformers`` checkpoint's config
        is read)."""
        hparams = self.hparams
        config, recipe = self.config, hparams.recipe
        if hparams.from_transformers is not None:
            hf_config = AutoConfig.from_pretrained(resolve_path(hparams.from_transformers))
            recipe = recipe or hf_config.model_type  # "idefics2" or "idefics3"
            if self.model is None:  # self.config becomes the checkpoint's when the model is built
                converted = config_from_transformers(hf_config)
                config = dataclasses.replace(converted, fusion=hparams.fusion or converted.fusion)
        elif isinstance(hparams.model, str):
            recipe = recipe or preset_recipe(hparams.model)
        tile = hparams.image_shape if tile_size is None else (tile_size, tile_size)
        return ProcessorSettings.of(config, hparams.tokenizer, recipe, tile)

    def configure_model(self) -> None:
        """Build the network and apply the training policy, once (a no-op when already built); then
        activation checkpointing and, under ``ModelParallelStrategy`` (a device mesh), FSDP2 sharding."""
        if self.model is not None:
            return
        if self.hparams.fsdp_mixed_precision and self.device_mesh is None:
            raise ValueError(
                "fsdp_mixed_precision needs ModelParallelStrategy (FSDP2); with another strategy use the "
                "trainer's precision='bf16-mixed'."
            )
        self.model = self._build().train()  # from_pretrained parts come in eval mode (dropout off)
        self._weights_from_path = self._parameters_from_path()
        self._row_hooks = apply_policy(self.model, self.policy)
        if self.hparams.compile_blocks:
            compile_decoder_blocks(self.model)
        if self.hparams.activation_checkpointing:
            checkpoint_blocks(self.model)
        if self.device_mesh is not None:
            shard(self.model, self.device_mesh["data_parallel"], self.hparams.fsdp_mixed_precision)
            self._row_hooks = train_rows_sharded(*new_token_rows(self.model, self.policy))

    def _build(self) -> VisionLanguageModel:
        path = self.hparams.from_transformers
        if path is None:
            return VisionLanguageModel(self.config, self.tokenizer)
        model = convert_from_transformers(AutoModelForImageTextToText.from_pretrained(resolve_path(path)))
        cross_attention = self.config.cross_attention
        self.config = model.config
        if self.hparams.fusion in (None, model.config.fusion):
            return model
        self.config = dataclasses.replace(
            model.config, fusion=self.hparams.fusion, cross_attention=cross_attention
        )
        fused = VisionLanguageModel(self.config).to(dtype=next(model.parameters()).dtype)
        missing, unexpected = fused.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not key.startswith("cross_attention.") for key in missing):
            raise RuntimeError(
                f"Checkpoint does not fit the model: missing {missing}, unexpected {unexpected}."
            )
        return fused

    def _parameters_from_path(self) -> set[int]:
        """Ids of the parameters loaded from a path (``from_transformers``, ``vision.pretrained``,
        ``language.pretrained``), embedding tables excepted (special tokens may have resized them)."""
        model = self.model
        if self.hparams.from_transformers is not None:
            components = [model.vision_tower, model.connector, model.language_model]
        else:
            pretrained = {
                "vision_tower": self.config.vision.pretrained,
                "language_model": self.config.language.pretrained,
            }
            components = [getattr(model, name) for name, path in pretrained.items() if path]
        lm = model.language_model
        tables = [m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None]
        embedding_ids = {id(p) for table in tables for p in table.parameters()}
        return {id(p) for component in components for p in component.parameters()} - embedding_ids

    def _merge(self) -> int:
        """Merge the adapters; the merged base weights no longer equal the ones loaded from a path."""
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                self._weights_from_path -= {id(p) for p in module.get_base_layer().parameters()}
        return merge_adapters(self.model)

    def set_policy(self, policy: TrainingPolicy) -> None:
        """Switch the training policy (a stage boundary): merge the adapters in place, then apply
        ``policy``. The caller must rebuild the optimizer (``trainer.strategy.setup_optimizers``)."""
        for hook in self._row_hooks:
            hook.remove()
        self._merge()
        self.policy = copy.deepcopy(policy)
        self._row_hooks = apply_policy(self.model, self.policy)

    def set_lr_schedule(self, schedule: LRSchedule) -> None:
        """Follow ``schedule`` (a stage boundary; checkpointed). During a fit the optimizer's learning
        rates are updated at once, so the next step already uses it."""
        self.lr_schedule = copy.deepcopy(schedule)
        if self._trainer is not None and self.trainer.optimizers:
            factor = self.lr_factor()
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.hparams.lr * group["lr_scale"] * factor

    def lr_factor(self) -> float:
        """The current learning rate of the schedule over ``lr`` (the ``LambdaLR`` factor of every group)."""
        last_step = self.hparams.max_steps or self.trainer.estimated_stepping_batches
        if last_step == float("inf"):
            raise ValueError("Set model.max_steps or trainer.max_steps: the schedule needs a finite length.")
        return self.lr_schedule.lr_at(self.trainer.global_step, int(last_step)) / self.hparams.lr

    def merge_adapters(self) -> int:
        """Merge LoRA/DoRA adapters into their layers in place (outputs unchanged, adapter parameters
        gone); returns how many layers were merged."""
        return self._merge()

    def forward(self, **batch: Any):
        """``VisionLanguageModel.forward`` on the batch keys it accepts (e.g. not ``answers``)."""
        return self.model(**{key: value for key, value in batch.items() if key in FORWARD_KEYS})

    # --- steps ----------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed torch's RNG from (seed, global step, micro-batch, rank) before each training batch, so the
        random draws of a step (LoRA dropout, NEFTune noise) are the same whether or not the run was
        resumed in between. The seed is ``seed_everything``'s (``PL_GLOBAL_SEED``; 0 if unset)."""
        trainer = self.trainer
        micro_batch = batch_idx % trainer.accumulate_grad_batches
        seed = os.environ.get("PL_GLOBAL_SEED", "0")
        key = f"{seed}-{trainer.global_step}-{micro_batch}-{trainer.global_rank}"
        torch.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self(**batch, return_logits=False).loss  # the loss without the batch's logits (vlm.loss)
        batch_size = batch["input_ids"].shape[0]
        self._skip_backward = not self._finite_on_every_rank(loss)
        if self._skip_backward:
            return self._skip_nonfinite(loss, batch_idx)
        self.consecutive_nonfinite = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        group = self.optimizers().param_groups[0]
        self.log("train/lr", group["lr"] / group["lr_scale"], batch_size=batch_size)
        return loss

    def _finite_on_every_rank(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank: under DDP/FSDP one all-reduce of a flag, so that all
        ranks skip the same steps (a rank skipping alone would hang the gradient collectives)."""
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite)

    def _skip_nonfinite(self, loss: Tensor, batch_idx: int) -> Tensor | None:
        """Skip a step whose loss is not finite on some rank (no backward, no weight update) rather than
        corrupt the weights; raise after ``max_nonfinite_steps`` in a row (on every rank alike).

        One process returns ``None`` (Lightning then runs no backward). Lightning refuses ``None`` with
        several processes, so there the detached loss is returned and ``backward`` does nothing. Either
        way the batch adds no gradient: without gradient accumulation the optimizer step finds none
        (cleared at the start of the step) and changes no weight.
        """
        self.consecutive_nonfinite += 1
        self.total_nonfinite += 1
        self.log("train/nonfinite_steps", float(self.total_nonfinite))
        if self.consecutive_nonfinite >= self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"The training loss was not finite (on this rank: {loss.item()}) for "
                f"{self.consecutive_nonfinite} steps in a row (last at global step {self.global_step}, batch "
                f"{batch_idx}). Lower the learning rate, use bf16 rather than fp16, check the data, or raise "
                "max_nonfinite_steps."
            )
        return None if self.trainer.world_size == 1 else loss.detach()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, except for a step skipped by ``_skip_nonfinite``."""
        if not self._skip_backward:
            super().backward(loss, *args, **kwargs)

    def on_validation_epoch_start(self) -> None:
        """Choose how prompt batches are scored, unless a callback did: the DataModule's
        ``prompt_scorer()`` if it has one (``EvalDataModule``), else ``held_out_accuracy`` (``val/acc``)."""
        if self.prompt_scorer is None:
            make = getattr(self.trainer.datamodule, "prompt_scorer", held_out_accuracy)
            self.prompt_scorer = make()
        self.prompt_scorer.to(self.device)

    def validation_step(self, batch: dict[str, Any] | PromptBatch, batch_idx: int) -> None:
        """``val/loss`` when the batch has ``labels``; a prompt batch (``prompt_*`` inputs, left padded)
        is answered by ``generate_answers`` (greedy, ``val_max_new_tokens`` tokens, stopping at eos /
        ``<end_of_utterance>``) and scored by ``prompt_scorer`` (``vlm.evaluation.scoring``)."""
        if "labels" in batch:
            loss = self(**batch, return_logits=False).loss
            self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        if "prompt_input_ids" in batch and self.tokenizer is not None:
            self.prompt_scorer(batch, self.generate_answers)

    def on_validation_epoch_end(self) -> None:
        """Log the prompt score (``prompt_scorer.name``: ``val/acc``, ``eval/<benchmark>/<metric>``)."""
        scorer, self.prompt_scorer = self.prompt_scorer, None
        if scorer is not None and scorer.records:
            self.log(scorer.name, scorer.compute(), prog_bar=True)

    def generate_answers(
        self, batch: dict[str, Any] | PromptBatch, settings: GenerationSettings | None = None
    ) -> list[str]:
        """Answers (decoded, special tokens dropped) to the batch's ``prompt_*`` tensors, decoded with
        ``settings`` (default: greedy, ``val_max_new_tokens``)."""
        if settings is None:
            settings = GenerationSettings(max_new_tokens=self.hparams.val_max_new_tokens)
        return generate_answers(self.model, self.tokenizer, generation_inputs(batch), settings)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, str]]:
        """One record per question of a prediction batch (``datamodules.held_out``):
        ``id`` (the record's key in its shard, e.g. a question file's ``id``), ``shard`` (the shard's name
        relative to the source's root), ``prompt`` (the question), ``answer`` (decoded with
        ``predict_generation``) and, when the source has one, the ``reference`` answer."""
        if self.tokenizer is None:
            raise ValueError("Prediction decodes answers with the tokenizer: set model.tokenizer.")
        answers = self.generate_answers(batch, self.predict_generation)
        records = []
        rows = zip(batch["ids"], batch["questions"], answers, batch["references"])
        for key, question, answer, references in rows:
            shard, _, record_id = key.partition("#")  # sample keys are "<shard name>#<record key>"
            record = {"id": record_id, "shard": shard, "prompt": question, "answer": answer}
            if references and references[0]:
                record["reference"] = references[0]
            records.append(record)
        return records

    # --- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.model, hp.lr, hp.weight_decay, hp.lr_multipliers)
        for group in groups:
            group["lr_scale"] = group["lr"] / hp.lr
        optimizer = AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
        # The factor reads the global step, not the scheduler's counter: the same after a resume or a
        # stage transition's new optimizer.
        scheduler = LambdaLR(optimizer, lambda _: self.lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the policy in effect (the state-dict keys depend on it: adapters) and the schedule."""
        checkpoint["training_policy"] = dataclasses.asdict(self.policy)
        checkpoint["lr_schedule"] = dataclasses.asdict(self.lr_schedule)
        omitted = self._omitted_weights()
        if omitted:
            for name in omitted:
                del checkpoint["state_dict"][name]
            checkpoint["omitted_weights"] = {"keys": omitted, "sources": self._weight_sources()}

    def _omitted_weights(self) -> list[str]:
        """State-dict keys a checkpoint leaves out: frozen weights still as loaded from a path, unless
        ``save_frozen_weights`` (or FSDP2, whose sharded checkpoints are saved whole)."""
        if self.hparams.save_frozen_weights or self.device_mesh is not None:
            return []
        return sorted(
            name
            for name, param in self.named_parameters()
            if not param.requires_grad and id(param) in self._weights_from_path
        )

    def _weight_sources(self) -> dict[str, str | None]:
        return {
            "from_transformers": self.hparams.from_transformers,
            "vision": self.config.vision.pretrained,
            "language": self.config.language.pretrained,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights are loaded, give the model the adapters of the checkpoint's policy (it
        differs from ``policy`` after a stage transition), so every key matches; and its schedule."""
        if "lr_schedule" in checkpoint:
            self.lr_schedule = LRSchedule(**checkpoint["lr_schedule"])
        omitted = checkpoint.get("omitted_weights")
        if omitted is not None and self.model is not None:
            self._restore_omitted(checkpoint, omitted)
        saved = checkpoint.get("training_policy")
        if saved is not None and self.model is not None and TrainingPolicy(**saved) != self.policy:
            self.set_policy(TrainingPolicy(**saved))

    def _restore_omitted(self, checkpoint: dict[str, Any], omitted: dict[str, Any]) -> None:
        """Put the frozen weights the checkpoint left out back into its state dict, from this model
        (just loaded from the same paths), so the weights load with every key present."""
        if omitted["sources"] != self._weight_sources():
            raise ValueError(
                f"The checkpoint left out frozen weights loaded from {omitted['sources']}, but this model "
                f"loads {self._weight_sources()}: use the same from_transformers / vision.pretrained / "
                "language.pretrained paths to resume (or save checkpoints with save_frozen_weights=True)."
            )
        params = dict(self.named_parameters())
        missing = [name for name in omitted["keys"] if name not in params]
        if missing:
            raise KeyError(f"Frozen weights left out of the checkpoint are not in the model: {missing[:5]}.")
        for name in omitted["keys"]:
            checkpoint["state_dict"][name] = params[name].detach()
