"""The Docmatix-style pipeline (``datamodules.docmatix``), the pure parts: output parsing, the filters on
crafted bad generations and the generation prompt (end to end runs: tests/test_docmatix_pipeline.py)."""

from __future__ import annotations

import pytest

from datamodules.docmatix import (
    OUTPUT_FORMAT,
    TEMPLATES,
    FilterConfig,
    ParsedGeneration,
    PdfDocument,
    QAPair,
    build_prompt,
    drop_reason,
    filter_pairs,
    parse_generation,
)

# ------------------------------------------------------------------------------------------ parsing


def test_parse_well_formed():
    parsed = parse_generation("Q: What is the date?\nA: 5 May 2021\n\nQ: Who signed it?\nA:  Ann Lee \nEND\n")
    assert parsed.pairs == [QAPair("What is the date?", "5 May 2021"), QAPair("Who signed it?", "Ann Lee")]
    assert parsed.complete and not parsed.malformed


def test_parse_malformed_fragments():
    text = "\n".join(
        [
            "Sure! Here are the pairs:",  # preamble
            "A: an answer without its question",  # orphan_answer
            "Q: What is the total?",
            "Q: What is the date?",  # the previous question is dangling
            "A: 5 May 2021",
            "Question: Who signed it?",  # not the strict format: continues the answer above
            "Q: Who signed it?",
            "A: Ann Lee",
            "Q: What is the title?",  # dangling at END
            "END",
            "Q: after the end?",
            "A: ignored",
        ]
    )
    parsed = parse_generation(text)
    assert parsed.pairs == [
        QAPair("What is the date?", "5 May 2021\nQuestion: Who signed it?"),
        QAPair("Who signed it?", "Ann Lee"),
    ]
    assert parsed.complete
    assert parsed.malformed == {"preamble": 1, "orphan_answer": 1, "dangling_question": 2, "after_end": 2}
    assert drop_reason(parsed.pairs[0]) == "ill_formed"  # the continuation makes it multi-line


def test_parse_stray_truncated_and_empty():
    parsed = parse_generation("Q: What is the date?\nA: 5 May 2021\n---\nrandom words\nQ: Who signed")
    assert parsed.pairs == [QAPair("What is the date?", "5 May 2021\n---\nrandom words")]
    assert not parsed.complete and parsed.malformed == {"dangling_question": 1}
    garbage = parse_generation("striped fromer Oval tor What mu stands")
    assert garbage.pairs == [] and garbage.malformed == {"preamble": 1} and not garbage.complete
    assert parse_generation("") == ParsedGeneration([], False)
    lowercase = parse_generation("q: What is the date?\na: May\nEND")  # prefixes are case-sensitive
    assert lowercase.pairs == [] and lowercase.malformed == {"preamble": 2}


# ------------------------------------------------------------------------------------------ filters

# (reason, a pair the rule drops, a near miss it keeps)
CASES = [
    ("empty", ("What is the total?", "  "), ("What is the total?", "0")),
    ("empty", ("", "5"), ("What is it?", "5")),
    ("ill_formed", ("What is the total?", "5\nand more"), ("What is the total?", "5 and more")),
    ("ill_formed", ("<question>", "<answer>"), ("What is the answer to question 3?", "Paris")),
    ("ill_formed", ("What is the total?", "A: 5"), ("What is the total?", "A5 paper")),
    ("ill_formed", ("What is the total?", "..."), ("What is the total?", "$5")),
    ("too_short", ("Why?", "Because it rained."), ("Who wrote?", "Ann")),
    ("too_long", ("What does the note say?", "x" * 501), ("What does the note say?", "x" * 500)),
    ("too_long", ("Why " + "y" * 497 + "?", "No reason."), ("Why " + "y" * 495 + "?", "No reason.")),
    ("no_question_mark", ("List the items.", "Pens, paper."), ("Which items are listed?", "Pens, paper.")),
    ("no_question_mark", ("What is the total? Explain", "5"), ("Explain: what is the total?", "5")),
    (
        "refusal",
        ("What is the salary?", "I'm sorry, but I cannot answer that."),
        ("Why does the letter say I am sorry?", "The manager says he is sorry for the delay."),
    ),
    (
        "refusal",
        ("What is the salary?", "As an AI language model, I cannot help with that."),
        ("What language model is described?", "A large language model trained on news."),
    ),
    ("unanswerable", ("Who is the author?", "I don't know."), ("What does Ann know?", "She knows the code.")),
    ("unanswerable", ("Who is the author?", "N/A"), ("What is the model name?", "NA-5")),
    ("unanswerable", ("Who is the author?", "Not mentioned."), ("Is a refund possible?", "No.")),
    ("unanswerable", ("What is the fee?", "Unknown"), ("Which band is named?", "Unknown Pleasures")),
    (
        "unanswerable",
        ("What is the date?", "The date is not specified in the document."),
        ("Is the deposit refundable?", "The deposit is not refundable."),
    ),
    (
        "unanswerable",
        ("What is the date?", "The document does not mention a date."),
        ("What does the document mention?", "A date in May."),
    ),
    (
        "unanswerable",
        ("How many staff are there?", "It cannot be determined from the page."),
        ("What can be determined?", "The rate can be determined monthly."),
    ),
    (
        "unanswerable",
        ("Who signed?", "There is no information about the signatory."),
        ("What does the form ask for?", "Information about income."),
    ),
    (
        "unanswerable",
        ("How many errors were found?", "Unanswerable."),
        ("How many errors were found?", "None."),
    ),
    ("code", ("How is the total computed?", "def total(x): return sum(x)"), ("Who is in class A?", "Ann")),
    ("code", ("What does the script do?", "x = load(y);"), ("How is it paid?", "Payment (cash); cheque")),
    ("code", ("What is the heading?", "<div>Total</div>"), ("How do a and b compare?", "a < b and b > c")),
    ("code", ("Which query is used?", "SELECT name FROM staff"), ("Who selects staff?", "The board.")),
    ("code", ("What is the record?", '{"total": 5}'), ("What is the ratio?", "3:1 (by weight)")),
    ("code", ("What is the rule?", "a == b"), ("What is 5 - 3?", "5 - 3 = 2")),
    (
        "code",
        ("How is it installed?", "import numpy as np"),
        ("Which goods are imported?", "Imported cars and numpy-like arrays."),
    ),
    (
        "copies_question",
        ("What is the invoice number?", "What is the invoice number?"),
        ("What is the invoice number?", "The invoice number is 12345."),
    ),
    (
        "copies_question",
        ("What is the invoice number?", "what is the invoice number 12345"),
        ("What is the invoice number?", "12345, the invoice number"),
    ),
    ("copies_question", ("What is it?", "What is it"), ("What is it?", "What is item 5")),
]


