"""Text side of Idefics2/Idefics3 processing: image-token expansion, chat template, labels, turn shuffling.

The strings built here are exactly those of transformers' ``Idefics2Processor`` /
``Idefics3Processor`` (tested), so token ids match the released models. The image side
(``vlm.processing.image``) decides how each image is split; this module only needs, per image, an
object with ``rows``, ``cols`` (Idefics3 tile grid, ``0, 0`` = not split) and ``n_tiles``
(Idefics2: 5 when split into 4 crops + the original, else 1).
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from vlm.config import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, Fusion, Recipe

Message = Mapping[str, Any]

MAX_TILE_GRID = 6  # Idefics3 splits an image into at most 6 x 6 tiles, each tagged <row_r_col_c>


def tile_tag(row: int, col: int) -> str:
    """The Idefics3 tag that precedes the tokens of tile (``row``, ``col``), both counted from 1."""
    return f"<row_{row}_col_{col}>"


TILE_TAGS = tuple(tile_tag(r, c) for r in range(1, MAX_TILE_GRID + 1) for c in range(1, MAX_TILE_GRID + 1))
# Every token that stands for (part of) an image rather than text. They get no loss: the model
# cannot predict them from text, and their positions are fixed by the processor anyway.
IMAGE_PLACEHOLDER_TOKENS = (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, *TILE_TAGS)

# The chat template released with HuggingFaceM4/idefics2-8b (Idefics3 uses the same format).
IDEFICS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ASSISTANT_PREFIX = "Assistant:"  # how the template opens an assistant turn (and the generation prompt)


class ImageLayoutLike(Protocol):
    """How one image was split, as far as the text needs it (``vlm.processing.image`` provides it)."""

    @property
    def rows(self) -> int: ...

    @property
    def cols(self) -> int: ...

    @property
    def n_tiles(self) -> int: ...


# --- image-token expansion ------------------------------------------------------------------


def image_prompt(layout: ImageLayoutLike, recipe: Recipe, image_seq_len: int) -> str:
    """The string that replaces one ``<image>`` placeholder (before Idefics2's merge rules)."""
    image_tokens = IMAGE_TOKEN * image_seq_len
    if recipe == "idefics2":
        return f"{FAKE_IMAGE_TOKEN}{image_tokens}{FAKE_IMAGE_TOKEN}" * layout.n_tiles
    if recipe != "idefics3":
        raise ValueError(f"Unknown recipe {recipe!r}; expected 'idefics2' or 'idefics3'.")
    global_image = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_tokens}{FAKE_IMAGE_TOKEN}"
    if layout.rows == 0 and layout.cols == 0:
        return global_image
    tile_rows = (
        "".join(f"{FAKE_IMAGE_TOKEN}{tile_tag(r, c)}{image_tokens}" for c in range(1, layout.cols + 1)) + "\n"
        for r in range(1, layout.rows + 1)
    )
    return "".join(tile_rows) + "\n" + global_image


_CLOSING_FAKE_TOKEN = re.compile(rf"{re.escape(FAKE_IMAGE_TOKEN)}(?=[^\s<])")


def _check_image_count(n_placeholders: int, n_images: int) -> None:
    if n_placeholders != n_images:
        raise ValueError(
            f"The text has {n_placeholders} {IMAGE_TOKEN} placeholder(s) but {n_images} image(s) were given: "
            f"each {IMAGE_TOKEN} in the text needs exactly one image."
        )


def expand_image_tokens(
    text: str,
    layouts: Sequence[ImageLayoutLike],
    recipe: Recipe,
    image_seq_len: int,
    fusion: Fusion = "autoregressive",
) -> str:
    """Replace the i-th ``<image>`` of ``text`` by the tokens of image i, as transformers does.

    Autoregressive fusion puts every visual token in the sequence: Idefics2 wraps each tile's
    ``image_seq_len`` tokens in ``<fake_token_around_image>`` (merging the doubled fake tokens of
    adjacent tiles/images, and adding a space after a closing fake token glued to a word);
    Idefics3 writes tagged tiles row by row, then the global image. Cross-attention fusion keeps
    a single ``<image>`` marker per image (the visual tokens enter through cross-attention).
    """
    pieces = text.split(IMAGE_TOKEN)
    _check_image_count(len(pieces) - 1, len(layouts))
    if fusion == "cross_attention":
        return text
    if fusion != "autoregressive":
        raise ValueError(f"Unknown fusion {fusion!r}; expected 'autoregressive' or 'cross_attention'.")
    expanded = pieces[0] + "".join(
        image_prompt(layout, recipe, image_seq_len) + piece for layout, piece in zip(layouts, pieces[1:])
    )
    if recipe == "idefics2":
        expanded = expanded.replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)
        expanded = _CLOSING_FAKE_TOKEN.sub(f"{FAKE_IMAGE_TOKEN} ", expanded)
    return expanded


# --- chat template --------------------------------------------------------------------------


def _with_content_list(message: Message) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {**message, "content": content}


