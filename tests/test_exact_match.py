"""``vlm.metrics.ExactMatch``: the ``val/acc`` rule (stripped, lower case, any reference)."""

import pytest

from vlm.metrics import ExactMatch, exact_match, normalize_answer


def test_normalisation_strips_and_lowers_only():
    assert normalize_answer("  Red Square\n") == "red square"
    assert normalize_answer("two.") == "two."  # no punctuation or article rules (that is VQA accuracy)


def test_any_reference_matches():
    assert exact_match(" Circle", ["square", "circle"])
    assert not exact_match("circles", ["circle"])


def test_metric_accumulates_and_takes_string_targets():
    metric = ExactMatch()
    metric.update(["3", " Blue "], ["3", ["red", "blue"]])
    metric.update(["square"], [["circle"]])
    assert metric.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metric.update(["a", "b"], [["a"]])
