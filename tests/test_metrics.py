"""Evaluation metrics against hand-computed values of the official scorers (arithmetic in comments).

Reference values that are not hand-computed come from the official tools themselves, run offline:
PTB tokenisations from Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` (the jar
shipped in pycocoevalcap 1.2) followed by pycocoevalcap's punctuation filter, and CIDEr-D values
from pycocoevalcap 1.2 ``Cider().compute_score``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_metrics_cider import CIDER_CANDS, CIDER_REFS

from vlm.metrics import (
    ANLS,
    CIDEr,
    MathVistaAccuracy,
    MultipleChoiceAccuracy,
    RelaxedAccuracy,
    VQAAccuracy,
    anls_score,
    extract_mathvista_answer,
    levenshtein_distance,
    mathvista_match,
    normalize_mathvista_answer,
    normalize_vqa_answer,
    parse_choice_letter,
    relaxed_match,
    vqa_accuracy,
    vqa_process_punctuation,
)

# ------------------------------------------------------------------------------------------------
# VQA accuracy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Yes", "yes"),
        ("two", "2"),  # number words -> digits
        ("none", "0"),
        ("a dog.", "dog"),  # article dropped, final period stripped
        ("The  Dog\n", "dog"),
        ("dont", "don't"),  # contraction map
        ("Im", "im"),  # vqaEval's capitalised keys never match a lower-cased word
        ("yes!", "yes"),  # "!" -> " "
        ("x-ray", "x ray"),  # "-" not touching a space -> " "
        ("x-ray - scan", "xray scan"),  # one "-" touches a space -> every "-" deleted
        ("red , blue", "red blue"),
        ("1,000 cats/dogs", "1000 catsdogs"),  # a digit,digit group -> all punctuation deleted
        ("3.5", "3.5"),  # a period before a digit is kept
        ("5.", "5"),
        ("it's", "it's"),  # apostrophes are not punctuation for vqaEval
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_period_strip_count_quirk():
    # vqaEval passes re.UNICODE (= 32) as re.sub's count: only 32 of 33 periods go.
    assert vqa_process_punctuation("." * 33) == "."


OTHERS = ["cat", "bird", "fish", "cow", "pig", "hen", "owl", "bee", "ant", "elk"]


def humans(answer: str, k: int) -> list[str]:
    """Ten human answers, ``k`` of them ``answer`` and the rest all different (never unanimous)."""
    return [answer] * k + OTHERS[: 10 - k]


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (4, 1.0),  # (4*min(1,3/3) + 6*min(1,4/3)) / 10 = 1
        (3, 0.9),  # (3*min(1,2/3) + 7*min(1,3/3)) / 10 = (2 + 7) / 10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = 6 / 10
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10
        (0, 0.0),
    ],
)
def test_vqa_accuracy_matching_humans(k, expected):
    assert vqa_accuracy("dog", humans("dog", k)) == pytest.approx(expected)


def test_vqa_accuracy_normalisation_cases():
    assert vqa_accuracy("two", humans("2", 3)) == pytest.approx(0.9)  # "two" -> "2": 3 matches
    assert vqa_accuracy("a dog.", humans("dog", 2)) == pytest.approx(0.6)  # -> "dog": 2 matches
    assert vqa_accuracy("don't", humans("dont", 4)) == pytest.approx(1.0)  # refs "dont" -> "don't"
    assert vqa_accuracy("dont", humans("don't", 1)) == pytest.approx(0.3)
    assert vqa_accuracy("Yes", humans("yes", 9)) == pytest.approx(1.0)  # "Yes" -> "yes": 9 matches
    assert vqa_accuracy("", humans("yes", 9)) == 0.0
    assert vqa_accuracy("   ", humans("yes", 9)) == 0.0


def test_vqa_accuracy_unanimous_references_are_not_normalised():
    # vqaEval normalises only when len(set(gtAnswers)) > 1: "Yes" != "yes" scores 0.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # stripping and \n -> " " always apply
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    # lmms-eval / EvalAI-processed behaviour on request
    assert vqa_accuracy("Yes", ["yes"] * 10, normalize_unanimous=True) == 1.0
    assert vqa_accuracy("two", ["2"] * 10, normalize_unanimous=True) == 1.0


def test_vqa_accuracy_other_reference_counts():
    assert vqa_accuracy("dog", ["dog"]) == 1.0  # one reference: exact match
    assert vqa_accuracy("Dog", ["dog"]) == 0.0  # a single reference is unanimous: no normalisation
    # 3 references, k = min(3, 2) = 2; 1 match: leaving it out -> 0, else 1/2: (0 + 1/2 + 1/2) / 3
    assert vqa_accuracy("dog", ["dog", "cat", "cow"]) == pytest.approx(1 / 3)
    # 2 references, k = 1: (min(1, 0/1) + min(1, 1/1)) / 2
    assert vqa_accuracy("dog", ["dog", "cat"]) == pytest.approx(0.5)
    assert vqa_accuracy("dog", ["dog", "dog", "dog"]) == 1.0


def test_vqa_metric():
    metric = VQAAccuracy()
    metric.update(["two", "Yes"], [humans("2", 3), ["yes"] * 10])  # 0.9, 0
    metric.update(["a dog."], [humans("dog", 2)])  # 0.6
    assert metric.compute().item() == pytest.approx((0.9 + 0.0 + 0.6) / 3)
    assert metric.compute().dtype == torch.float32
    lenient = VQAAccuracy(normalize_unanimous=True)
    lenient.update(["Yes"], [["yes"] * 10])
    assert lenient.compute().item() == 1.0


# ------------------------------------------------------------------------------------------------
# ANLS
# ------------------------------------------------------------------------------------------------


def test_levenshtein_distance():
    assert levenshtein_distance("kitten", "sitting") == 3
    assert levenshtein_distance("", "abc") == 3
    assert levenshtein_distance("abc", "abc") == 0


@pytest.mark.parametrize(
    ("pred", "refs", "expected"),
    [
        ("  Paris ", ["paris"], 1.0),  # case and surrounding spaces are ignored
        ("pariss", ["paris"], 1 - 1 / 6),  # distance 1 over max(5, 6)
        ("Paris  ", ["pariss"], 1 - 1 / 7),  # lengths are of the raw strings: max(6, 7)
        ("ab", ["abcd"], 0.5),  # NL = 2/4 = 0.5 exactly: official `1 - NL < 0.5` keeps 0.5
        ("abc", ["abcdefg"], 0.0),  # NL = 4/7 > 0.5 -> 0
        ("a", ["abcd"], 0.0),  # NL = 3/4
        ("", ["abc"], 0.0),  # NL = 3/3
        ("", [""], 1.0),  # length 0 counts as NL = 0
        ("abc", [""], 0.0),  # NL = 3/3
        ("color", ["hue", "colour"], 1 - 1 / 6),  # best reference: colour, 1 edit over 6
        ("new  york", ["New York"], 1 - 0 / 9),  # whitespace collapsed for the distance only
    ],
)
def test_anls_score(pred, refs, expected):
    assert anls_score(pred, refs) == pytest.approx(expected)


def test_anls_metric():
    metric = ANLS()
    metric.update(["pariss", "ab"], [["paris"], "abcd"])  # a plain string is one reference
    metric.update(["zzz"], [["paris", "rome"]])
    assert metric.compute().item() == pytest.approx((5 / 6 + 0.5 + 0.0) / 3)


# ChartQA relaxed accuracy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ("12", "12.5", True),  # |12 - 12.5| / 12.5 = 0.04 <= 0.05
        ("11.8", "12.5", False),  # 0.7 / 12.5 = 0.056
        ("105", "100", True),  # 5 / 100 = 0.05 exactly: <= keeps it
        ("45%", "0.45", True),  # "%" divides by 100: 0.45 vs 0.45
        ("45%", "45", False),  # 0.45 vs 45
        ("1,234", "1234", True),  # thousands separator removed
        ("1,234", "1300", False),  # 66 / 1300 = 0.0508
        ("0", "0", True),  # target 0: exact string match
        ("0.0", "0", False),
        ("0.01", "0", False),
        (" Yes ", "yes", True),  # non-numeric: strip + case-insensitive exact match
        ("no", "yes", False),
        ("", "5", False),
    ],
)
def test_relaxed_match(pred, target, expected):
    assert relaxed_match(pred, target) is expected


def test_relaxed_accuracy_metric():
    metric = RelaxedAccuracy()
    metric.update(["7", "11.8"], [["5", "7"], ["12.5"]])  # any target: 1, then 0
    assert metric.compute().item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# Multiple choice
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("b", "B"),  # a lone letter may be lower case
        ("Answer: B", "B"),
        ("The answer is B. Paris", "B"),
        ("The correct answer is (C) because of the shadow.", "C"),
        ("B. A cat on a mat", "B"),  # leading letter wins over the article "A" later on
        ("I think it is D", "D"),  # VLMEvalKit rule: one standalone option letter ("I" is no option)
        ("A or B", None),  # ambiguous
        ("I don't know", None),
        ("", None),
        ("E", None),  # not an option of A-D
        ("The answer is Paris", None),  # "P" inside a word is no letter
    ],
)
def test_parse_choice_letter(text, letter):
    assert parse_choice_letter(text) == letter


def test_parse_choice_letter_with_choices():
    choices = ["London", "Paris", "Rome", "Berlin"]
    assert parse_choice_letter("Paris", choices) == "B"  # the option text
    assert parse_choice_letter("It is the capital, paris.", choices) == "B"
    assert parse_choice_letter("Paris or Rome", choices) is None  # two option texts
    assert parse_choice_letter("E", [*choices, "Madrid"]) == "E"  # five options: A-E
    assert parse_choice_letter("I", letters="ABCDEFGHI") == "I"  # MMMU-style letters


def test_multiple_choice_metric():
    metric = MultipleChoiceAccuracy()
    metric.update(["B", "The answer is B. Paris", "A or B", "Paris"], ["B", ["(b)"], "B", "B"])
    assert metric.compute().item() == pytest.approx(2 / 4)  # "Paris" has no letter without choices
    with_choices = MultipleChoiceAccuracy()
    with_choices.update(["Paris"], ["B"], choices=[["London", "Paris", "Rome"]])
    assert with_choices.compute().item() == 1.0
    with pytest.raises(ValueError):
        metric.update(["B"], ["Paris"])


# ------------------------------------------------------------------------------------------------
# MathVista
# ------------------------------------------------------------------------------------------------


def test_extract_mathvista_answer():
    assert extract_mathvista_answer("") == ""
    assert extract_mathvista_answer("12", answer_type="integer") == "12"  # int() parses it
    assert extract_mathvista_answer('So... The answer is "7".', answer_type="integer") == "7"
    assert extract_mathvista_answer("2 + 3 = 5, so the sum is 1,234 apples.", answer_type="integer") == "1234"
    assert extract_mathvista_answer("Answer: 5 since 2+3 = 5 and 4 > 3", answer_type="integer") == "5"
    assert extract_mathvista_answer("the ratio is \\frac{3}{4}", answer_type="float") == "0.75"
    assert extract_mathvista_answer("half: 1/2.", answer_type="float") == "0.5"
    assert extract_mathvista_answer("x is -0.5", answer_type="float") == "-0.5"
    assert extract_mathvista_answer("so [1,2, 3] works", answer_type="list") == "[1, 2, 3]"
    assert extract_mathvista_answer("The answer is (B).", choices=["3", "4", "5"]) == "B"
    assert extract_mathvista_answer("4", choices=["3", "4", "5"]) == "4"  # equal to an option
    assert extract_mathvista_answer("no number here", answer_type="integer") == ""


def test_normalize_mathvista_answer():
    assert normalize_mathvista_answer("(B) 4", ["3", "4", "5"], "text", None) == "4"
    assert normalize_mathvista_answer("C", ["3", "4", "5"], "text", None) == "5"
    # Not a letter: the option at the smallest edit distance ("44" -> "4": 1 edit).
    assert normalize_mathvista_answer("44", ["3", "4", "50"], "text", None) == "4"
    assert normalize_mathvista_answer("2.7", None, "integer", None) == "2"  # int(float()) truncates
    assert normalize_mathvista_answer("1.4532", None, "float", 2) == "1.45"  # round to precision
    assert normalize_mathvista_answer("abc", None, "float", 1) is None


def test_mathvista_match():
    assert mathvista_match("The answer is (B).", "4", choices=["3", "4", "5"])
    assert not mathvista_match("The answer is (A).", "4", choices=["3", "4", "5"])
    assert mathvista_match("So the total is 1,234.", "1234")  # gold "1234": integer
    assert mathvista_match("x = 1.4532", "1.45")  # gold "1.45": float, precision 2
    assert not mathvista_match("x = 1.4", "1.45")  # str(round(1.4, 2)) = "1.4"
    assert mathvista_match("It is 1/2", "0.5")  # precision 1: str(round(0.5, 1)) = "0.5"
    assert mathvista_match("It is 3", "3.0", answer_type="float", precision=1)  # str(round(3., 1))
    assert mathvista_match("Answer: [1,2,3]", "[1, 2, 3]")


def test_mathvista_metric():
    metric = MathVistaAccuracy()
    metric.update(
        ["The answer is (B).", "So the total is 1,234.", "x = 1.4"],
        [["4"], "1234", "1.45"],
        choices=[["3", "4", "5"], None, None],
    )
    assert metric.compute().item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------
# Metric mechanics shared by all metrics
# ------------------------------------------------------------------------------------------------

BATCHES = {
    VQAAccuracy: (
        ["two", "Yes", "a dog.", ""],
        [humans("2", 3), ["yes"] * 10, humans("dog", 2), humans("x", 9)],
    ),
    ANLS: (["pariss", "ab", "", "Rome"], [["paris"], ["abcd"], [""], ["rome", "roma"]]),
    RelaxedAccuracy: (["12", "11.8", "45%", "yes"], [["12.5"], ["12.5"], ["0.45"], ["Yes"]]),
    MultipleChoiceAccuracy: (["B", "(C)", "A or B", "Answer: D"], ["B", "A", "B", "D"]),
    MathVistaAccuracy: (["5", "x = 1.4532", "The answer is 7", "1/2"], ["5", "1.45", "8", "0.5"]),
    CIDEr: (CIDER_CANDS, CIDER_REFS),
}


@pytest.mark.parametrize("cls", list(BATCHES), ids=lambda c: c.__name__)
def test_batches_accumulate_and_reset(cls):
    preds, targets = BATCHES[cls]
    whole = cls()
    whole.update(preds, targets)
    batched = cls()
    batched.update(preds[:1], targets[:1])
    batched.update(preds[1:3], targets[1:3])
    batched.update(preds[3:], targets[3:])
    expected = whole.compute()
    assert batched.compute().item() == pytest.approx(expected.item(), rel=1e-6)
    assert cls is CIDEr or 0.0 <= expected.item() <= 1.0
    batched.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(batched.compute().item())  # nothing accumulated
    batched.update(preds, targets)
    assert batched.compute().item() == pytest.approx(expected.item(), rel=1e-6)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        VQAAccuracy().update(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        ANLS().update(["a"], [[]])