@pytest.mark.parametrize(
    ("reason", "bad", "near_miss"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_drop_reason(reason, bad, near_miss):
    assert drop_reason(QAPair(*bad)) == reason
    assert drop_reason(QAPair(*near_miss)) is None


def test_filter_thresholds_are_configurable():
    pair = QAPair("Who wrote?", "x" * 40)
    assert drop_reason(pair, FilterConfig(min_question_chars=11)) == "too_short"
    assert drop_reason(pair, FilterConfig(max_chars=39)) == "too_long"
    assert drop_reason(pair, FilterConfig(min_question_chars=10, max_chars=40)) is None


def _parsed(*pairs: tuple[str, str], complete: bool = True) -> ParsedGeneration:
    return ParsedGeneration([QAPair(q, a) for q, a in pairs], complete)


def test_filter_duplicates_truncation_and_limit():
    seen: set[tuple[str, str]] = set()
    first = _parsed(
        ("What is the date?", "5 May"),
        ("what is the date ?", "6 May"),  # same question once normalised
        ("When was it signed?", "5 May"),  # same answer, other question: kept
        ("Who signed it?", "N/A"),  # a bad pair does not use up the limit
        ("Where was it signed?", "Paris"),
        ("Why was it signed?", "For the sale."),  # over the limit of 3
    )
    kept, dropped = filter_pairs(first, max_pairs=3, seen_in_run=seen)
    assert [p.question for p in kept] == ["What is the date?", "When was it signed?", "Where was it signed?"]
    assert dropped == {"duplicate_in_document": 1, "unanswerable": 1, "over_limit": 1}
    assert len(kept) + sum(dropped.values()) == len(first.pairs)
    assert seen == {(p.question, p.answer) for p in kept}

    second = _parsed(("What is the date?", "5 May"), ("What is the date?", "7 May"), complete=False)
    kept, dropped = filter_pairs(second, max_pairs=3, seen_in_run=seen)
    assert kept == [] and dropped == {"duplicate_in_run": 1, "truncated": 1}
    third = _parsed(("What is the date?", "7 May"), ("Who signed it?", "Ann"), complete=False)
    kept, dropped = filter_pairs(third, max_pairs=3, seen_in_run=seen)
    assert kept == [QAPair("What is the date?", "7 May")] and dropped == {"truncated": 1}


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_has_transcription_template_and_format():
    document = PdfDocument("pdfa", "0000001", texts=["Total 12\nDate May", "Name Ann"], n_pages=2)
    prompt = build_prompt(document, template=1, n_pairs=8, max_ocr_chars=8000, max_chars=500)
    assert "Page 1:\nTotal 12\nDate May\n\nPage 2:\nName Ann" in prompt
    assert TEMPLATES[1].format(n_pairs=8) in prompt and prompt.endswith(OUTPUT_FORMAT)
    assert "2-page document" in prompt and "at most 500 characters" in prompt
    cut = build_prompt(document, template=0, n_pairs=8, max_ocr_chars=20, max_chars=500)
    assert "Page 1:\nTotal 12\n</document>" in cut  # cut at the last line end within 20 characters
    assert len(TEMPLATES) == 5
