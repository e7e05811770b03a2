"""CIDEr-D (``vlm.metrics.CIDEr``): the PTB tokeniser against CoreNLP, the score against pycocoevalcap's
rules and the paper, and the corpus gather across processes (the other scorers: tests/test_metrics.py)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from vlm.metrics import (
    ANLS,
    CIDEr,
    cider_d,
    ptb_tokenize,
)

# ------------------------------------------------------------------------------------------------
# PTB tokenisation and CIDEr-D
# ------------------------------------------------------------------------------------------------

# Outputs of CoreNLP 3.4.1 PTBTokenizer -preserveLines -lowerCase + pycocoevalcap's filter.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("A person's hand holding a Wii remote.", "a person 's hand holding a wii remote"),
    ("They don't know it's a dog; it can't be.", "they do n't know it 's a dog it ca n't be"),
    ("I'm sure we've seen the kids' toys.", "i 'm sure we 've seen the kids toys"),
    ("He cannot, she's gonna and they wanna go.", "he can not she 's gon na and they wan na go"),
    ("A 3-year-old boy in a black-and-white T-shirt.", "a 3-year-old boy in a black-and-white t-shirt"),
    (
        'The sign says "STOP" (in red) -- see [here].',
        "the sign says stop -lrb- in red -rrb- see -lsb- here -rsb-",
    ),
    (
        "It's 10:30 p.m. in the U.S. and 1,000 people paid $5 (50%).",
        "it 's 10:30 p.m. in the u.s. and 1,000 people paid $ 5 -lrb- 50 % -rrb-",
    ),
    (
        "Dr. Smith lives on 5th Ave. near St. Mary's, etc.",
        "dr. smith lives on 5th ave. near st. mary 's etc.",
    ),
    ("Wow!! Is that a cat?! ... No.", "wow !! is that a cat ?! no"),
    ("A plate with ½ a sandwich & chips, 1 1/2 cups.", "a plate with 1/2 a sandwich & chips 1\u00a01/2 cups"),
    ("“Curly quotes” and it’s a ‘test’ — right?", "curly quotes and it 's a test right"),
    ("<unk> token and :) smiley", "<unk> token and :-rrb- smiley"),
    ("", ""),
    ("ROCK'N'ROLL at 5 o'clock, y'all", "rock 'n' roll at 5 o'clock y' all"),
]


@pytest.mark.parametrize(("caption", "tokens"), PTB_CASES)
def test_ptb_tokenize_matches_corenlp(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def paper_cider_d(cands, refs, n=4, sigma=6.0):
    """CIDEr-D written from the paper (Vedantam et al. 2015, sec. 4 and CIDEr-D), independently."""

    def grams(s):
        w = s.split()
        return Counter(tuple(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    df = Counter(g for rs in refs for g in set().union(*(grams(r) for r in rs)))
    big_n = len(cands)

    def g(s, k):
        return {t: c * math.log(big_n / max(1.0, df[t])) for t, c in grams(s).items() if len(t) == k}

    scores = []
    for c, rs in zip(cands, refs):
        total = 0.0
        for k in range(1, n + 1):
            gc = g(c, k)
            for r in rs:
                gr = g(r, k)
                dot = sum(min(v, gr.get(t, 0.0)) * gr.get(t, 0.0) for t, v in gc.items())
                norms = math.hypot(*gc.values()) * math.hypot(*gr.values())
                penalty = math.exp(-((len(c.split()) - len(r.split())) ** 2) / (2 * sigma**2))
                total += (dot / norms if norms else 0.0) * penalty / len(rs) / n
        scores.append(10 * total)
    return scores


CIDER_REFS = [
    [
        "a man riding a wave on a surfboard",
        "a surfer rides a large wave",
        "a man surfing on a wave in the ocean",
    ],
    [
        "two zebras standing in a grassy field",
        "a pair of zebras grazing in a field",
        "zebras standing next to each other",
    ],
    ["a plate of food with broccoli and rice", "a white plate topped with rice and broccoli"],
    ["a red double decker bus on a city street", "a bus driving down the street"],
]
CIDER_CANDS = [
    "a man riding a wave on top of a surfboard",
    "two zebras standing next to each other in a field",
    "a plate of rice and broccoli",
    "a cat sleeping on a laptop",
]
# pycocoevalcap 1.2 Cider().compute_score on this corpus (per image, then the corpus mean).
PYCOCOEVALCAP_SCORES = [2.8859838056832157, 3.4700353068867824, 3.1244469153442767, 0.11087222757707377]
PYCOCOEVALCAP_CIDER = 2.3978345638728373


def test_cider_d_matches_pycocoevalcap_and_paper():
    scores = cider_d(CIDER_CANDS, CIDER_REFS)
    assert scores == pytest.approx(PYCOCOEVALCAP_SCORES, abs=1e-12)
    assert scores == pytest.approx(paper_cider_d(CIDER_CANDS, CIDER_REFS), abs=1e-12)
    metric = CIDEr(tokenize=False)
    metric.update(CIDER_CANDS, CIDER_REFS)
    assert metric.compute().item() == pytest.approx(PYCOCOEVALCAP_CIDER, rel=1e-6)


def test_cider_d_properties():
    refs = [["a dog runs on grass", "a dog runs on grass"], ["two cats sleep", "two cats sleep"]]
    # A candidate equal to every reference: each n-gram cosine is 1, no length penalty -> 10 * 4/4;
    # three words have no 4-gram, whose term is 0 -> 10 * 3/4.
    assert cider_d(["a dog runs on grass", "two cats sleep"], refs) == pytest.approx([10.0, 7.5])
    # No n-gram in common with the references (or an empty caption) -> 0.
    assert cider_d(["zebra zebra", ""], refs) == [0.0, 0.0]
    # A single image: every n-gram is in every reference set, idf = log(1/1) = 0 -> 0.
    assert cider_d(["a dog runs on grass"], refs[:1]) == [0.0]


def test_cider_metric_tokenises_like_coco():
    raw_cands = [
        "A man riding a wave on top of a surfboard.",
        "Two zebras standing next to each other in a field",
    ]
    raw_refs = [
        ["A man riding a wave on a surfboard.", "A surfer rides a large wave!"],
        ["Two zebras standing in a grassy field.", "Zebras standing next to each other."],
    ]
    metric = CIDEr()
    metric.update(raw_cands, raw_refs)
    tokenised = cider_d(
        [ptb_tokenize(c) for c in raw_cands], [[ptb_tokenize(r) for r in rs] for rs in raw_refs]
    )
    assert metric.compute().item() == pytest.approx(sum(tokenised) / 2, rel=1e-6)


def fake_gather(other_states):
    """A ``dist_sync_fn`` for ``Metric._sync_dist``: this process's state plus another rank's."""
    pending = list(other_states)

    def gather(tensor, group=None):
        return [tensor, pending.pop(0)]

    return gather


def test_cider_sync_gathers_the_corpus():
    half_a, half_b = CIDEr(tokenize=False), CIDEr(tokenize=False)
    half_a.update(CIDER_CANDS[:3], CIDER_REFS[:3])
    half_b.update(CIDER_CANDS[3:], CIDER_REFS[3:])
    half_a._sync_dist(fake_gather([torch.cat(half_b.records)]))
    assert half_a.compute().item() == pytest.approx(PYCOCOEVALCAP_CIDER, rel=1e-6)
    # A rank without samples contributes torchmetrics' empty placeholder (metric dtype).
    idle, busy = CIDEr(tokenize=False), CIDEr(tokenize=False)
    busy.update(CIDER_CANDS, CIDER_REFS)
    idle._sync_dist(fake_gather([torch.cat(busy.records)]))
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert idle.compute().item() == pytest.approx(PYCOCOEVALCAP_CIDER, rel=1e-6)


def test_mean_metrics_sync_by_sum():
    a, b = ANLS(), ANLS()
    a.update(["pariss"], ["paris"])  # 5/6
    b.update(["paris", "x"], [["paris"], ["paris"]])  # 1, 0
    a._sync_dist(fake_gather([b.score_sum, b.count]))
    assert a.compute().item() == pytest.approx((5 / 6 + 1 + 0) / 3)


# ------------------------------------------------------------------------------------------------
