"""VLMProcessor: text and images in, the tensors ``VisionLanguageModel.forward`` takes out.

For the same tokenizer and settings it gives the ``input_ids``, ``attention_mask``,
``pixel_values`` and ``pixel_attention_mask`` of transformers' ``Idefics2Processor`` /
``Idefics3Processor`` (``image_layout="transformers"``), faster, and by default in a flat layout
without padding images: all tiles of the batch in one tensor plus ``tiles_per_sample``.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from itertools import accumulate, pairwise
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, Idefics2Processor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm.config import IMAGE_TOKEN, RECIPE_SPECIAL_TOKENS
from vlm.language_model import add_special_tokens
from vlm.processing.image import ImageProcessor, ProcessedImages, load_image
from vlm.processing.text import (
    Fusion,
    Message,
    apply_chat_template,
    build_labels,
    expand_image_tokens,
    image_placeholder_token_ids,
    render_conversation,
)

ImageSource = Image.Image | bytes | str | os.PathLike
ImagesInput = ImageSource | Sequence[ImageSource] | Sequence[Sequence[ImageSource]]
ImageLayoutChoice = Literal["flat", "transformers"]


def _is_image(item: object) -> bool:
    return isinstance(item, Image.Image | bytes | str | os.PathLike)


def _images_per_sample(images: ImagesInput | None, texts: list[str] | None) -> list[list[Image.Image]] | None:
    """Group images by sample (a single image, a flat list split by each text's ``<image>`` count as
    transformers does, or one list per sample), decoding encoded bytes and file paths."""
    if images is None:
        return None
    if _is_image(images):
        images = [images]
    images = list(images)
    if images and all(_is_image(item) for item in images):
        images = [load_image(item) for item in images]
        if texts is None:
            return [images]
        counts = [text.count(IMAGE_TOKEN) for text in texts]
        if sum(counts) != len(images):
            raise ValueError(
                f"The texts hold {sum(counts)} {IMAGE_TOKEN} placeholders in all but {len(images)} images "
                f"were given; each {IMAGE_TOKEN} needs one image (or pass one list of images per text)."
            )
        bounds = list(accumulate([0, *counts]))
        return [images[start:end] for start, end in pairwise(bounds)]
    if not all(isinstance(sample, Sequence) and all(map(_is_image, sample)) for sample in images):
        raise TypeError(
            "images must be an image (PIL image, encoded bytes or file path), a list of images, or one "
            "list of images per text."
        )
    grouped = [[load_image(item) for item in sample] for sample in images]
    if texts is not None and len(grouped) != len(texts):
        raise ValueError(
            f"Got {len(texts)} texts but {len(grouped)} lists of images: give one list per text."
        )
    return grouped


#: The processor outputs a generation call takes (``VisionLanguageModel.generate``'s tensor arguments).
GENERATION_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "pixel_attention_mask",
    "tiles_per_sample",
    "tiles_per_image",
)


def prompt_inputs(encoded: Any) -> dict[str, Any]:
    """The generation inputs of an encoded (left-padded) prompt batch under the ``prompt_`` prefix, the
    layout of generation batches (``VLMModule.generate_answers`` reads it), next to training keys."""
    return {f"prompt_{key}": encoded[key] for key in GENERATION_INPUTS if key in encoded}


class VLMProcessor:
    """Tokenizer + ``ImageProcessor`` for Idefics2/Idefics3-style models (any transformers tokenizer).

    ``image_seq_len`` is the number of visual tokens per tile the model makes (Idefics2: perceiver
    latents, 64; Idefics3: 169 for 364px tiles and pixel shuffle 2). With ``fusion="cross_attention"``
    each image stays one ``<image>`` marker in the text. Missing special tokens
    (``<fake_token_around_image>``, ``<image>``, ``<end_of_utterance>``) are added to the tokenizer.
    ``pil_rgb_inputs`` reproduces ``Idefics2Processor``, which passes every image through EXIF
    transposition and PIL's ``convert("RGB")`` (alpha dropped, not composited on white) before
    its image processor; otherwise the image processor's ``to_rgb`` conversion applies.
    ``max_image_tokens_per_sample`` caps a sample's visual tokens (tiles x ``image_seq_len``): the
    image processor lowers that sample's resolution until it fits (its ``max_tiles_per_sample``).
    Images may be PIL images, encoded bytes or file paths (decoded by ``load_image``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        image_seq_len: int,
        fusion: Fusion = "autoregressive",
        pil_rgb_inputs: bool = False,
        max_image_tokens_per_sample: int | None = None,
    ) -> None:
        if max_image_tokens_per_sample is not None:
            max_tiles = max_image_tokens_per_sample // image_seq_len
            if max_tiles < 1:
                raise ValueError(
                    f"max_image_tokens_per_sample={max_image_tokens_per_sample} is less than one tile "
                    f"(image_seq_len={image_seq_len} tokens): raise it to at least {image_seq_len}."
                )
            if image_processor.max_tiles_per_sample is not None:
                max_tiles = min(max_tiles, image_processor.max_tiles_per_sample)
            image_processor = dataclasses.replace(image_processor, max_tiles_per_sample=max_tiles)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.fusion = fusion
        self.pil_rgb_inputs = pil_rgb_inputs
        self.special_token_ids = add_special_tokens(tokenizer, RECIPE_SPECIAL_TOKENS)
        self.image_token_id = self.special_token_ids[IMAGE_TOKEN]

    @classmethod
    def from_transformers(cls, processor: Any) -> VLMProcessor:
        """The equivalent of a transformers ``Idefics2Processor`` / ``Idefics3Processor`` (its tokenizer,
        image settings and image sequence length): how to start from a released model's processor."""
        return cls(
            processor.tokenizer,
            ImageProcessor.from_transformers(processor.image_processor),
            image_seq_len=processor.image_seq_len,
            pil_rgb_inputs=isinstance(processor, Idefics2Processor),
        )

    @property
    def recipe(self) -> Literal["idefics2", "idefics3"]:
        return self.image_processor.recipe

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImagesInput | None = None,
        *,
        padding: bool | str = True,
        padding_side: Literal["left", "right"] | None = None,
        image_layout: ImageLayoutChoice = "flat",
        return_labels: bool = False,
        training: bool = False,
        rng: random.Random | None = None,
    ) -> BatchFeature:
        """Tokenize ``text`` with each ``<image>`` expanded for its image, and process ``images``.

        Returns ``input_ids``, ``attention_mask`` and, with images, ``pixel_values`` and
        ``pixel_attention_mask``: with ``image_layout="flat"`` all tiles as (n_tiles, 3, H, W) plus
        ``tiles_per_sample`` and ``tiles_per_image``; with ``"transformers"`` exactly transformers'
        keys, (batch, max_tiles, 3, H, W) with all-zero padding images. ``return_labels`` adds
        pretraining labels (no loss on padding and image tokens). ``training`` enables the image
        processor's training-time options.
        """
        if text is None and images is None:
            raise ValueError("Pass text=..., images=... or both.")
        texts = [text] if isinstance(text, str) else None if text is None else list(text)
        processed = self._process_images(images, texts, training, rng)
        output: dict[str, Any] = {}
        if texts is not None:
            if processed is None:
                layouts: list[list[Any]] = [[] for _ in texts]
            else:
                layouts = processed.layouts
            expanded = [
                expand_image_tokens(sample, sample_layouts, self.recipe, self.image_seq_len, self.fusion)
                for sample, sample_layouts in zip(texts, layouts)
            ]
            output.update(self._tokenize(expanded, padding, padding_side))
            if return_labels:
                output["labels"] = build_labels(
                    output["input_ids"], output["attention_mask"], image_placeholder_token_ids(self.tokenizer)
                )
        if processed is not None:
            output.update(self._image_tensors(processed, image_layout))
        return BatchFeature(output)

    def encode_conversations(
        self,
        conversations: Sequence[Sequence[Message]],
        images: ImagesInput | None = None,
        *,
        add_generation_prompt: bool = False,
        padding_side: Literal["left", "right"] | None = None,
        image_layout: ImageLayoutChoice = "flat",
        training: bool = False,
        rng: random.Random | None = None,
    ) -> BatchFeature:
        """Chat-formatted batch with SFT labels: loss only on the assistant answers and their
        ``<end_of_utterance>``. ``images`` as in ``__call__``, matched to the ``{"type": "image"}``
        items of each conversation in order."""
        texts = [apply_chat_template(messages) for messages in conversations]
        processed = self._process_images(images, texts, training, rng)
        rendered = [
            render_conversation(
                messages,
                add_generation_prompt=add_generation_prompt,
                layouts=[] if processed is None else processed.layouts[i],
                recipe=self.recipe,
                image_seq_len=self.image_seq_len,
                fusion=self.fusion,
            )
            for i, messages in enumerate(conversations)
        ]
        encoded = self._tokenize([r.text for r in rendered], True, padding_side, return_offsets_mapping=True)
        output: dict[str, Any] = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": build_labels(
                encoded["input_ids"],
                encoded["attention_mask"],
                image_placeholder_token_ids(self.tokenizer),
                mode="sft",
                offset_mapping=encoded["offset_mapping"],
                answer_spans=[r.answer_spans for r in rendered],
            ),
        }
        if processed is not None:
            output.update(self._image_tensors(processed, image_layout))
        return BatchFeature(output)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text in the Idefics chat format, ``<image>`` placeholders unexpanded."""
        return apply_chat_template(messages, add_generation_prompt)

    def decode(self, token_ids: torch.Tensor | Sequence[int], **kwargs: Any) -> str:
        """Text of one sequence of token ids (``tokenizer.decode`` arguments apply)."""
        return self.tokenizer.decode(token_ids, **kwargs)

    def batch_decode(self, sequences: torch.Tensor | Sequence[Sequence[int]], **kwargs: Any) -> list[str]:
        """Texts of a batch of token-id sequences."""
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def _process_images(
        self, images: ImagesInput | None, texts: list[str] | None, training: bool, rng: random.Random | None
    ) -> ProcessedImages | None:
        grouped = _images_per_sample(images, texts)
        if grouped is None:
            return None
        if self.pil_rgb_inputs:
            grouped = [
                [ImageOps.exif_transpose(image).convert("RGB") for image in sample] for sample in grouped
            ]
        return self.image_processor(grouped, training=training, rng=rng)

    def _tokenize(
        self, texts: list[str], padding: bool | str, padding_side: str | None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        return dict(self.tokenizer(texts, padding=padding, return_tensors="pt", **kwargs))

    @staticmethod
    def _image_tensors(processed: ProcessedImages, layout: ImageLayoutChoice) -> dict[str, torch.Tensor]:
        if layout == "transformers":
            pixel_values, pixel_attention_mask = processed.to_transformers()
            return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}
        if layout != "flat":
            raise ValueError(f"Unknown image_layout {layout!r}; choose 'flat' or 'transformers'.")
        tiles_per_image = [layout.n_tiles for sample in processed.layouts for layout in sample]
        return {
            "pixel_values": processed.pixel_values,
            "pixel_attention_mask": processed.pixel_attention_mask,
            "tiles_per_sample": torch.tensor(processed.tiles_per_sample, dtype=torch.long),
            "tiles_per_image": torch.tensor(tiles_per_image, dtype=torch.long),
        }
