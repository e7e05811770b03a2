"""Multiple choice: answer-letter parsing (explicit patterns, then VLMEvalKit's can_infer rules)."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from vlm.metrics.base import MeanScore, Targets, reference_lists

_LONE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?")
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:(?i:option)\s*)?[(\[]?([A-Z])(?![A-Za-z])")
_LEADING_LETTER = re.compile(r"[(\[]?([A-Z])[)\].:](?:\s|$)")
_VLMEVALKIT_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def parse_choice_letter(text: str, choices: Sequence[str] | None = None, letters: str = "ABCD") -> str | None:
    """The option letter a generated answer commits to, or None when there is none or it is ambiguous.

    Valid letters are A, B, ... for the given ``choices``, else ``letters``. Rules, first hit wins:
    1. the whole answer is a letter, optionally bracketed and followed by "." or ":" ("b", "(B)", "B.");
    2. the last "answer is X" / "answer: X" / "answer is (X)" ("The answer is B. Paris");
    3. a leading capital letter followed by ")", "]", "." or ":" and a space ("B. Paris", "(C) 12");
    4. VLMEvalKit's ``can_infer_option``: after replacing ``.()[],:;!*#{}`` with spaces, exactly
       one valid letter occurs as a standalone word ("I think B" with options A-D);
    5. VLMEvalKit's ``can_infer_text`` (needs ``choices``): exactly one option text occurs in the
       lower-cased answer.
    Everything else (no letter, several letters such as "A or B", a letter outside the options)
    gives None and is scored wrong.
    """
    valid = string.ascii_uppercase[: len(choices)] if choices is not None else letters
    s = text.strip()
    m = _LONE_LETTER.fullmatch(s)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    stated = [x for x in _ANSWER_IS.findall(s) if x in valid]
    if stated:
        return stated[-1]
    m = _LEADING_LETTER.match(s)
    if m and m.group(1) in valid:
        return m.group(1)
    words = set(s.translate(_VLMEVALKIT_SEPARATORS).split())
    found = [c for c in valid if c in words]
    if len(found) == 1:
        return found[0]
    if choices is not None:
        lowered = s.lower()
        found = [c for c, option in zip(valid, choices) if str(option).lower() in lowered]
        if len(found) == 1:
            return found[0]
    return None


class MultipleChoiceAccuracy(MeanScore):
    """Accuracy of multiple-choice answers (MMMU, MMBench, AI2D, MMStar, ...).

    ``preds`` are generated texts, parsed with ``parse_choice_letter``; ``targets[i]`` is the gold
    letter ("B", also "(B)" or "b"). ``update(preds, targets, choices=...)`` optionally gives each
    question's option texts: they fix the valid letters and let an answer that quotes one option
    count as its letter. Without them the valid letters are ``letters`` (default "ABCD"; MMMU has
    up to 9 options, "ABCDEFGHI"). Unparsable or ambiguous answers count as wrong.
    """

    def __init__(self, letters: str = "ABCD", **kwargs) -> None:
        super().__init__(**kwargs)
        self.letters = letters

    def update(
        self, preds: Sequence[str], targets: Targets, choices: Sequence[Sequence[str]] | None = None
    ) -> None:
        refs = reference_lists(preds, targets)
        if choices is not None and len(choices) != len(preds):
            raise ValueError(f"got {len(choices)} option lists for {len(preds)} predictions")
        scores = []
        for i, (pred, ref) in enumerate(zip(preds, refs)):
            gold = _LONE_LETTER.fullmatch(ref[0].strip())
            if gold is None:
                raise ValueError(f"multiple-choice target must be an option letter, got {ref[0]!r}")
            options = None if choices is None else choices[i]
            scores.append(float(parse_choice_letter(pred, options, self.letters) == gold.group(1).upper()))
        self._add(scores)
