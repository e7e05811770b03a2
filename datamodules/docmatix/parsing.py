"""Parsing a generation: the strict ``Q: ...`` / ``A: ...`` / ``END`` format into question-answer pairs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class QAPair:
    """One generated question and its answer (stripped)."""

    question: str
    answer: str


@dataclass
class ParsedGeneration:
    """``parse_generation``'s result: the pairs in order, whether the ``END`` line came, and the
    fragments that are not part of a pair (``preamble``, ``stray_line``, ``orphan_answer``,
    ``dangling_question``, ``after_end``) counted by kind."""

    pairs: list[QAPair]
    complete: bool
    malformed: Counter[str] = field(default_factory=Counter)


_Q, _A = "Q:", "A:"


def parse_generation(text: str) -> ParsedGeneration:
    """Parse the strict output format of ``OUTPUT_FORMAT``.

    Lines are stripped and blank lines ignored. A pair is a line starting with ``Q:`` followed by a
    line starting with ``A:``; a non-prefixed line right after a ``Q:`` or ``A:`` line continues it
    (joined with ``\\n``, which ``drop_reason`` rejects as ill-formed: questions and answers are one
    line). The first line that is exactly ``END`` ends the output (``complete``). Anything else is
    counted in ``malformed``: lines before the first ``Q:`` (``preamble``), other unattached lines
    (``stray_line``), an ``A:`` without its ``Q:`` (``orphan_answer``), a ``Q:`` not followed by an
    ``A:`` (``dangling_question``) and lines after ``END`` (``after_end``).
    """
    pairs: list[QAPair] = []
    malformed: Counter[str] = Counter()
    question: list[str] | None = None  # the pending Q: lines
    answer: list[str] | None = None  # the A: lines of the last pair, while it may continue
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    complete, started = False, False
    for index, line in enumerate(lines):
        if line == "END":
            complete = True
            malformed["after_end"] += len(lines) - index - 1
            break
        started = started or line.startswith((_Q, _A))
        if line.startswith(_Q):
            if question is not None:
                malformed["dangling_question"] += 1
            question, answer = [line[len(_Q) :].strip()], None
        elif line.startswith(_A):
            if question is None:
                malformed["orphan_answer"] += 1
                answer = None
                continue
            answer = [line[len(_A) :].strip()]
            pairs.append(QAPair("\n".join(question), answer[0]))
            question = None
        elif question is not None:
            question.append(line)
        elif answer is not None:
            answer.append(line)
            pairs[-1] = QAPair(pairs[-1].question, "\n".join(answer))
        else:
            malformed["stray_line" if started else "preamble"] += 1
    if question is not None:
        malformed["dangling_question"] += 1
    return ParsedGeneration(pairs, complete, +malformed)
