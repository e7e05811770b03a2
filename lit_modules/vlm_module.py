"""``VLMModule``: the LightningModule that trains, fine-tunes and validates a VisionLanguageModel.

Every argument is a plain typed value, so LightningCLI builds it from YAML (``--model.fusion
cross_attention``, ``--model.policy.language_model dora``). The network is built in
``configure_model`` (once; Lightning calls it again on restore), so strategies can shard it at
init and ``torch.device("meta")`` builds it without memory.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.hooks import RemovableHandle
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_modules.optim import Schedule, lr_lambda, param_groups
from lit_modules.policy import TrainingPolicy, apply_policy, merge_adapters
from vlm.config import (
    END_OF_UTTERANCE_TOKEN,
    ConnectorConfig,
    CrossAttentionConfig,
    LanguageConfig,
    VisionConfig,
    VLMConfig,
    get_preset,
)
from vlm.hf import from_transformers as convert_from_transformers
from vlm.model import VisionLanguageModel
from vlm.processing import load_tiny_tokenizer

Fusion = Literal["autoregressive", "cross_attention"]
FORWARD_KEYS = frozenset(inspect.signature(VisionLanguageModel.forward).parameters) - {"self"}
GENERATE_KEYS = frozenset(inspect.signature(VisionLanguageModel.generate).parameters) - {"self"}
PROMPT_PREFIX = "prompt_"

# The hyper-parameters saved in checkpoints hold these dataclasses: let Lightning's weights-only
# checkpoint loading (the default of torch >= 2.6) accept them.
torch.serialization.add_safe_globals(
    [TrainingPolicy, VLMConfig, VisionConfig, ConnectorConfig, LanguageConfig, CrossAttentionConfig]
)


def normalize_answer(text: str) -> str:
    """Exact-match normalisation of ``val/acc``: surrounding whitespace stripped, lower case."""
    return text.strip().lower()


class VLMModule(LightningModule):
    """Train a VisionLanguageModel with a per-component policy (frozen / full / LoRA / DoRA).

    Model:
      - ``model``: a preset name of ``vlm.config.PRESETS`` or a full ``VLMConfig``;
        ``fusion`` overrides its fusion.
      - ``tokenizer``: ``"tiny"`` (the offline test tokenizer), a local path, or ``None`` (no
        tokenizer: the special tokens get the ids after the configured vocabulary, as in the
        released Idefics vocabularies; no ``val/acc``). It must be the data's tokenizer.
      - ``from_transformers``: local path of a transformers Idefics2/Idefics3 checkpoint, converted
        with ``vlm.hf.from_transformers`` (``model`` then only gives the ``cross_attention`` settings
        of ``fusion="cross_attention"``, which adds freshly initialised blocks). Set ``tokenizer``
        to the same path (or ``None``).
    Training: ``policy`` (``TrainingPolicy``); AdamW (``lr``, ``weight_decay``, ``betas``,
    ``eps``, ``lr_multipliers`` per component) with a warmup + ``schedule`` to ``min_lr`` at
    ``max_steps`` (default: the trainer's ``estimated_stepping_batches``). A step whose loss is
    not finite is skipped (counted in ``train/nonfinite_steps``); ``max_nonfinite_steps``
    consecutive ones stop the run. Validation: ``val/loss`` on batches with ``labels``,
    ``val/acc`` on batches with ``answers`` (see ``validation_step``).
    Checkpoints hold the whole state dict (frozen weights, adapters) and the policy in effect.
    """

    def __init__(
        self,
        model: str | VLMConfig = "idefics2-tiny",
        fusion: Fusion | None = None,
        tokenizer: str | None = "tiny",
        from_transformers: str | None = None,
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = get_preset(model) if isinstance(model, str) else copy.deepcopy(model)
        if fusion is not None:
            self.config.fusion = fusion
        self.policy = copy.deepcopy(policy) if policy is not None else TrainingPolicy()
        self.model: VisionLanguageModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._row_hooks: list[RemovableHandle] = []
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0

    # --- model ----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer named by ``tokenizer`` (loaded on first use; ``None`` if none)."""
        name = self.hparams.tokenizer
        if self._tokenizer is None and name is not None:
            self._tokenizer = load_tiny_tokenizer() if name == "tiny" else AutoTokenizer.from_pretrained(name)
        return self._tokenizer

    def configure_model(self) -> None:
        """Build the network and apply the training policy, once (a no-op when already built)."""
        if self.model is not None:
            return
        self.model = self._build()
        self._row_hooks = apply_policy(self.model, self.policy)

    def _build(self) -> VisionLanguageModel:
        path = self.hparams.from_transformers
        if path is None:
            return VisionLanguageModel(self.config, self.tokenizer)
        model = convert_from_transformers(AutoModelForImageTextToText.from_pretrained(path))
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

    def set_policy(self, policy: TrainingPolicy) -> None:
        """Switch the training policy (a stage boundary): merge the adapters in place, then apply
        ``policy``. The caller must rebuild the optimizer (``trainer.strategy.setup_optimizers``)."""
        for hook in self._row_hooks:
            hook.remove()
        merge_adapters(self.model)
        self.policy = copy.deepcopy(policy)
        self._row_hooks = apply_policy(self.model, self.policy)

    def merge_adapters(self) -> int:
        """Merge LoRA/DoRA adapters into their layers in place (outputs unchanged, adapter parameters
        gone); returns how many layers were merged."""
        return merge_adapters(self.model)

    def forward(self, **batch: Any):
        """``VisionLanguageModel.forward`` on the batch keys it accepts (e.g. not ``answers``)."""
        return self.model(**{key: value for key, value in batch.items() if key in FORWARD_KEYS})

    # --- steps ----------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self(**batch).loss
        batch_size = batch["input_ids"].shape[0]
        if not torch.isfinite(loss):
            return self._skip_nonfinite(loss, batch_idx)
        self.consecutive_nonfinite = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        group = self.optimizers().param_groups[0]
        self.log("train/lr", group["lr"] / group["lr_scale"], batch_size=batch_size)
        return loss

    def _skip_nonfinite(self, loss: Tensor, batch_idx: int) -> None:
        """Skip a step whose loss is not finite (no backward, no weight update) rather than corrupt the
        weights; raise after ``max_nonfinite_steps`` in a row. With DDP every rank must agree (a rank
        that skips alone would hang the gradient all-reduce): this guard is meant for one process or
        losses that go bad on every rank."""
        self.consecutive_nonfinite += 1
        self.total_nonfinite += 1
        self.log("train/nonfinite_steps", float(self.total_nonfinite))
        if self.consecutive_nonfinite >= self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"The training loss was not finite ({loss.item()}) for {self.consecutive_nonfinite} steps in "
                f"a row (last at global step {self.global_step}, batch {batch_idx}). Lower the learning "
                "rate, use bf16 rather than fp16, check the data, or raise max_nonfinite_steps."
            )
        return None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``val/loss`` when the batch has ``labels``; ``val/acc`` when it has ``answers``.

        Generation-based accuracy reads ``answers`` (list[str], one per row) and the prompt tensors
        under the ``prompt_`` prefix: ``prompt_input_ids`` and ``prompt_attention_mask`` (left
        padded), and as needed ``prompt_pixel_values``, ``prompt_pixel_attention_mask``,
        ``prompt_tiles_per_sample``, ``prompt_tiles_per_image`` (the ``generate`` arguments). Greedy
        decoding of ``val_max_new_tokens`` tokens, stopping at eos / ``<end_of_utterance>``; the
        decoded text and the answer must be equal after ``normalize_answer``.
        """
        if "labels" in batch:
            loss = self(**batch).loss
            self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        if "answers" in batch and self.tokenizer is not None:
            predictions = self.generate_answers(batch)
            hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, batch["answers"])]
            acc = torch.tensor(sum(hits) / len(hits), device=self.device)
            self.log("val/acc", acc, prog_bar=True, batch_size=len(hits), sync_dist=True)

    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers (decoded, special tokens dropped) to the batch's ``prompt_*`` tensors."""
        inputs = {
            key[len(PROMPT_PREFIX) :]: value
            for key, value in batch.items()
            if key.startswith(PROMPT_PREFIX) and key[len(PROMPT_PREFIX) :] in GENERATE_KEYS
        }
        tokenizer = self.tokenizer
        stop_ids = [tokenizer.eos_token_id, self.model.special_token_ids.get(END_OF_UTTERANCE_TOKEN)]
        sequences = self.model.generate(
            **inputs,
            max_new_tokens=self.hparams.val_max_new_tokens,
            eos_token_id=[i for i in stop_ids if i is not None],
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    # --- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.model, hp.lr, hp.weight_decay, hp.lr_multipliers)
        for group in groups:
            group["lr_scale"] = group["lr"] / hp.lr
        optimizer = AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)
        max_steps = hp.max_steps or self.trainer.estimated_stepping_batches
        if max_steps == float("inf"):
            raise ValueError("Set model.max_steps or trainer.max_steps: the schedule needs a finite length.")
        schedule = lr_lambda(hp.schedule, hp.warmup_steps, int(max_steps), hp.min_lr / hp.lr)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # --- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the policy in effect: the state-dict keys depend on it (adapters)."""
        checkpoint["training_policy"] = dataclasses.asdict(self.policy)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights are loaded, give the model the adapters of the checkpoint's policy (it
        differs from ``policy`` after a stage transition), so every key matches."""
        saved = checkpoint.get("training_policy")
        if saved is not None and self.model is not None and TrainingPolicy(**saved) != self.policy:
            self.set_policy(TrainingPolicy(**saved))