def apply_chat_template(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Render a conversation in the Idefics format (``User:<image>Q<end_of_utterance>\\nAssistant: A...``).

    ``messages`` are transformers chat messages; ``content`` is a list of ``{"type": "image"}`` /
    ``{"type": "text", "text": ...}`` items or a plain string. Rendered by transformers' own
    sandboxed Jinja renderer, so the result equals ``processor.apply_chat_template(...)``.
    """
    conversation = [_with_content_list(message) for message in messages]
    rendered, _ = render_jinja_template(
        [conversation], chat_template=IDEFICS_CHAT_TEMPLATE, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


@dataclass(frozen=True)
class RenderedConversation:
    """A rendered (and possibly image-expanded) conversation with the character span of each answer.

    ``answer_spans[i]`` covers the i-th assistant answer from just after ``Assistant:`` (so the
    space that starts the answer is in it) through its ``<end_of_utterance>``.
    """

    text: str
    answer_spans: tuple[tuple[int, int], ...]


def render_conversation(
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    layouts: Sequence[ImageLayoutLike] | None = None,
    recipe: Recipe = "idefics2",
    image_seq_len: int = 64,
    fusion: Fusion = "autoregressive",
) -> RenderedConversation:
    """Render ``messages`` with the chat template, expand their images and locate the answers.

    Without ``layouts`` the ``<image>`` placeholders stay unexpanded. The template renders each
    message on its own, so rendering (and expanding) message by message gives the same text as
    rendering the whole conversation, and each answer's span is known exactly.
    """
    chunks = [apply_chat_template([message]) for message in messages]
    if layouts is not None:
        _check_image_count(sum(chunk.count(IMAGE_TOKEN) for chunk in chunks), len(layouts))
        remaining = list(layouts)
        for i, chunk in enumerate(chunks):
            n_images = chunk.count(IMAGE_TOKEN)
            chunks[i] = expand_image_tokens(chunk, remaining[:n_images], recipe, image_seq_len, fusion)
            del remaining[:n_images]
    spans, start = [], 0
    for message, chunk in zip(messages, chunks):
        if message["role"] == "assistant":
            # The chunk is "Assistant:" + answer + "<end_of_utterance>\n".
            spans.append((start + len(ASSISTANT_PREFIX), start + len(chunk) - 1))
        start += len(chunk)
    if add_generation_prompt:
        chunks.append(apply_chat_template([], add_generation_prompt=True))
    return RenderedConversation("".join(chunks), tuple(spans))


def turns_to_messages(turns: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Chat messages from (user, assistant) string turns; ``<image>`` in a user text becomes an image item."""
    messages = []
    for user, assistant in turns:
        content: list[dict[str, str]] = []
        for i, piece in enumerate(user.split(IMAGE_TOKEN)):
            if i > 0:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


# --- labels ---------------------------------------------------------------------------------


def image_placeholder_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the image placeholder tokens (``IMAGE_PLACEHOLDER_TOKENS``) that the tokenizer knows."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in IMAGE_PLACEHOLDER_TOKENS if token in vocab]


#: Which tokens take loss: ``pretraining`` every text token, ``sft`` only the answers.
LabelMode = Literal["pretraining", "sft"]


def build_labels(
    input_ids: Tensor,
    attention_mask: Tensor,
    ignored_token_ids: Collection[int],
    mode: LabelMode = "pretraining",
    offset_mapping: Tensor | None = None,
    answer_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Tensor:
    """Labels for next-token loss: ``input_ids`` with ``IGNORE_INDEX`` (-100) where no loss is taken.

    Never a loss on padding (``attention_mask == 0``) nor on ``ignored_token_ids`` (pass
    ``image_placeholder_token_ids(tokenizer)``). ``pretraining`` keeps every other token.
    ``sft`` keeps only the tokens lying entirely inside an answer span of their sample
    (``RenderedConversation.answer_spans``), located through the fast tokenizer's
    ``offset_mapping`` (batch, seq, 2) of the same text: the answers and the
    ``<end_of_utterance>`` closing each, not the ``Assistant:`` prefix nor any user/system turn.
    Labels are not shifted (the model shifts them, as transformers does).
    """
    keep = attention_mask.bool() & ~torch.isin(
        input_ids, torch.tensor(list(ignored_token_ids), dtype=torch.long)
    )
    if mode == "sft":
        if offset_mapping is None or answer_spans is None:
            raise ValueError(
                "mode='sft' needs the tokenizer's offset_mapping and the answer_spans of each sample."
            )
        starts, ends = offset_mapping[..., 0], offset_mapping[..., 1]
        in_answer = torch.zeros_like(keep)
        for row, spans in enumerate(answer_spans):
            for span_start, span_end in spans:
                in_answer[row] |= (
                    (starts[row] >= span_start) & (ends[row] <= span_end) & (ends[row] > starts[row])
                )
        keep &= in_answer
    elif mode != "pretraining":
        raise ValueError(f"Unknown label mode {mode!r}; expected 'sft' or 'pretraining'.")
    return input_ids.masked_fill(~keep, IGNORE_INDEX)


# --- multi-turn shuffling -------------------------------------------------------------------

_LEADING_IMAGES = re.compile(rf"(?:\s*{re.escape(IMAGE_TOKEN)})+\s*")


def shuffle_turns(turns: Sequence[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """Shuffle the (question, answer) pairs of a multi-turn conversation (Idefics2 paper, section 4.2).

    Images stay before every question that followed them: a turn whose question holds
    ``<image>`` starts a new segment, and pairs are only shuffled within their segment. When the
    segment's images lead its first question (the usual ``<image>Question`` form), that pair is
    shuffled too and the images move to whichever question comes first; when an image sits
    inside the question text, or the question is nothing but images, that turn stays first.
    """
    segments: list[list[tuple[str, str]]] = []
    for turn in turns:
        if not segments or IMAGE_TOKEN in turn[0]:
            segments.append([])
        segments[-1].append(turn)
    shuffled: list[tuple[str, str]] = []
    for (user, answer), *others in segments:
        leading = _LEADING_IMAGES.match(user)
        images = leading.group(0) if leading else ""
        question = user[len(images) :]
        if IMAGE_TOKEN in question or (images and not question.strip()):
            rng.shuffle(others)
            shuffled += [(user, answer), *others]
        else:
            pairs = [(question, answer), *others]
            rng.shuffle(pairs)
            shuffled += [(images + pairs[0][0], pairs[0][1]), *pairs[1:]]
    return shuffled
