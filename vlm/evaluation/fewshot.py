"""Zero- and few-shot prompts: ``k`` in-context examples from a support split, drawn with a fixed seed.

As in the Idefics2 base-model evaluation (Table 8: "8 random in-context examples"), each query gets
its own random shots; they depend only on (``seed``, query id), so a run is reproducible whatever
the batch size, order or number of processes. A shot is never the query itself.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from vlm.evaluation.benchmarks import Example
from vlm.evaluation.prompts import PromptKind, PromptTurn, format_prompt


def select_shots(query: Example, support: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` distinct examples of ``support`` (not the query), chosen by ``random.Random(f"{seed}:{id}")``."""
    if k == 0:
        return []
    if k > len(support) - any(e.id == query.id for e in support):
        raise ValueError(f"{k} shots asked but the support split has only {len(support)} examples.")
    rng = random.Random(f"{seed}:{query.id}")
    picked = rng.sample(range(len(support)), min(k + 1, len(support)))
    return [support[i] for i in picked if support[i].id != query.id][:k]


def shot_answer(example: Example) -> str:
    """The answer shown for an in-context example: the most frequent reference (the first on ties)."""
    return Counter(example.answers).most_common(1)[0][0]


def documents(query: Example, shots: Sequence[Example], kind: PromptKind) -> list[PromptTurn]:
    """The shots (with their answers) then the query, each prompted as ``kind`` (or its own ``prompt``)."""

    def text(example: Example) -> str:
        return (
            example.prompt
            if example.prompt is not None
            else format_prompt(kind, example.question, example.choices)
        )

    docs = [PromptTurn(s.images, text(s), shot_answer(s)) for s in shots]
    return [*docs, PromptTurn(query.images, text(query))]
