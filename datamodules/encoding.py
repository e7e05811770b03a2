"""``SampleEncoder``: a ``Sample`` of any source -> a ``packing.TokenizedDocument`` (ids, labels, tiles).

Two formats, chosen per source (``mode``):

- ``pretraining`` (OBELICS documents, LAION-COCO pairs, PDFA/IDL pages, RenderedText): ``content``
  becomes one text with an ``<image>`` per image in reading order, joined as m4 does
  (docs/DATA_FORMATS.md §1, ``split_pack_and_pad_webdocs``): text right after an image is appended
  without a separator, text after text with a space. A PDF/OCR page is its image then its text.
  Labels: every token but image placeholders (a ``VLMProcessor`` called with ``return_labels=True``); an eos
  closes the document.
- ``sft`` (The Cauldron, Docmatix, text-only, m4 SFT tars): ``turns`` in the Idefics chat format
  (``VLMProcessor.encode_conversations``), the images before the first question, loss on the
  answers only; with ``shuffle_turns`` the (question, answer) pairs are shuffled (Idefics2 §4.2).

Each sample's ``meta["max_image_resolution"]`` (set by ``MixtureStream``) caps the image
processor's ``longest_edge`` for that sample. Random choices (turn order, image splitting,
up-scaling) are seeded by ``(seed, sample.key)``, so an encoding never depends on where it runs
(a resumed or re-sharded run encodes every sample as the original run did) nor on where the data
is stored (keys name shards relative to their root, ``sources.shard_names``). Data problems (image
count mismatch, image tokens written in the text, an image budget that cannot be met) return
``None`` and are counted in ``stats`` by reason.
"""

from __future__ import annotations

import copy
import dataclasses
import random

from PIL import Image

from datamodules.packing import TokenizedDocument
from datamodules.sample import Sample
from datamodules.sources.base import RecordStats
from vlm.config import IMAGE_TOKEN
from vlm.processing import ImageProcessor, VLMProcessor
from vlm.processing.text import IMAGE_PLACEHOLDER_TOKENS, LabelMode, shuffle_turns, turns_to_messages

CONVERSATION_SOURCES = frozenset({"cauldron", "docmatix", "text", "m4_sft"})


def default_mode(source: str) -> LabelMode:
    """``sft`` for the conversation sources, ``pretraining`` for the others."""
    return "sft" if source in CONVERSATION_SOURCES else "pretraining"


def join_content(content: list[str | Image.Image]) -> str:
    """m4's joining of interleaved content: ``<image>`` per image, text glued to a preceding image,
    a space between consecutive texts."""
    text, previous_is_text = "", False
    for item in content:
        if isinstance(item, Image.Image):
            text += IMAGE_TOKEN
            previous_is_text = False
        else:
            text += f" {item}" if previous_is_text else item
            previous_is_text = True
    return text


def _has_placeholder(text: str) -> bool:
    return any(token in text for token in IMAGE_PLACEHOLDER_TOKENS)


