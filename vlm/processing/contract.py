"""The model-data contract: the processing a model was built for, which its data must use.

A model fixes four processing settings: its ``tokenizer`` (the special tokens' ids), the ``recipe``
(Idefics2 or Idefics3 prompt layout and image splitting), the ``fusion`` (expanded ``<image>`` tokens
or one marker per image) and ``image_seq_len``, the visual tokens per tile, derived from the model
config (``vlm.connectors.visual_tokens_per_tile``), never written by hand. ``VLMModule`` exposes them
(``processor_settings``); a data module takes them (``VLMDataModule.connect``), so a config states each
of them once, on the model side. A data-side value that is given anyway must equal the model's
(``ProcessorSettings.check``), or the run stops at start naming both keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm.config import Fusion, Recipe, VLMConfig, get_preset
from vlm.connectors import visual_tokens_per_tile
from vlm.language_model import TINY_TOKENIZER
from vlm.processing.image import ImageProcessor
from vlm.processing.processor import VLMProcessor, build_processor


def preset_recipe(preset: str) -> Recipe:
    """The recipe a ``vlm.config`` preset was released with: ``idefics3*`` -> idefics3, else idefics2."""
    return "idefics3" if preset.startswith("idefics3") else "idefics2"


@dataclass(frozen=True)
class ProcessorSettings:
    """What a model's ``VLMProcessor`` must be: ``tokenizer`` (a ``load_tokenizer`` name, or ``None``:
    the model has none), ``recipe`` (``None``: any), ``image_seq_len`` (visual tokens per tile) and
    ``fusion``. ``origin`` says where ``image_seq_len`` comes from, for error messages."""

    tokenizer: str | None
    recipe: Recipe | None
    image_seq_len: int
    fusion: Fusion = "autoregressive"
    origin: str = "the model"

    @classmethod
    def of(
        cls,
        config: VLMConfig,
        tokenizer: str | None,
        recipe: Recipe | None,
        tile: tuple[int, int] | None = None,
    ) -> ProcessorSettings:
        """The settings of a model of ``config`` seeing tiles of ``tile`` (height, width) pixels
        (default: its tower's ``image_size`` square)."""
        height, width = tile or (config.vision.image_size,) * 2
        origin = (
            f"connector {config.connector.type!r}, {config.vision.patch_size} px patches, "
            f"{height}x{width} px tiles"
        )
        tokens = visual_tokens_per_tile(config, (height, width))
        return cls(tokenizer, recipe, tokens, config.fusion, origin)

    def check(self, given: Mapping[str, Any], prefix: str = "data.init_args") -> ProcessorSettings:
        """These settings, after checking that each value the data side set (``given``: ``{key: value}``,
        ``None`` = unset) equals the model's; a difference raises a ``ValueError`` naming both keys."""
        for key, value in given.items():
            mine = getattr(self, key)
            if value is None or mine is None or value == mine:
                continue
            if key == "image_seq_len":
                model = f"the model ({self.origin}) makes {mine} visual tokens per tile"
            else:
                model = f"the model has model.init_args.{key}={mine!r}"
            raise ValueError(
                f"{prefix}.{key}={value!r} but {model}: leave {prefix}.{key} unset (null) to take the "
                "model's, or change the model."
            )
        return self.given(given)

    def given(self, values: Mapping[str, Any]) -> ProcessorSettings:
        """These settings with the set (not ``None``) ``values`` in place of theirs, unchecked."""
        return replace(self, **{key: value for key, value in values.items() if value is not None})

    def processor(
        self, image_processor: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
    ) -> VLMProcessor:
        """The ``VLMProcessor`` of these settings and the ``image_processor`` options (``ImageProcessor``
        arguments but the recipe); ``tokenizer``: one already loaded, else ``self.tokenizer`` is."""
        options = {"recipe": self.recipe, **image_processor}
        return build_processor(tokenizer or self.tokenizer, options, self.image_seq_len, fusion=self.fusion)


class ProcessingModel(Protocol):
    """What states its processor settings: ``VLMModule``."""

    def processor_settings(self, tile_size: int | None = None) -> ProcessorSettings: ...


def connect(
    model: ProcessingModel,
    image_processor: Mapping[str, Any],
    given: Mapping[str, Any],
    prefix: str = "data.init_args",
) -> ProcessorSettings:
    """The settings a data module with ``image_processor`` options and its own ``given`` values (``None``:
    unset) must use with ``model``: the model's, checked against ``given``; the recipe is the model's, else
    the data's, else idefics2. With the idefics3 recipe the visual tokens are counted per tile of the
    data's ``tile_size``."""
    settings = model.processor_settings()
    recipe = settings.recipe or given.get("recipe") or "idefics2"
    if recipe == "idefics3":
        settings = model.processor_settings(image_processor.get("tile_size", ImageProcessor.tile_size))
    return replace(settings.check(given, prefix), recipe=recipe)


#: The preset of ``VLMModule``'s default model.
DEFAULT_PRESET = "idefics2-tiny"


def default_settings() -> ProcessorSettings:
    """The settings of ``VLMModule()``'s model (``DEFAULT_PRESET``, tiny tokenizer): what a data module
    that no model was connected to uses for the keys it leaves unset."""
    return ProcessorSettings.of(get_preset(DEFAULT_PRESET), TINY_TOKENIZER, preset_recipe(DEFAULT_PRESET))
