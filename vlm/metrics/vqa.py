"""VQA accuracy: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlm.metrics.base import MeanScore, Targets, reference_lists

# Copied key for key from vqaEval.py, including its oddities (capitalised keys such as "Im" can never
# match a lower-cased word, "somebody'd" maps to "somebodyd").
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# "(?!<=\d)" is vqaEval's typo for a look-behind: it is a no-op look-ahead, so a period is removed
# whenever it is not followed by a digit ("5." -> "5", "3.5" kept, ".5" kept).
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip


def vqa_process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: delete or blank out punctuation, then strip periods.

    Each mark of the list (no ``'``, ``:`` or ``.``) is deleted if it touches a space anywhere in the
    text, or if the text has a digit-comma-digit group ("1,000" -> "1000"); otherwise it becomes a
    space ("black/white" -> "black white"). Then periods not followed by a digit are removed, at most
    32 of them: vqaEval passes ``re.UNICODE`` (32) as ``re.sub``'s positional ``count``.
    """
    out = text
    for p in _VQA_PUNCTUATION:
        if (p + " " in text or " " + p in text) or _VQA_COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=re.UNICODE)


def vqa_process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, split on whitespace, map number words "none",
    "zero".."ten" to digits, drop the articles a/an/the, restore missing apostrophes ("dont" ->
    "don't") and join with single spaces."""
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The full answer normalisation of vqaEval.py: newlines/tabs to spaces, strip, then
    ``vqa_process_punctuation`` and ``vqa_process_digit_article``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(pred: str, references: Sequence[str], normalize_unanimous: bool = False) -> float:
    """Accuracy of one answer against the human answers, as ``VQAEval.evaluate`` computes it.

    Answers are stripped (newlines/tabs -> spaces). Exactly as the official script, the prediction
    and references are normalised (``normalize_vqa_answer``) only when the references are not all
    identical: for unanimous references the comparison is on the raw stripped strings, so "Yes"
    scores 0 against ten "yes" (the VQA authors keep text/OCR answers untouched that way).
    ``normalize_unanimous=True`` normalises in every case, like lmms-eval (PR #794) and submissions
    post-processed with MMF's ``EvalAIAnswerProcessor``.

    Score: the mean over the n leave-one-out subsets of ``min(1, matches among the others / k)``.
    With the usual 10 answers (VQAv2, OK-VQA, TextVQA, VizWiz) k = 3: 0/1/2/3+ matching humans give
    0 / 0.3 / 0.6 / 0.9 (1.0 from 4). Other counts: k = min(3, n - 1) for n >= 2, so unanimous
    agreement always scores 1; a single reference is an exact match.
    """
    if not references:
        raise ValueError("VQA accuracy needs at least one reference answer")
    res = pred.replace("\n", " ").replace("\t", " ").strip()
    gts = [g.replace("\n", " ").replace("\t", " ").strip() for g in references]
    if normalize_unanimous or len(set(gts)) > 1:
        gts = [vqa_process_digit_article(vqa_process_punctuation(g)) for g in gts]
        res = vqa_process_digit_article(vqa_process_punctuation(res))
    n = len(gts)
    if n == 1:
        return float(gts[0] == res)
    k = min(3, n - 1)
    matches = sum(g == res for g in gts)
    # Leaving out reference i removes one match exactly when reference i itself matches.
    return sum(min(1.0, (matches - (g == res)) / k) for g in gts) / n


class VQAAccuracy(MeanScore):
    """VQAv2-style soft accuracy averaged over questions (``vqa_accuracy``), in [0, 1].

    ``targets[i]`` holds the human answers of question i (10 for VQAv2/OK-VQA/TextVQA/VizWiz).
    ``normalize_unanimous=False`` reproduces vqaEval.py exactly; see ``vqa_accuracy``.
    """

    def __init__(self, normalize_unanimous: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize_unanimous = normalize_unanimous

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = reference_lists(preds, targets)
        self._add([vqa_accuracy(p, r, self.normalize_unanimous) for p, r in zip(preds, refs)])
