"""The data side of the model-data contract (``vlm.processing.contract``): a data module whose
``VLMProcessor`` follows its model.

``ModelProcessing`` gives a LightningDataModule (``VLMDataModule``, ``EvalDataModule``) its ``processor``,
``connect(model)`` and a ``setup`` that connects the trainer's LightningModule: the tokenizer, recipe,
fusion and visual tokens per tile are the model's; the module's own ``tokenizer`` / ``recipe`` /
``image_seq_len`` / ``fusion`` arguments, when set, are checked against them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from vlm.config import Fusion, Recipe
from vlm.processing import ProcessorSettings, VLMProcessor
from vlm.processing.contract import ProcessingModel, connect, default_settings


class ModelProcessing:
    """Mixin of a LightningDataModule that builds its ``VLMProcessor`` from its model's settings.

    The data module calls ``processor_settings_given`` in ``__init__``; ``image_options`` (its
    ``ImageProcessor`` arguments but the recipe) may be overridden. Without a connected model, the set
    values and, for the others, ``VLMModule()``'s (``default_settings``) are used.
    """

    given_settings: dict[str, Any]
    settings: ProcessorSettings | None
    image_processor_options: dict[str, Any]

    def processor_settings_given(
        self,
        tokenizer: str | None,
        recipe: Recipe | None,
        image_seq_len: int | None,
        fusion: Fusion | None,
        image_processor: dict[str, Any] | None,
    ) -> None:
        """Keep the data module's own settings (``None``: the model's) and image processor arguments."""
        self.given_settings = {"tokenizer": tokenizer, "recipe": recipe, "image_seq_len": image_seq_len}
        self.given_settings["fusion"] = fusion
        self.settings = None
        self.image_processor_options = dict(image_processor or {})

    def image_options(self) -> dict[str, Any]:
        """``ImageProcessor`` arguments of the processor, but the recipe."""
        return self.image_processor_options

    @cached_property
    def processor(self) -> VLMProcessor:
        """The ``VLMProcessor`` of the connected model's settings (tokenizer loaded on first use)."""
        settings = self.settings or default_settings().given(self.given_settings)
        return settings.processor(self.image_options())

    def connect(self, model: ProcessingModel) -> None:
        """Take the processor settings of ``model`` (a ``VLMModule``: its ``processor_settings``), checked
        against the ones set here; also without a trainer. Kept in the hyper-parameters (checkpoints)."""
        self.settings = connect(model, self.image_processor_options, self.given_settings)
        self.hparams.update({key: getattr(self.settings, key) for key in self.given_settings})
        self.__dict__.pop("processor", None)  # built again with these settings

    def setup(self, stage: str) -> None:
        """Connect the trainer's LightningModule, if it states its processor settings."""
        module = None if self.trainer is None else self.trainer.lightning_module
        if self.settings is None and hasattr(module, "processor_settings"):
            self.connect(module)
