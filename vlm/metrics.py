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
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ANLS",
    "CIDEr",
    "MathVistaAccuracy",
    "MultipleChoiceAccuracy",
    "RelaxedAccuracy",
    "VQAAccuracy",
    "anls_score",
    "cider_d",
    "extract_mathvista_answer",
    "levenshtein_distance",
    "mathvista_match",
    "normalize_mathvista_answer",
    "normalize_vqa_answer",
    "parse_choice_letter",
    "ptb_tokenize",
    "relaxed_match",
    "vqa_accuracy",
    "vqa_process_digit_article",
    "vqa_process_punctuation",
]

Targets = Sequence[Sequence[str] | str]


def _reference_lists(preds: Sequence[str], targets: Targets) -> list[list[str]]:
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
    refs = [[t] if isinstance(t, str) else list(t) for t in targets]
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference answer")
    return refs


class _MeanScore(Metric):
    """Mean of per-sample scores, kept as a float64 sum and a count (both reduced with "sum")."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: Sequence[float]) -> None:
        self.score_sum += math.fsum(scores)
        self.count += len(scores)

    def compute(self) -> Tensor:
        return (self.score_sum / self.count).float()


# --------------------------------------------------------------------------------------------------
# VQA accuracy: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00)
# --------------------------------------------------------------------------------------------------

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


class VQAAccuracy(_MeanScore):
    """VQAv2-style soft accuracy averaged over questions (``vqa_accuracy``), in [0, 1].

    ``targets[i]`` holds the human answers of question i (10 for VQAv2/OK-VQA/TextVQA/VizWiz).
    ``normalize_unanimous=False`` reproduces vqaEval.py exactly; see ``vqa_accuracy``.
    """

    def __init__(self, normalize_unanimous: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize_unanimous = normalize_unanimous

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = _reference_lists(preds, targets)
        self._add([vqa_accuracy(p, r, self.normalize_unanimous) for p, r in zip(preds, refs)])


# --------------------------------------------------------------------------------------------------
# ANLS: the DocVQA / InfographicVQA evaluation script of the RRC (rrc.cvc.uab.es, docvqa.org)
# --------------------------------------------------------------------------------------------------


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions (characters)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        current = [j]
        for i, ca in enumerate(a, 1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(pred: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one answer, exactly as the official DocVQA/InfographicVQA script.

    For each reference, NL = levenshtein(norm(ref), norm(pred)) / max(len(ref), len(pred)) where
    ``norm`` lower-cases, strips and collapses whitespace, while the lengths are those of the raw
    strings (0 / 0 counts as NL = 0, so empty vs empty is a match). The score is 1 - min NL, set
    to 0 when it is below ``threshold``. Note the official comparison is ``1 - NL < threshold``:
    NL exactly 0.5 keeps 0.5, although the ST-VQA paper writes the rule as "NL < tau".
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    det = " ".join(pred.strip().lower().split())
    values = []
    for ref in references:
        length = max(len(ref.upper()), len(pred.upper()))
        dist = levenshtein_distance(" ".join(ref.strip().lower().split()), det)
        values.append(0.0 if length == 0 else dist / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


class ANLS(_MeanScore):
    """Average normalised Levenshtein similarity (``anls_score``) over questions, in [0, 1]."""

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = _reference_lists(preds, targets)
        self._add([anls_score(p, r, self.threshold) for p, r in zip(preds, refs)])


# --------------------------------------------------------------------------------------------------
# PTB tokenisation: pycocoevalcap's PTBTokenizer = Stanford CoreNLP 3.4.1 PTBLexer run with
# "-preserveLines -lowerCase", then removal of its PUNCTUATIONS tokens. The lexer rules below are
# transcribed from PTBLexer.flex (v3.4.1, default options: PTB3 escaping, latex quotes, no
# americanize, split assimilations) in the same order; JFlex picks the longest match over all rules,
# counting trailing context (r1/r2) in the length, ties going to the earlier rule.
# --------------------------------------------------------------------------------------------------

# JFlex [:letter:] / [:digit:] are Java's isLetter / isDigit. Python's \w also holds non-decimal
# numerics (superscripts, vulgar fractions, circled numbers), excluded here.
_NOT_LETTERS = (
    r"\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF\u2776-\u2793\u3007\u3021-\u3029"
)
_L = rf"[^\W\d_{_NOT_LETTERS}]"
_LD = rf"[^\W_{_NOT_LETTERS}]"
_LETTER = (
    rf"(?:{_L}|&[aeiouAEIOU](?i:acute|grave|uml);|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF"
    r"\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487"
    r"\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7"
    r"\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F"
    r"\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955"
    r"\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03"
    r"\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD"
    r"\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC"
    r"\u0EC8-\u0ECD])"
)
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_APOS = r"(?:['\u0092\u2019]|&(?i:apos);)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\n\r\u2028\u2029\u000B\u000C\u0085]"
_SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
    r"[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|[A-Za-z][A-Za-z0-9_:.\-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
)
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|[A-Z\u00C0-\u00D6\u00D8-\u00DE]|{_SGML})"
_NUM = r"\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
# Python alternation takes the first alternative that fits, JFlex the longest: longer ones go first.
_ACRO_SPECIAL = r"(?i:U\.S\.-(?:U\.K|U\.S\.S\.R)|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S)"
_ACRO = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])*)"
_ACRO2 = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])+)"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00AD]+))+"
# Abbreviation lists; a bracketed capital ("[M]iss") is case-sensitive in the lexer.
_ABSTATE = (
    r"(?i:Ala|Ariz)|A(?i:z)|A(?i:rk)|(?i:Calif|Colo|Conn|Ct|Dak)|D(?i:el)|(?i:Fla|Ga)|I(?i:ll)"
    r"|(?i:Ind|Kans?|Ky)|L(?i:a)|M(?i:ass)|(?i:Md|Mich|Minn)|M(?i:iss)|(?i:Mo|Mont|Neb|Nev|Okla)"
    r"|O(?i:re)|P(?i:a)|(?i:Penn|Tenn)|T(?i:ex)|(?i:Va|Vt)|W(?i:ash)|(?i:Wisc?|Wyo)"
)
_ABBREV1 = (
    r"(?:(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri)"
    rf"|{_ABSTATE}|(?i:Inc|Cos?|Corp)|(?i:Pp?t)[ye](?i:s)?|(?i:Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl"
    r"|Sys|tel|est|ext|sq|Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq|Bldg))\."
)
_ABTITLE = (
    r"(?i:Mr|Mrs|Ms)|M(?i:iss)|(?i:Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj"
    r"|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
    r"|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc)"
)
_ABBREV4 = (
    rf"(?:{_ACRO}|{_ABTITLE}|(?i:vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|Dept)"
    r"|(?i:M)[ft](?i:g))"
)
_ACRONYM_FOLLOWERS = (
    r"(?:A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)"
    r"|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\.|s\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)"
    r"|S(?i:he|ince|o|ome|uch)|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)"
    rf"|Y(?i:et|ou)|{_SGML})"
)
_PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
    r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
)
_MISC_SYMBOL = (
    r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387"
    r"\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A"
    r"\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
    r"\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF"
    r"\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]"
)
_FILENAME = (
    rf"(?:{_LETTER}|\d)+(?:\.(?:{_LETTER}|\d)+)*\.(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h"
    r"|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"
)
_PAREN_TOKENS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_QUOTE_MAPS = [
    (re.compile("[\u0091\u2018\u201b\u2039]"), "`"),
    (re.compile("[\u0092\u2019\u203a]"), "'"),
    (re.compile("[\u0093\u201c\u00ab]"), "``"),
    (re.compile("[\u0094\u201d\u00bb]"), "''"),
]


def _latex_quotes(left: bool) -> Callable[[str], list[str]]:
    single, double = ("`", "``") if left else ("'", "''")

    def convert(tok: str) -> list[str]:
        tok = re.sub("&apos;|'", single, tok)
        tok = re.sub('"|&quot;', double, tok)
        for pattern, repl in _QUOTE_MAPS:
            tok = pattern.sub(repl, tok)
        return [tok]

    return convert


def _same(tok: str) -> list[str]:
    return [tok]


def _desoft(tok: str) -> list[str]:
    return [tok.replace("\u00ad", "") or "-"]


def _amp(tok: str) -> list[str]:
    return [re.sub("(?i:&amp;)", "&", tok)]


def _nbsp(tok: str) -> list[str]:
    return [tok.replace(" ", "\u00a0")]


def _currency(tok: str) -> list[str]:
    return [re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok.replace("\u00a2", "cents").replace("\u00a3", "#"))]


def _parens(tok: str) -> list[str]:
    return [tok.replace("(", "-LRB-").replace(")", "-RRB-")]


def _with_period(tok: str) -> list[str]:
    # The lexer pushes the final period back and also returns it as a token of its own.
    return [tok, "."]


def _skip(tok: str) -> list[str]:
    return []


# (pattern, action): the pattern's group "tok" is the token text, the rest of the match is trailing
# context (it counts for the longest match but is scanned again).
_PTB_RULES: list[tuple[re.Pattern[str], Callable[[str], list[str]]]] = [
    (re.compile(p), action)
    for p, action in [
        (r"(?P<tok>(?i:c\+\+|[cf]#))", _same),
        (r"(?P<tok>(?i:can))(?i:not)", _same),
        (r"(?P<tok>'(?i:t))(?i:was|is)", _same),
        (r"(?=(?i:gonna|gotta|lemme|gimme|wanna))(?P<tok>\w{3})\w{2}", _same),
        (rf"(?P<tok>{_SGML})", _nbsp),
        (r"(?P<tok>&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015])", lambda t: ["--"]),
        (r"(?P<tok>&(?i:amp);)", _amp),
        (r"(?P<tok>&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);)", _same),
        (rf"(?P<tok>{_WORD}){_REDAUX}", _desoft),
        (rf"(?P<tok>[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*){_SREDAUX}", _desoft),
        (rf"(?P<tok>{_WORD})", _desoft),
        (rf"(?P<tok>{_APOS}(?i:n){_APOS}?)", _same),
        (rf"(?P<tok>[lLdDjJ]{_APOS}|(?i:Dunkin|somethin|ol){_APOS}|{_APOS}(?i:em))", _same),
        (rf"(?P<tok>[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*)", _same),
        (rf"(?P<tok>{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?))", _same),
        (rf"(?P<tok>{_L}{_L}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*)", _same),
        (rf"(?P<tok>{_APOS}(?i:cause)|(?i:cont'd)\.?)", _same),
        (r"(?P<tok>(?i:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l))", _same),
        (rf"(?P<tok>(?i:O){_APOSETC}(?i:o))", _same),
        (rf"(?P<tok>(?i:y){_APOS}){_L}", _same),
        (r"(?P<tok>(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-])", _same),
        (
            r"(?P<tok>(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
            r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
            r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?)",
            _same,
        ),
        (
            r"(?P<tok>(?:&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@"
            r"(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&(?i:gt);|>)?)",
            _same,
        ),
        (rf"(?P<tok>@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+)", _same),
        (rf"(?P<tok>{_REDAUX})[^A-Za-z]", _latex_quotes(False)),
        (rf"(?P<tok>{_SREDAUX})[^A-Za-z]", _latex_quotes(False)),
        (r"(?P<tok>\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4})", _same),
        (rf"(?P<tok>[\-+]?(?:{_NUM}))", _desoft),
        (
            r"(?P<tok>[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+))",
            _same,
        ),
        (r"(?P<tok>(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4})", _nbsp),
        (r"(?P<tok>[\u00BC\u00BD\u00BE\u2153-\u215E])", lambda t: [_FRACTIONS.get(t, t)]),
        (
            r"(?P<tok>-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-)|(?i:S)(?:&|&(?i:amp);)(?i:P-500)"
            rf"|(?i:S)(?:&|&(?i:amp);)(?i:Ls)|(?i:Cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est))",
            _amp,
        ),
        (r"(?P<tok>[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})", _same),
        (r"(?P<tok>[A-Z]*\$|#)", _same),
        (
            r"(?P<tok>[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6])",
            _currency,
        ),
        # An acronym before a capitalised function word ends the sentence: "I." -> "I" ".", and
        # "U.S." -> "U.S." "." (the lexer pushes the period back and scans it again).
        (rf"(?P<tok>[A-Za-z])\.{_SPACENL}+{_ACRONYM_FOLLOWERS}{_SPACENL}", _same),
        (rf"(?P<tok>{_ACRO}\.){_SPACENL}+{_ACRONYM_FOLLOWERS}{_SPACENL}", _with_period),
        (rf"(?P<tok>(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.){_SPACENL}?\d", _same),
        (rf"(?P<tok>(?i:pt)[eyEY]\.|(?i:co)\.){_SPACE}(?i:ltd|lim)", _same),
        (rf"(?P<tok>{_ABBREV1}){_SENTEND}", _with_period),
        (rf"(?P<tok>{_ABBREV1})[\s\S]{{2}}", _same),
        (rf"(?P<tok>{_ABBREV1})", _with_period),
        (rf"(?P<tok>{_ABBREV4}\.)", _same),
        (rf"(?P<tok>{_ABBREV4}){_SPACE}", _same),
        (rf"(?P<tok>{_ACRO}){_SPACENL}", _same),
        (rf"(?P<tok>{_APOS}[0-9][0-9]){_SPACENL}", _same),
        (rf"(?P<tok>{_FILENAME})(?:{_SPACENL}|[.?!,])", _same),
        (rf"(?P<tok>{_WORD}\.)[,;:\u3001]", _desoft),
        (rf"(?P<tok>{_PHONE})", lambda t: _parens(_nbsp(t)[0])),
        (r"(?P<tok>\"|&(?i:quot);)[A-Za-z0-9$]", _latex_quotes(True)),
        (r"(?P<tok>\"|&(?i:quot);)", _latex_quotes(False)),
        (r"(?P<tok>\x7f)", _skip),
        (r"(?P<tok><|&(?i:lt);)", lambda t: ["<"]),
        (r"(?P<tok>>|&(?i:gt);)", lambda t: [">"]),
        (r"(?P<tok>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]", _parens),
        (
            r"(?P<tok>[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
            r"|\([\^x=~<>']-[\^x=~<>'`]\))",
            _parens,
        ),
        (r"(?P<tok>[(){}\[\]])", lambda t: [_PAREN_TOKENS[t]]),
        (r"(?P<tok>-+)", lambda t: ["--" if 3 <= len(t) <= 4 else t]),
        (r"(?P<tok>\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026])", lambda t: ["..."]),
        (r"(?P<tok>@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:\u3001]|[?!]+)", _same),
        (r"(?P<tok>[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002=/])", _same),
        (rf"(?P<tok>{_HTHING}\.)[,;:\u3001]", _desoft),
        (rf"(?P<tok>{_HTHING})", _desoft),
        (rf"(?P<tok>{_THING}\.)[,;:\u3001]", _same),
        (rf"(?P<tok>{_THING})", _same),
        (rf"(?P<tok>{_THINGA}\.)[,;:\u3001]", _amp),
        (rf"(?P<tok>{_THINGA})", _amp),
        (r"(?P<tok>')[A-Za-z][^ \t\n\r\u00A0]", _latex_quotes(True)),
        (
            rf"(?P<tok>{_REDAUX}|{_SREDAUX}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092"
            rf"\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{{1,2}}|{_APOS})",
            _latex_quotes(False),
        ),
        (rf"(?P<tok><<|>>|{_MISC_SYMBOL})", _same),
        (r"(?P<tok>\x00|[ \t\u00A0\u2000-\u200A\u3000]+|[\u200B\u200E\u200F\uFEFF])", _skip),
        # Line breaks become "*NL*" tokens with -preserveLines; pycocoevalcap has replaced "\n".
        (r"(?P<tok>\r|\r?\n|[\u2028\u2029\u000B\u000C\u0085])", _skip),
        (r"(?P<tok>&(?i:nbsp);)", _skip),
    ]
]
# Shortcut for the lexer's SPACES and NEWLINE rules: no other rule starts with a space, tab or line
# break. A run of spaces is one match, so a no-break space after a space cannot open a URL token.
_PTB_SPACES = re.compile(r"[ \t\u00A0\u2000-\u200A\u3000]+|[\n\r\x0c]")
# pycocoevalcap's PTBTokenizer.PUNCTUATIONS. It is compared with the lower-cased output, so the
# bracket tokens -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- are kept, as in the official evaluation.
_PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def _ptb_lex(text: str) -> list[str]:
    """Scan as JFlex does: at each position the longest match over all rules, the earliest on ties."""
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] in " \t\n\r\x0c":
            pos = _PTB_SPACES.match(text, pos).end()
            continue
        best: tuple[Callable[[str], list[str]], str] | None = None
        best_len = 0
        for pattern, action in _PTB_RULES:
            m = pattern.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best, best_len = (action, m.group("tok")), m.end() - pos
        if best is None:  # untokenizable character: deleted (the lexer's default "firstDelete")
            pos += 1
            continue
        action, tok = best
        tokens.extend(action(tok))
        pos += len(tok)
    return tokens


def ptb_tokenize(text: str) -> str:
    """Tokenise a caption as pycocoevalcap's ``PTBTokenizer`` does, without Java.

    That tokenizer runs Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` on the
    caption (newlines replaced by spaces) and drops the tokens of its ``PUNCTUATIONS`` list. This is
    a transcription of the 3.4.1 lexer rules: contractions are split ("don't" -> "do n't", "it's" ->
    "it 's", "cannot" -> "can not", "gonna" -> "gon na"), hyphenated words and numbers stay whole,
    quotes become `` / '' and are dropped with . , ; : ? ! - -- ..., brackets become -lrb- -rrb- and
    are kept, abbreviations such as "mr." or "u.s." keep their period. Returns the space-joined
    lower-cased tokens. Other line-break characters (\\r, U+2028, ...) are treated as spaces
    (pycocoevalcap would shift its lines on them). Not reproducible per caption: the lexer also sees
    the start of the next caption of pycocoevalcap's file, which changes the token only for a
    caption ending in a single letter or "no."-like abbreviation with a period ("plan b." stays
    "b." here, while Java splits it when the next caption starts with "A", "The", a digit, ...).
    """
    # In pycocoevalcap every caption is followed by a newline (the next line of the file): it is
    # trailing context for some rules ("we've" -> "we 've" rather than "we ve").
    tokens = _ptb_lex(text.replace("\n", " ") + "\n")
    # Java's toLowerCase(Locale.ENGLISH) and str.lower() agree on the text such captions contain.
    line = " ".join(tokens).lower()
    return " ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATIONS)


# --------------------------------------------------------------------------------------------------
# CIDEr-D: pycocoevalcap cider/cider_scorer.py (the coco-caption evaluation server's "CIDEr")
# --------------------------------------------------------------------------------------------------


def _ngram_counts(sentence: str, n: int) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D of tokenised captions, reproducing pycocoevalcap's ``CiderScorer``.

    n-grams (1..n) of whitespace-split words are weighted by tf-idf, with document frequencies
    counted over the reference sets of this corpus and idf = log(#images) - log(max(1, df)). For
    each reference, per-n cosine similarity with clipping (sum of min(cand, ref) * ref over the
    norms), times a Gaussian length penalty exp(-delta^2 / (2 sigma^2)); averaged over n and over
    references and multiplied by 10. As in pycocoevalcap, the lengths entering delta are counted
    in bigrams (its ``if n == 1`` tests the 2-gram index); that equals the word-count difference
    whenever the similarity is non-zero. The corpus CIDEr-D is the mean of these scores.
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates for {len(references)} reference sets")
    if not candidates:
        return []
    cand_counts = [_ngram_counts(c, n) for c in candidates]
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({g for counts in refs for g in counts})
    log_images = math.log(float(len(candidates)))

    def vectorise(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = float(tf) * (log_images - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight**2
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = vectorise(cand)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = vectorise(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return scores


# Separators of the byte encoding of the CIDEr state; str.split() treats both as whitespace, so they
# can never occur inside a tokenised caption.
_CAPTION_SEP, _RECORD_SEP = "\x1f", "\x1e"


class CIDEr(Metric):
    """Corpus CIDEr-D (``cider_d``) of generated captions against reference captions (COCO style).

    Captions are tokenised with ``ptb_tokenize`` as in the official evaluation (``tokenize=False``
    for captions that are already tokenised). CIDEr's idf is computed over the whole evaluated
    corpus, so the tokenised captions are kept until ``compute``: as the UTF-8 bytes of
    separator-delimited records, stored as a list state of float tensors (in the metric's dtype:
    the empty-rank placeholder torchmetrics adds is of that dtype) and reduced with "cat". Under DDP
    every process therefore scores the full gathered corpus; single-process results are identical
    to pycocoevalcap's. The returned value is the CIDEr-D itself (x10 scale, typically 0-2), not
    bounded by 1; samples duplicated by a distributed sampler are counted twice.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        self.add_state("records", [], dist_reduce_fx="cat")

    def _prepare(self, caption: str) -> str:
        # Re-joining on whitespace keeps CIDEr's split() unchanged and removes the separators.
        return " ".join((ptb_tokenize(caption) if self.tokenize else caption).split())

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = _reference_lists(preds, targets)
        text = "".join(
            _CAPTION_SEP.join([self._prepare(p), *(self._prepare(r) for r in rs)]) + _RECORD_SEP
            for p, rs in zip(preds, refs)
        )
        if not text:
            return
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        self.records.append(data.to(device=self.device, dtype=self.dtype))

    def compute(self) -> Tensor:
        if isinstance(self.records, Tensor):  # after a distributed sync
            parts = [self.records]
        else:
            parts = list(self.records)
        data = torch.cat(parts).to(torch.uint8).cpu().numpy().tobytes() if parts else b""
        candidates, references = [], []
        for record in data.decode("utf-8").split(_RECORD_SEP)[:-1]:
            pred, *refs = record.split(_CAPTION_SEP)
            candidates.append(pred)
            references.append(refs)
        if not candidates:
            return torch.tensor(float("nan"))
        return torch.tensor(math.fsum(cider_d(candidates, references, self.n, self.sigma)) / len(candidates))


# --------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy: pix2struct/metrics.py relaxed_correctness (Methani et al. 2020)
# --------------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?%?")


def _to_float(text: str) -> float | None:
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(pred: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness (pix2struct's ``relaxed_correctness``).

    Both strings are stripped. If both parse as numbers and the target is not 0, the prediction is
    correct when |pred - target| / |target| <= 5%; otherwise it must equal the target up to case.
    A trailing "%" divides by 100 ("45%" equals "0.45", not "45"), as pix2struct does. Additions to
    pix2struct (which calls float() on the raw strings): surrounding whitespace is stripped and
    thousands separators in well-formed groups ("1,234.5") are removed.
    """
    pred, target = pred.strip(), target.strip()
    pred_value, target_value = _to_float(pred), _to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    return pred.lower() == target.lower()


class RelaxedAccuracy(_MeanScore):
    """ChartQA relaxed accuracy: a prediction scores 1 if it ``relaxed_match``-es any target."""

    def __init__(self, max_relative_change: float = 0.05, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_relative_change = max_relative_change

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        refs = _reference_lists(preds, targets)
        self._add(
            [
                float(any(relaxed_match(p, t, self.max_relative_change) for t in r))
                for p, r in zip(preds, refs)
            ]
        )


# --------------------------------------------------------------------------------------------------
# Multiple choice: answer-letter parsing (explicit patterns, then VLMEvalKit's can_infer rules)
# --------------------------------------------------------------------------------------------------

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


class MultipleChoiceAccuracy(_MeanScore):
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
        refs = _reference_lists(preds, targets)
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


# --------------------------------------------------------------------------------------------------
# MathVista: evaluation/extract_answer.py + calculate_score.py of lupantech/MathVista, with the
# GPT-4 extraction step replaced by rules
# --------------------------------------------------------------------------------------------------

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


class MathVistaAccuracy(_MeanScore):
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
        refs = _reference_lists(preds, targets)
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
