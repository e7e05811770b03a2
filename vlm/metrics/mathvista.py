"""MathVista: evaluation/extract_answer.py + calculate_score.py of lupantech/MathVista, with the
GPT-4 extraction step replaced by rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlm.metrics.anls import levenshtein_distance
from vlm.metrics.base import MeanScore, Targets, reference_lists
from vlm.metrics.multiple_choice import parse_choice_letter

_MATHVISTA_QUOTED = re.compile(r'The answer is "(.*)"\.')
_ANSWER_MARKER = re.compile(r"\b(?i:answer)\b\s*(?:(?i:is)\b)?\s*:?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}")
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|(?<![\w.])-?\.\d+"
)
_LIST = re.compile(r"\[[^\[\]]*\]")
_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d*\.(\d+)")


def _number_value(text: str) -> str:
    text = text.replace(",", "").replace(" ", "")
    if "/" in text:
        num, den = text.split("/")
        return str(float(num) / float(den)) if float(den) != 0 else text
    return text


def extract_mathvista_answer(
    response: str, choices: Sequence[str] | None = None, answer_type: str = "text"
) -> str:
    """Rule-based stand-in for MathVista's answer extraction (the official one asks GPT-4).

    The official deterministic steps come first: an empty response gives ""; a multiple-choice
    response equal to an option is returned; a response that ``int()`` (integer answers) or
    ``float()`` (float answers) parses is returned as such; ``The answer is "X".`` gives X. Then:
    multiple choice: the option letter (``parse_choice_letter`` with the options) of the text after
    the last "answer" / "answer is" / "answer:" marker, else of the whole response, else the response
    itself, which ``normalize_mathvista_answer`` maps to the closest option by edit distance as the
    official scorer does. Integer/float: the first number after the last marker, else the last
    number of the response ("1,234", "-0.5", "3/4" and "\\frac{3}{4}" give 1234, -0.5, 0.75). List:
    likewise the first / last "[...]" group. Text: the text after the marker (else the response)
    without a final period. Returns "" when nothing is found.
    """
    if response == "":
        return ""
    if choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quoted = _MATHVISTA_QUOTED.search(response)
    if quoted:
        return quoted.group(1)
    markers = list(_ANSWER_MARKER.finditer(response))
    segment = response[markers[-1].end() :] if markers else response
    if choices:
        letter = parse_choice_letter(segment, choices) or parse_choice_letter(response, choices)
        return letter if letter is not None else response.strip()
    if answer_type in ("integer", "float", "list"):
        pattern = _LIST if answer_type == "list" else _NUMBER
        found = pattern.findall(_LATEX_FRAC.sub(r"\1/\2", segment))
        if not found:
            return ""
        value = found[0] if markers else found[-1]
        return re.sub(r"\s*,\s*", ", ", value) if answer_type == "list" else _number_value(value)
    return segment.strip().rstrip(".").strip()


def normalize_mathvista_answer(
    extraction: str, choices: Sequence[str] | None, answer_type: str, precision: float | None
) -> str | None:
    """MathVista's ``normalize_extracted_answer``: bring an extraction to the gold answer's format.

    Multiple choice: "(X)" -> "X"; a letter A, B, ... is replaced by that option's text, anything
    else by the option with the smallest Levenshtein distance (first one on ties). Integer:
    ``str(int(float(x)))`` (truncates "2.7" to "2"). Float: ``str(round(float(x), precision))``.
    List: unchanged. Unparsable numbers give None. Free-form text answers (which MathVista never
    has; its scorer would fail on them) are returned stripped.
    """
    if choices:
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [levenshtein_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except (ValueError, OverflowError):
        return None
    return extraction.strip() if answer_type == "text" else extraction


def _mathvista_type(answer: str) -> tuple[str, float | None]:
    answer = answer.strip()
    if _INTEGER.fullmatch(answer):
        return "integer", None
    decimal = _DECIMAL.fullmatch(answer)
    if decimal:
        return "float", len(decimal.group(1))
    return ("list", None) if answer.startswith("[") else ("text", None)


def mathvista_match(
    response: str,
    answer: str,
    choices: Sequence[str] | None = None,
    answer_type: str | None = None,
    precision: float | None = None,
) -> bool:
    """Whether a MathVista response is correct: ``extract_mathvista_answer``, then
    ``normalize_mathvista_answer``, then string equality with the gold answer (``safe_equal``).

    ``answer_type``/``precision`` are the dataset's fields; when omitted they are read off the gold
    answer: "integer" for "12", "float" with as many decimals as given for "1.45" (precision 2),
    "list" for "[...]", else "text" (the type of every multiple-choice question).
    """
    inferred_type, inferred_precision = _mathvista_type(answer)
    answer_type = answer_type or inferred_type
    precision = inferred_precision if precision is None else precision
    extraction = extract_mathvista_answer(response, choices, answer_type)
    return normalize_mathvista_answer(extraction, choices, answer_type, precision) == answer


class MathVistaAccuracy(MeanScore):
    """MathVista accuracy with rule-based answer extraction (``mathvista_match``), in [0, 1].

    ``targets[i]`` is the gold answer (for multiple choice, the option text as in the dataset).
    ``update(preds, targets, choices=None, answer_types=None, precisions=None)`` takes each
    question's options (None or [] for free-form) and, optionally, the dataset's ``answer_type``
    and ``precision`` fields; missing ones are inferred from the gold answer.
    """

    def update(
        self,
        preds: Sequence[str],
        targets: Targets,
        choices: Sequence[Sequence[str] | None] | None = None,
        answer_types: Sequence[str | None] | None = None,
        precisions: Sequence[float | None] | None = None,
    ) -> None:
        refs = reference_lists(preds, targets)
        n = len(preds)
        for name, values in (
            ("choices", choices),
            ("answer_types", answer_types),
            ("precisions", precisions),
        ):
            if values is not None and len(values) != n:
                raise ValueError(f"got {len(values)} {name} for {n} predictions")
        self._add(
            [
                float(
                    mathvista_match(
                        preds[i],
                        refs[i][0],
                        None if choices is None else choices[i],
                        None if answer_types is None else answer_types[i],
                        None if precisions is None else precisions[i],
                    )
                )
                for i in range(n)
            ]
        )