class SampleEncoder:
    """Callable ``Sample -> TokenizedDocument | None`` for ``PackedStream`` (``None``: skipped, counted in
    ``stats``).

    ``modes`` overrides the per-source format (``default_mode``); ``training`` enables the image
    processor's training-time options (split fraction, random up-scaling) and ``shuffle_turns``
    the shuffling of conversation turns.
    """

    def __init__(
        self,
        processor: VLMProcessor,
        *,
        modes: dict[str, LabelMode] | None = None,
        training: bool = True,
        shuffle_turns: bool = False,
        seed: int = 0,
    ) -> None:
        self.processor, self.modes = processor, dict(modes or {})
        self.training, self.shuffle_turns, self.seed = training, shuffle_turns, seed
        self.stats = RecordStats()
        self._by_resolution: dict[int, VLMProcessor] = {}

    def set_max_resolution(self, longest_edge: int) -> None:
        """Change the image processor's ``longest_edge`` (the maximum resolution; resolution ramp-up)."""
        image_processor = dataclasses.replace(self.processor.image_processor, longest_edge=longest_edge)
        self.processor = self._with_image_processor(image_processor)
        self._by_resolution.clear()

    def __call__(self, sample: Sample) -> TokenizedDocument | None:
        mode = self.modes.get(sample.source) or default_mode(sample.source)
        if mode not in ("pretraining", "sft"):
            raise ValueError(
                f"Unknown mode {mode!r} for source {sample.source!r}; use 'pretraining' or 'sft'."
            )
        processor = self._processor_for(sample.meta.get("max_image_resolution"))
        rng = random.Random(f"encode-{self.seed}-{sample.key}")
        reason = self._problem(sample, mode)
        if reason is None:
            try:
                doc = (
                    self._sft(processor, sample, rng)
                    if mode == "sft"
                    else self._pretraining(processor, sample, rng)
                )
            except ValueError:  # the processor's data checks, e.g. an image budget that cannot be met
                reason = "encoding_error"
        if reason is not None:
            self.stats.skip(reason)
            return None
        self.stats.ok()
        return doc

    def _problem(self, sample: Sample, mode: LabelMode) -> str | None:
        """Why ``sample`` cannot be encoded (a skip reason), or ``None``."""
        if mode == "pretraining":
            if any(isinstance(item, str) and _has_placeholder(item) for item in sample.content):
                return "image_token_in_text"
            return None
        if not sample.turns:
            return "no_turns"
        texts = [text for turn in sample.turns for text in turn]
        if any(_has_placeholder(text.replace(IMAGE_TOKEN, "")) for text in texts):
            return "image_token_in_text"
        placeholders = sum(text.count(IMAGE_TOKEN) for text in texts)
        if placeholders not in (0, len(sample.images)) or any(IMAGE_TOKEN in a for _, a in sample.turns):
            return "image_count_mismatch"
        return None

    def _pretraining(self, processor: VLMProcessor, sample: Sample, rng: random.Random) -> TokenizedDocument:
        images = sample.images
        out = processor(
            join_content(sample.content),
            [images] if images else None,
            padding=False,
            return_labels=True,
            training=self.training,
            rng=rng,
        )
        eos = processor.tokenizer.eos_token_id
        return self._document(out, extra=[eos])

    def _sft(self, processor: VLMProcessor, sample: Sample, rng: random.Random) -> TokenizedDocument:
        images = sample.images
        turns = list(sample.turns)
        if images and not any(IMAGE_TOKEN in user for user, _ in turns):
            turns[0] = (IMAGE_TOKEN * len(images) + turns[0][0], turns[0][1])
        if self.shuffle_turns and self.training:
            turns = shuffle_turns(turns, rng)
        out = processor.encode_conversations(
            [turns_to_messages(turns)], [images] if images else None, training=self.training, rng=rng
        )
        return self._document(out)

    @staticmethod
    def _document(out: dict, extra: list[int] | None = None) -> TokenizedDocument:
        """The ``TokenizedDocument`` of a one-sample processor output; ``extra`` tokens (eos) appended with
        loss."""
        input_ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
        if extra:
            input_ids, labels = input_ids + extra, labels + extra
        has_images = "pixel_values" in out
        return TokenizedDocument(
            input_ids,
            labels,
            out["pixel_values"] if has_images else None,
            out["pixel_attention_mask"] if has_images else None,
            out["tiles_per_image"].tolist() if has_images else [],
        )

    def _processor_for(self, max_resolution: int | None) -> VLMProcessor:
        """The processor with ``longest_edge`` capped at ``max_resolution`` (cached per resolution)."""
        if max_resolution is None or max_resolution >= self.processor.image_processor.longest_edge:
            return self.processor
        if max_resolution not in self._by_resolution:
            image_processor = dataclasses.replace(self.processor.image_processor, longest_edge=max_resolution)
            self._by_resolution[max_resolution] = self._with_image_processor(image_processor)
        return self._by_resolution[max_resolution]

    def _with_image_processor(self, image_processor: ImageProcessor) -> VLMProcessor:
        """A shallow copy of the processor (same tokenizer) with another image processor."""
        processor = copy.copy(self.processor)
        processor.image_processor = image_processor
        return processor
