"""VLMProcessor: text and images in, the tensors ``VisionLanguageModel.forward`` takes out.

For the same tokenizer and settings it gives the ``input_ids``, ``attention_mask``,
``pixel_values`` and ``pixel_attention_mask`` of transformers' ``Idefics2Processor`` /
``Idefics3Processor`` (``image_layout="transformers"``), faster, and by default in a flat layout
without padding images: all tiles of the batch in one tensor plus ``tiles_per_sample``. It takes
their everyday arguments (``return_tensors="pt"``, ``padding``, ``truncation``, ``max_length``, flat
or nested images), and has their ``apply_chat_template``, ``decode`` / ``batch_decode`` and
``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping, Sequence
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, Idefics2Processor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm.config import IMAGE_TOKEN, RECIPE_SPECIAL_TOKENS, Fusion, Recipe
from vlm.language_model import add_special_tokens, load_tokenizer
from vlm.processing.image import ImageProcessor, ProcessedImages, load_image
from vlm.processing.text import (
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
#: The file ``VLMProcessor.save_pretrained`` writes next to the tokenizer's files.
PROCESSOR_CONFIG = "vlm_processor.json"


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
        return build_processor(
            processor.tokenizer,
            ImageProcessor.from_transformers(processor.image_processor),
            processor.image_seq_len,
            pil_rgb_inputs=isinstance(processor, Idefics2Processor),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> VLMProcessor:
        """The processor ``save_pretrained`` wrote to ``path``; any other folder or hub id is read by
        transformers' ``AutoProcessor`` (e.g. ``"HuggingFaceM4/idefics2-8b"``, with ``kwargs``) and
        converted by ``from_transformers``."""
        config_file = Path(path) / PROCESSOR_CONFIG
        if not config_file.is_file():
            return cls.from_transformers(AutoProcessor.from_pretrained(path, **kwargs))
        config = json.loads(config_file.read_text())
        image_processor = ImageProcessor.from_dict(config.pop("image_processor"))
        return build_processor(AutoTokenizer.from_pretrained(path, **kwargs), image_processor, **config)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer and the processor settings (``PROCESSOR_CONFIG``) to the folder ``path``,
        for ``from_pretrained``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        config = {
            "image_processor": self.image_processor.to_dict(),
            "image_seq_len": self.image_seq_len,
            "fusion": self.fusion,
            "pil_rgb_inputs": self.pil_rgb_inputs,
        }
        (Path(path) / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @property
    def recipe(self) -> Recipe:
        """``"idefics2"`` or ``"idefics3"``: how images are split and written in the text."""
        return self.image_processor.recipe

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImagesInput | None = None,
        *,
        return_tensors: str = "pt",
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: Literal["left", "right"] | None = None,
        image_layout: ImageLayoutChoice = "flat",
        return_labels: bool = False,
        training: bool = False,
        rng: random.Random | None = None,
        **unsupported: Any,
    ) -> BatchFeature:
        """Tokenize ``text`` with each ``<image>`` expanded for its image, and process ``images``
        (one image, a flat list split over the texts by their ``<image>`` counts, or one list per text).

        Returns ``input_ids``, ``attention_mask`` and, with images, ``pixel_values`` and
        ``pixel_attention_mask``: with ``image_layout="flat"`` all tiles as (n_tiles, 3, H, W) plus
        ``tiles_per_sample`` and ``tiles_per_image``; with ``"transformers"`` exactly transformers'
        keys, (batch, max_tiles, 3, H, W) with all-zero padding images. ``padding``, ``truncation``
        and ``max_length`` are the tokenizer's (padding defaults to the longest text); a truncation
        that would cut image tokens raises. Tensors are PyTorch's (``return_tensors="pt"``).
        ``return_labels`` adds pretraining labels (no loss on padding and image tokens). ``training``
        enables the image processor's training-time options.
        """
        _reject_unsupported("__call__", unsupported)
        if return_tensors != "pt":
            raise ValueError(
                f"return_tensors={return_tensors!r} is not supported: VLMProcessor returns PyTorch tensors, "
                "pass return_tensors='pt' (or leave it out)."
            )
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
            truncate = {"truncation": truncation, "max_length": max_length}
            output.update(self._tokenize(expanded, padding, padding_side, **truncate))
            self._check_image_tokens(expanded, output["input_ids"], max_length)
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

    def apply_chat_template(
        self,
        conversation: Sequence[Message] | Sequence[Sequence[Message]],
        add_generation_prompt: bool = False,
        *,
        tokenize: bool = False,
        return_dict: bool = False,
        **call_kwargs: Any,
    ) -> str | list[str] | torch.Tensor | BatchFeature:
        """A conversation (or a batch of them) in the Idefics chat format, like transformers'
        ``processor.apply_chat_template``: the text with ``<image>`` placeholders unexpanded, or with
        ``tokenize=True`` its ``input_ids`` (all the processor outputs with ``return_dict=True``).

        To tokenize, each ``{"type": "image"}`` item holds its image under ``"image"``, ``"path"`` or
        ``"url"`` (a PIL image, encoded bytes or a file); ``call_kwargs`` (``padding``,
        ``max_length``...) go to ``__call__``.
        """
        batched = bool(conversation) and not isinstance(conversation[0], Mapping)
        conversations = list(conversation) if batched else [conversation]
        texts = [apply_chat_template(messages, add_generation_prompt) for messages in conversations]
        if not tokenize:
            _reject_unsupported("apply_chat_template", call_kwargs)
            return texts if batched else texts[0]
        images = [_chat_images(messages) for messages in conversations]
        output = self(text=texts, images=images if any(images) else None, **call_kwargs)
        return output if return_dict else output["input_ids"]

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

    def _check_image_tokens(self, texts: list[str], input_ids: torch.Tensor, max_length: int | None) -> None:
        """Raise when the tokenized ``texts`` lost image tokens (a truncation through an image)."""
        kept = (input_ids == self.image_token_id).sum(1).tolist()
        for index, (text, count) in enumerate(zip(texts, kept)):
            if count != text.count(IMAGE_TOKEN):
                raise ValueError(
                    f"Truncation to max_length={max_length} cuts the image tokens of text {index} "
                    f"({count} of {text.count(IMAGE_TOKEN)} kept): raise max_length, shorten the text, "
                    "or pass fewer or smaller images."
                )

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


def build_processor(
    tokenizer: str | PreTrainedTokenizerBase,
    image_processor: ImageProcessor | Mapping[str, Any],
    image_seq_len: int,
    fusion: Fusion = "autoregressive",
    **options: Any,
) -> VLMProcessor:
    """The one way a ``VLMProcessor`` is made from settings: ``tokenizer`` is a tokenizer or a name for
    ``vlm.language_model.load_tokenizer`` (``"tiny"``, a path, a hub name), ``image_processor`` an
    ``ImageProcessor`` or its keyword arguments (``recipe`` included); ``options``: ``pil_rgb_inputs``,
    ``max_image_tokens_per_sample``."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(image_processor, ImageProcessor):
        image_processor = ImageProcessor(**image_processor)
    return VLMProcessor(tokenizer, image_processor, image_seq_len, fusion=fusion, **options)


def _reject_unsupported(method: str, unsupported: dict[str, Any]) -> None:
    """A transformers-style keyword this processor does not take fails, named, instead of being ignored."""
    if unsupported:
        raise TypeError(
            f"VLMProcessor.{method} does not support the keyword argument(s) {sorted(unsupported)}. "
            "Image settings (do_image_splitting, size, ...) are the ImageProcessor's: build the "
            "VLMProcessor with ImageProcessor(...) or VLMProcessor.from_transformers(processor)."
        )


def _chat_images(messages: Sequence[Message]) -> list[ImageSource]:
    """The images of a conversation's ``{"type": "image"}`` items, in order, to tokenize it."""
    images = []
    for number, message in enumerate(messages):
        content = message["content"]
        for item in [] if isinstance(content, str) else content:
            if item.get("type") != "image":
                continue
            source = next((item[key] for key in ("image", "path", "url") if item.get(key) is not None), None)
            if source is None:
                raise ValueError(
                    f"Message {number} has an image item without its image: give it an 'image', 'path' "
                    "or 'url' to tokenize, or call apply_chat_template(tokenize=False) and pass the "
                    "images to the processor."
                )
            images.append(source)
    return images
