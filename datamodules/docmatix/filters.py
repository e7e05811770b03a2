"""Filters on generated pairs: refusals, unanswerable answers, code, length, duplicates (per reason)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from datamodules.docmatix.parsing import ParsedGeneration, QAPair


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of ``drop_reason``: question length at least ``min_question_chars``, question and
    answer at most ``max_chars`` (500: m4 drops Docmatix rows with a longer turn, docs/DATA_FORMATS.md §5)."""

    min_question_chars: int = 10
    max_chars: int = 500


_I = re.IGNORECASE
_PLACES = r"(?:document|text|page|passage|transcription|context|ocr)"
REFUSAL = re.compile(
    r"\bI(?:'m| am) sorry\b|\bI apologi[sz]e\b|\bas an AI\b|\bas a (?:large )?language model\b"
    r"|\bI (?:cannot|can't|can not|am unable to|won't)"
    r" (?:help|answer|assist|provide|comply|generate|do that)\b",
    _I,
)
UNANSWERABLE = re.compile(
    r"\bI (?:do not|don't|dont) know\b|\bI(?:'m| am) not (?:sure|certain)\b|\bunanswerable\b"
    r"|\b(?:cannot|can ?not|can't|could not|couldn't) be"
    r" (?:determined|answered|found|inferred|known|identified)\b"
    r"|\bnot (?:explicitly |clearly |directly )?"
    rf"(?:mentioned|specified|stated|provided|given|indicated|listed) (?:in|by|on) (?:the|this) {_PLACES}\b"
    rf"|\b(?:the|this) {_PLACES} (?:does not|doesn't|did not)"
    r" (?:say|mention|specify|state|provide|contain|include|indicate|give)\b"
    r"|\bno (?:information|mention)\b|\b(?:not possible|impossible) to (?:determine|answer|tell|know|say)\b"
    r"|\b(?:insufficient|not enough) information\b",
    _I,
)
# Whole answers (lower-cased, outer punctuation stripped) that say "no answer".
NON_ANSWERS = frozenset(
    {
        "n/a",
        "n / a",
        "na",
        "unknown",
        "unclear",
        "unanswerable",
        "not applicable",
        "not available",
        "no answer",
    }
    | {f"not {word}" for word in ("mentioned", "specified", "stated", "given", "provided", "known", "found")}
)
CODE = re.compile(
    r"```|\bdef\s+\w+\s*\(|^\s*class\s+\w+\s*[(:]|^\s*(?:import\s+\w+|from\s+[\w.]+\s+import\b)"
    r"|#include\s*[<\"]"
    r"|\bfunction\s*\w*\s*\(|\b\w+\([^()]*\)\s*;|</?[a-z][a-z0-9]*(?:\s[^<>]*)?/?>|\bSELECT\b.+\bFROM\b"
    r"|&&|\|\||==|!=|=>|\{\s*\"[^\"]*\"\s*:"
)
PLACEHOLDER = re.compile(r"<\s*/?\s*(?:question|answer)\s*>|\[\s*(?:question|answer)\s*\]|^[QA]\s*:", _I)
_ALNUM = re.compile(r"[^\W_]")


def normalize(text: str) -> str:
    """Lower-cased words and numbers only, single-spaced: what duplicate and copy checks compare."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def _is_non_answer(answer: str) -> bool:
    return answer.lower().strip(" .!?,;:'\"()[]") in NON_ANSWERS


def drop_reason(pair: QAPair, config: FilterConfig = FilterConfig()) -> str | None:
    """Why one pair is dropped on its own (``None``: kept), first matching rule in this order:

    ``empty`` (question or answer), ``ill_formed`` (several lines, an echoed ``<question>`` /
    ``[answer]`` placeholder or ``Q:``/``A:`` prefix, no letter or digit),
    ``too_short`` (question under ``min_question_chars``), ``too_long`` (question or answer over
    ``max_chars``), ``no_question_mark`` (question not ending with ``?``), ``refusal`` (the answer
    apologises / refuses: ``REFUSAL``), ``unanswerable`` (the answer says the document does not tell:
    ``UNANSWERABLE`` anywhere, or the whole answer is one of ``NON_ANSWERS`` such as ``N/A``,
    ``unknown``, ``not mentioned``), ``code`` (code in question or answer: ``CODE``, the paper's
    code-removal regex), ``copies_question`` (the answer's first words are the question's, ``normalize``d).
    """
    question, answer = pair.question.strip(), pair.answer.strip()
    if not question or not answer:
        return "empty"
    if "\n" in question + answer or PLACEHOLDER.search(question) or PLACEHOLDER.search(answer):
        return "ill_formed"
    if not _ALNUM.search(question) or not _ALNUM.search(answer):
        return "ill_formed"
    if len(question) < config.min_question_chars:
        return "too_short"
    if max(len(question), len(answer)) > config.max_chars:
        return "too_long"
    if not question.endswith("?"):
        return "no_question_mark"
    if REFUSAL.search(answer):
        return "refusal"
    if UNANSWERABLE.search(answer) or _is_non_answer(answer):
        return "unanswerable"
    if CODE.search(question) or CODE.search(answer):
        return "code"
    question_words = normalize(question).split()
    if normalize(answer).split()[: len(question_words)] == question_words:
        return "copies_question"
    return None


def filter_pairs(
    parsed: ParsedGeneration,
    max_pairs: int,
    seen_in_run: set[tuple[str, str]],
    config: FilterConfig = FilterConfig(),
) -> tuple[list[QAPair], Counter[str]]:
    """The kept pairs of one generation and the drops by reason (every parsed pair is one or the other).

    Without ``END`` the last pair is dropped as ``truncated`` (generation may have stopped inside
    it); then ``drop_reason``; then ``duplicate_in_document`` (a question already kept for this
    document, compared ``normalize``d), ``duplicate_in_run`` (the exact pair was kept for an earlier
    document; ``seen_in_run`` is updated with the pairs kept here) and ``over_limit`` (pairs beyond
    ``max_pairs``, the number the prompt asked for).
    """
    kept: list[QAPair] = []
    dropped: Counter[str] = Counter()
    questions: set[str] = set()
    for index, raw in enumerate(parsed.pairs):
        pair = QAPair(raw.question.strip(), raw.answer.strip())
        exact = (pair.question, pair.answer)
        if not parsed.complete and index == len(parsed.pairs) - 1:
            reason = "truncated"
        else:
            reason = drop_reason(pair, config)
        if reason is None and normalize(pair.question) in questions:
            reason = "duplicate_in_document"
        elif reason is None and exact in seen_in_run:
            reason = "duplicate_in_run"
        elif reason is None and len(kept) >= max_pairs:
            reason = "over_limit"
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(pair)
        questions.add(normalize(pair.question))
    seen_in_run.update((pair.question, pair.answer) for pair in kept)
    return kept, dropped
