"""Evaluation metrics that reproduce the official scorers of the benchmarks Idefics2/Idefics3 report.

Every metric is a ``torchmetrics.Metric`` fed with generated texts and reference answers:
``update(preds: list[str], targets: list[list[str]])`` then ``compute() -> tensor``. A target may
also be given as a single string. Scores are accumulated as sum/count states reduced with
``"sum"``, so they are exact under DDP; ``compute()`` returns a float32 scalar in [0, 1] (NaN
before any update), except ``CIDEr`` which returns the CIDEr-D value (x10 scale, usually 0-2).

- ``VQAAccuracy``: VQAv2 / OK-VQA / TextVQA / VizWiz accuracy, ``vqaEval.py`` of GT-Vision-Lab/VQA.
- ``ANLS``: DocVQA / InfographicVQA / ST-VQA average normalised Levenshtein similarity.
- ``CIDEr``: COCO captioning CIDEr-D of pycocoevalcap, with its PTB tokenisation in pure Python.
- ``RelaxedAccuracy``: ChartQA relaxed accuracy (pix2struct's ``relaxed_correctness``).
- ``MultipleChoiceAccuracy``: MMMU / MMBench / AI2D / MMStar accuracy with answer-letter parsing.
- ``MathVistaAccuracy``: MathVista accuracy with rule-based answer extraction (no LLM judge).
- ``ExactMatch``: held-out accuracy of training runs (``val/acc``): equal after ``normalize_answer``.
"""

from __future__ import annotations

from vlm.metrics.anls import ANLS, anls_score, levenshtein_distance
from vlm.metrics.cider import CIDEr, cider_d
from vlm.metrics.exact_match import ExactMatch, exact_match, normalize_answer
from vlm.metrics.mathvista import (
    MathVistaAccuracy,
    extract_mathvista_answer,
    mathvista_match,
    normalize_mathvista_answer,
)
from vlm.metrics.multiple_choice import MultipleChoiceAccuracy, parse_choice_letter
from vlm.metrics.ptb_tokenizer import ptb_tokenize
from vlm.metrics.relaxed import RelaxedAccuracy, relaxed_match
from vlm.metrics.vqa import (
    VQAAccuracy,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_process_digit_article,
    vqa_process_punctuation,
)

__all__ = [
    "ANLS",
    "CIDEr",
    "ExactMatch",
    "MathVistaAccuracy",
    "MultipleChoiceAccuracy",
    "RelaxedAccuracy",
    "VQAAccuracy",
    "anls_score",
    "cider_d",
    "exact_match",
    "extract_mathvista_answer",
    "levenshtein_distance",
    "mathvista_match",
    "normalize_answer",
    "normalize_mathvista_answer",
    "normalize_vqa_answer",
    "parse_choice_letter",
    "ptb_tokenize",
    "relaxed_match",
    "vqa_accuracy",
    "vqa_process_digit_article",
    "vqa_process_punctuation",
]
