"""Evaluation prompts as data, rendered like training's chat template or as plain text, and stop words.

Paper prompts (Idefics2, appendix A.3.1): open-ended VQA (TextVQA, DocVQA, VQAv2) asks
``Question: {question}\\nGive a very brief answer.``; multiple choice (MMMU, MathVista, MMBench)
lists ``Choices:`` as ``A. ...`` lines and ends with ``Answer with the letter.``; generation stops at
the words ``Question``, ``User``, ``<end_of_utterance>`` and eos. Our choices, where the paper gives
none: the VQA prompt also for OK-VQA and ChartQA (m4's evaluation code does the same, docs/DATA_FORMATS.md
§9), the multiple-choice prompt also for AI2D and MMStar, lmms-eval's COCO prompt ``Provide a
one-sentence caption for the provided image.`` for captioning, and the plain-text (base model) layout
``{images}{prompt}\\nAnswer: {answer}\\n`` per document.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlm.config import END_OF_UTTERANCE_TOKEN, IMAGE_TOKEN
from vlm.processing.text import apply_chat_template, turns_to_messages

PromptKind = Literal["vqa", "multiple_choice", "caption"]

VQA_TEMPLATE = "Question: {question}\nGive a very brief answer."  # Idefics2 A.3.1
MULTIPLE_CHOICE_TEMPLATE = "Question: {question}\nChoices:\n{choices}\nAnswer with the letter."  # A.3.1
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # lmms-eval coco_cap (our choice)
PLAIN_ANSWER_PREFIX = "\nAnswer:"  # base models (our choice)
#: Idefics2 A.3.1 (eos is the tokenizer's, handled by ``generate``'s ``eos_token_id``).
STOP_WORDS = ("Question", "User", END_OF_UTTERANCE_TOKEN)


def choice_letter(index: int) -> str:
    """ "A" for the first option, "B" for the second, ..."""
    return string.ascii_uppercase[index]


def format_prompt(kind: PromptKind, question: str, choices: Sequence[str] = ()) -> str:
    """The user text of one question (``<image>`` placeholders in ``question`` kept where they are)."""
    if kind == "vqa":
        return VQA_TEMPLATE.format(question=question)
    if kind == "multiple_choice":
        lines = "\n".join(f"{choice_letter(i)}. {c}" for i, c in enumerate(choices))
        return MULTIPLE_CHOICE_TEMPLATE.format(question=question, choices=lines)
    if kind == "caption":
        return CAPTION_PROMPT
    raise ValueError(f"Unknown prompt kind {kind!r}; expected 'vqa', 'multiple_choice' or 'caption'.")


@dataclass(frozen=True)
class PromptTurn:
    """One question of a prompt: its images, its user text and, for an in-context shot, its answer.

    ``text`` holds one ``<image>`` per image where the images go; without any, the images go
    before the text (the ``User:<image>Question: ...`` layout of training)."""

    images: list[Any]
    text: str
    answer: str | None = None

    @property
    def user_text(self) -> str:
        return self.text if IMAGE_TOKEN in self.text else IMAGE_TOKEN * len(self.images) + self.text


def chat_messages(documents: Sequence[PromptTurn]) -> list[dict[str, Any]]:
    """Chat messages of the shots (user + assistant turns) followed by the query's user turn; rendered with
    ``add_generation_prompt`` the model answers after ``Assistant:`` as in training."""
    *shots, query = documents
    turns = [(d.user_text, d.answer) for d in shots] + [(query.user_text, "")]
    return turns_to_messages(turns)[:-1]  # drop the query's empty assistant turn


def plain_text(documents: Sequence[PromptTurn]) -> str:
    """Base-model prompt: the documents one after another, each ``{images}{prompt}\\nAnswer: {answer}``,
    the query ending at ``Answer:``."""
    *shots, query = documents
    parts = [f"{d.user_text}{PLAIN_ANSWER_PREFIX} {d.answer}\n" for d in shots]
    return "".join(parts) + query.user_text + PLAIN_ANSWER_PREFIX


def render_chat_text(documents: Sequence[PromptTurn]) -> str:
    """The chat prompt as text with unexpanded ``<image>`` placeholders (what the processor expands)."""
    return apply_chat_template(chat_messages(documents), add_generation_prompt=True)


def apply_stop_words(text: str, stop_words: Sequence[str] = STOP_WORDS) -> str:
    """The generation cut at the first stop word, stripped (the paper's stopping rule, applied after the
    fact: a greedy generation up to the stop word is the same whether or not decoding went on)."""
    cut = min((i for i in (text.find(w) for w in stop_words) if i >= 0), default=len(text))
    return text[:cut].strip()
