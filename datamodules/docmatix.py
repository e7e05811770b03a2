"""Docmatix-style synthetic document Q/A: OCR transcriptions -> LLM Q/A pairs -> filters -> Docmatix parquet.

What the Idefics3 paper says (arXiv 2408.12637, §5.1.2, Figure 4, Table 2; as summarised in
``/work/shared/seeds/000_d1a1c1a2cba56262.txt``, §3 "Docmatix dataset construction"): *"Start from
PDFA English transcriptions; generate Q/A pairs with Phi-3-small using 5 prompt templates; filter
out low-quality pairs (regex-based code removal, 'unanswerable' rejection), discarding about
15%."*; 2.4M images and 9.5M Q/A pairs from 1.3M PDFs. ``seeds/002_83f6082056775326.txt`` adds:
*"Rows were selected from the documents, from which Q/A pairs were generated from a choice of 5
templates. Hallucinations were filtered, and the document-related contextual input from the
question was replaced by the document's image."* Neither seed gives the wording of the five
templates, nor the output format, nor the regexes: ``TEMPLATES``, ``OUTPUT_FORMAT`` and the
filters below are ours, written to that description (five templates, one picked per document
with the run's seed; code and unanswerable answers removed by regex).

Pipeline (``generate_docmatix``; CLI ``python -m datamodules.docmatix``):

1. Documents from the PDFA / IDL readers (``datamodules.sources.iter_samples``, one sample per
   page with its OCR lines), grouped back into whole documents; documents with more than
   ``max_pages`` non-empty pages or a transcription shorter than ``min_ocr_chars`` are skipped
   (our stand-in for "rows were selected"; 9.5M pairs / 2.4M images is about 4 pairs per page,
   hence ``pairs_per_page=4``). The reader renders every page, also those of a skipped document.
2. The prompt (``build_prompt``): a template filled with the transcription (pages separated by
   ``Page i:`` headers, cut at ``max_ocr_chars``) and the number of pairs to write, then
   ``OUTPUT_FORMAT``.
3. Generation by any ``Generate`` callable (a batch of prompts -> a batch of texts, ``None`` for a
   prompt that cannot be generated); ``CausalLMGenerator`` wraps a local transformers causal LM.
4. ``parse_generation``: the strict ``Q: ...`` / ``A: ...`` / ``END`` format.
5. ``filter_pairs``: the rules of ``drop_reason`` plus duplicates and the per-document limit.
6. One Docmatix row per document with a kept pair (``images`` = its page images as PNG or JPEG
   bytes, ``texts`` = ``[{user, assistant, source: "PDFA key: <key>"}]``; IDL documents say
   ``"IDL key: <key>"``), written as ``{out}/data/train-{i:05d}-of-{n:05d}-{16 hex}.parquet`` with
   the exact Arrow schema and ``huggingface`` metadata of the hub files (docs/DATA_FORMATS.md §5), which
   ``iter_samples("docmatix", ...)`` reads back.

Every document and every parsed pair is counted: documents read = written + dropped by reason,
pairs parsed = kept + dropped by reason (``RunSummary``). ``generation_summary.json`` in ``out``
records the counts and the configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from datamodules.sample import Sample
from datamodules.shard_files import HF_FEATURES, ParquetShardWriter, encode_image
from datamodules.sources import RecordStats, iter_samples
from datamodules.sources.conversations import CONVERSATION_SCHEMA

SOURCES = ("pdfa", "idl")
SOURCE_PREFIX = {"pdfa": "PDFA key", "idl": "IDL key"}  # m4 recognises Docmatix rows by "PDFA key"
Generate = Callable[[list[str]], list[str | None]]

# ----------------------------------------------------------------------------------------- prompts

TEMPLATES: tuple[str, ...] = (
    # 0: general
    "Write {n_pairs} diverse question-answer pairs about the content of this document.",
    # 1: extractive
    "Write {n_pairs} questions whose answers are short spans copied exactly from this document "
    "(names, dates, numbers, titles, places), each followed by its answer.",
    # 2: reasoning
    "Write {n_pairs} questions that require combining or comparing several pieces of information from "
    "this document, each followed by a short answer and a one-sentence justification.",
    # 3: overview
    "Write {n_pairs} questions about the purpose, main topic, intended audience or structure of this "
    "document, each followed by an answer of one or two sentences.",
    # 4: numbers and lists
    "Write {n_pairs} questions about the numbers, amounts, dates, tables or lists in this document, each "
    "followed by its answer; if the document has none, ask about its key facts instead.",
)
PROMPT_HEADER = (
    "Below is the text of a {n_pages}-page document, transcribed by OCR.\n\n<document>\n{text}\n</document>"
)
RULES = (
    "Rules:\n"
    "- Every question must be answerable from the document alone; never ask what it does not say.\n"
    '- Call it "the document", never "the text", "the transcription" or "the OCR".\n'
    "- Every question ends with a question mark.\n"
    "- Every question and every answer fits on one line of at most {max_chars} characters.\n"
    "- Do not write code."
)
OUTPUT_FORMAT = (
    "Reply in exactly this format, with nothing before the first question and nothing after END:\n"
    "Q: <question>\nA: <answer>\nQ: <question>\nA: <answer>\n...\nEND"
)


@dataclass
class Document:
    """One PDF: its (non-empty) page images and their OCR text, as the PDFA/IDL readers give them.

    ``n_pages`` counts every non-empty page; once it exceeds the grouping limit, ``pages`` and
    ``texts`` stop growing (the document is skipped anyway) so a 3000-page IDL file stays small.
    """

    source: str
    key: str
    pages: list[Image.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    n_pages: int = 0

    def transcription(self, max_chars: int | None = None) -> str:
        """The OCR text (pages headed ``Page i:`` when several), cut to ``max_chars`` at a line end."""
        if len(self.texts) == 1:
            text = self.texts[0]
        else:
            text = "\n\n".join(f"Page {i + 1}:\n{page}" for i, page in enumerate(self.texts))
        if max_chars is None or len(text) <= max_chars:
            return text
        cut = text[:max_chars]
        return cut[: cut.rfind("\n")] if "\n" in cut else cut


def build_prompt(document: Document, template: int, n_pairs: int, max_ocr_chars: int, max_chars: int) -> str:
    """The prompt: ``PROMPT_HEADER`` (transcription), ``TEMPLATES[template]``, ``RULES``, ``OUTPUT_FORMAT``.

    ``n_pairs`` is the number of pairs asked for; the transcription is cut at ``max_ocr_chars``.
    """
    header = PROMPT_HEADER.format(n_pages=len(document.texts), text=document.transcription(max_ocr_chars))
    task = TEMPLATES[template].format(n_pairs=n_pairs)
    return "\n\n".join([header, task, RULES.format(max_chars=max_chars), OUTPUT_FORMAT])


# ----------------------------------------------------------------------------------------- parsing


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


# ----------------------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of ``drop_reason``: question length at least ``min_question_chars``, question and
    answer at most ``max_chars`` (500: m4 drops Docmatix rows with a longer turn, docs/DATA_FORMATS.md §5)."""

    min_question_chars: int = 10
    max_chars: int = 500


_I = re.IGNORECASE
_PLACES = r"(?:document|text|page|passage|transcription|context|ocr)"
REFUSAL = re.compile(
    r"\bI(?:'m| am) sorry\b|\bI apologi[sz]e\b|\bas an AI\b|\bas a (?:large )?language model\b"
    r"|\bI (?:cannot|can't|can not|am unable to|won't)"
    r" (?:help|answer|assist|provide|comply|generate|do that)\b",
    _I,
)
UNANSWERABLE = re.compile(
    r"\bI (?:do not|don't|dont) know\b|\bI(?:'m| am) not (?:sure|certain)\b|\bunanswerable\b"
    r"|\b(?:cannot|can ?not|can't|could not|couldn't) be"
    r" (?:determined|answered|found|inferred|known|identified)\b"
    r"|\bnot (?:explicitly |clearly |directly )?"
    rf"(?:mentioned|specified|stated|provided|given|indicated|listed) (?:in|by|on) (?:the|this) {_PLACES}\b"
    rf"|\b(?:the|this) {_PLACES} (?:does not|doesn't|did not)"
    r" (?:say|mention|specify|state|provide|contain|include|indicate|give)\b"
    r"|\bno (?:information|mention)\b|\b(?:not possible|impossible) to (?:determine|answer|tell|know|say)\b"
    r"|\b(?:insufficient|not enough) information\b",
    _I,
)
# Whole answers (lower-cased, outer punctuation stripped) that say "no answer".
NON_ANSWERS = frozenset(
    {
        "n/a",
        "n / a",
        "na",
        "unknown",
        "unclear",
        "unanswerable",
        "not applicable",
        "not available",
        "no answer",
    }
    | {f"not {word}" for word in ("mentioned", "specified", "stated", "given", "provided", "known", "found")}
)
CODE = re.compile(
    r"```|\bdef\s+\w+\s*\(|^\s*class\s+\w+\s*[(:]|^\s*(?:import\s+\w+|from\s+[\w.]+\s+import\b)"
    r"|#include\s*[<\"]"
    r"|\bfunction\s*\w*\s*\(|\b\w+\([^()]*\)\s*;|</?[a-z][a-z0-9]*(?:\s[^<>]*)?/?>|\bSELECT\b.+\bFROM\b"
    r"|&&|\|\||==|!=|=>|\{\s*\"[^\"]*\"\s*:"
)
PLACEHOLDER = re.compile(r"<\s*/?\s*(?:question|answer)\s*>|\[\s*(?:question|answer)\s*\]|^[QA]\s*:", _I)
_ALNUM = re.compile(r"[^\W_]")


def normalize(text: str) -> str:
    """Lower-cased words and numbers only, single-spaced: what duplicate and copy checks compare."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def _is_non_answer(answer: str) -> bool:
    return answer.lower().strip(" .!?,;:'\"()[]") in NON_ANSWERS


def drop_reason(pair: QAPair, config: FilterConfig = FilterConfig()) -> str | None:
    """Why one pair is dropped on its own (``None``: kept), first matching rule in this order:

    ``empty`` (question or answer), ``ill_formed`` (several lines, an echoed ``<question>`` /
    ``[answer]`` placeholder or ``Q:``/``A:`` prefix, no letter or digit),
    ``too_short`` (question under ``min_question_chars``), ``too_long`` (question or answer over
    ``max_chars``), ``no_question_mark`` (question not ending with ``?``), ``refusal`` (the answer
    apologises / refuses: ``REFUSAL``), ``unanswerable`` (the answer says the document does not tell:
    ``UNANSWERABLE`` anywhere, or the whole answer is one of ``NON_ANSWERS`` such as ``N/A``,
    ``unknown``, ``not mentioned``), ``code`` (code in question or answer: ``CODE``, the paper's
    code-removal regex), ``copies_question`` (the answer's first words are the question's, ``normalize``d).
    """
    question, answer = pair.question.strip(), pair.answer.strip()
    if not question or not answer:
        return "empty"
    if "\n" in question + answer or PLACEHOLDER.search(question) or PLACEHOLDER.search(answer):
        return "ill_formed"
    if not _ALNUM.search(question) or not _ALNUM.search(answer):
        return "ill_formed"
    if len(question) < config.min_question_chars:
        return "too_short"
    if max(len(question), len(answer)) > config.max_chars:
        return "too_long"
    if not question.endswith("?"):
        return "no_question_mark"
    if REFUSAL.search(answer):
        return "refusal"
    if UNANSWERABLE.search(answer) or _is_non_answer(answer):
        return "unanswerable"
    if CODE.search(question) or CODE.search(answer):
        return "code"
    question_words = normalize(question).split()
    if normalize(answer).split()[: len(question_words)] == question_words:
        return "copies_question"
    return None


def filter_pairs(
    parsed: ParsedGeneration,
    max_pairs: int,
    seen_in_run: set[tuple[str, str]],
    config: FilterConfig = FilterConfig(),
) -> tuple[list[QAPair], Counter[str]]:
    """The kept pairs of one generation and the drops by reason (every parsed pair is one or the other).

    Without ``END`` the last pair is dropped as ``truncated`` (generation may have stopped inside
    it); then ``drop_reason``; then ``duplicate_in_document`` (a question already kept for this
    document, compared ``normalize``d), ``duplicate_in_run`` (the exact pair was kept for an earlier
    document; ``seen_in_run`` is updated with the pairs kept here) and ``over_limit`` (pairs beyond
    ``max_pairs``, the number the prompt asked for).
    """
    kept: list[QAPair] = []
    dropped: Counter[str] = Counter()
    questions: set[str] = set()
    for index, raw in enumerate(parsed.pairs):
        pair = QAPair(raw.question.strip(), raw.answer.strip())
        exact = (pair.question, pair.answer)
        if not parsed.complete and index == len(parsed.pairs) - 1:
            reason = "truncated"
        else:
            reason = drop_reason(pair, config)
        if reason is None and normalize(pair.question) in questions:
            reason = "duplicate_in_document"
        elif reason is None and exact in seen_in_run:
            reason = "duplicate_in_run"
        elif reason is None and len(kept) >= max_pairs:
            reason = "over_limit"
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(pair)
        questions.add(normalize(pair.question))
    seen_in_run.update((pair.question, pair.answer) for pair in kept)
    return kept, dropped


# ---------------------------------------------------------------------------------------- generator


class CausalLMGenerator:
    """A transformers causal LM loaded from a local folder, as a ``Generate`` callable.

    ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``, never
    ``trust_remote_code``. Prompts go through the tokenizer's chat template (one user message,
    generation prompt added) when it has one, else are used as they are followed by a blank line.
    Greedy unless ``temperature > 0``; generation stops at EOS or a ``\\nEND`` line. A prompt whose
    tokens plus ``max_new_tokens`` exceed the model's context gives ``None``.
    """

    def __init__(
        self,
        path: str | Path,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = check_model_folder(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)
        )
        self.model.to(self.device).eval()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.context = _context_length(self.model.config)
        torch.manual_seed(seed)

    def format_prompt(self, prompt: str) -> str:
        """``prompt`` as the model sees it: through the chat template if the tokenizer has one."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + "\n\n"

    def __call__(self, prompts: list[str]) -> list[str | None]:
        """Generate one completion per prompt (one padded batch); ``None`` for prompts that do not fit."""
        import torch

        templated = bool(getattr(self.tokenizer, "chat_template", None))
        texts = [self.format_prompt(prompt) for prompt in prompts]
        lengths = [len(self.tokenizer(text, add_special_tokens=not templated).input_ids) for text in texts]
        fits = [self.context is None or n + self.max_new_tokens <= self.context for n in lengths]
        batch = [text for text, ok in zip(texts, fits) if ok]
        outputs: list[str] = []
        if batch:
            inputs = self.tokenizer(
                batch, return_tensors="pt", padding=True, add_special_tokens=not templated
            )
            inputs = inputs.to(self.device)
            sampling = self.temperature > 0
            options = {"temperature": self.temperature, "top_p": self.top_p} if sampling else {}
            with torch.no_grad():
                tokens = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=sampling,
                    stop_strings=["\nEND"],
                    tokenizer=self.tokenizer,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **options,
                )
            new = tokens[:, inputs["input_ids"].shape[1] :]
            outputs = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        generated = iter(outputs)
        return [next(generated) if ok else None for ok in fits]


def _context_length(config: object) -> int | None:
    """The longest sequence a model config allows (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a local folder with a ``config.json``, else ``FileNotFoundError``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder not found: {path} (expected a local folder saved with save_pretrained)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder.")
    return folder


# ----------------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class DocmatixConfig:
    """Everything a run depends on besides the documents and the generator (the CLI's options)."""

    pairs_per_page: int = 4
    seed: int = 0
    max_docs: int | None = None
    max_pages: int = 4
    min_ocr_chars: int = 20
    max_ocr_chars: int = 8000
    batch_size: int = 1
    filters: FilterConfig = FilterConfig()
    dpi: float = 150
    max_side: int | None = None
    grayscale: bool = False
    image_format: str = "PNG"
    rows_per_shard: int = 1000
    rows_per_group: int = 100


@dataclass
class RunSummary:
    """Counts of a run: ``documents`` (``read``, ``written``, ``dropped:<reason>``), ``pairs``
    (``parsed``, ``kept``, ``dropped:<reason>``), ``malformed`` output fragments, ``templates``
    (documents prompted per template), the reader's own skips, and the shards written."""

    documents: Counter[str] = field(default_factory=Counter)
    pairs: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    templates: Counter[int] = field(default_factory=Counter)
    reader: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)

    def dropped(self, kind: str) -> dict[str, int]:
        """``{reason: n}`` of the ``documents`` or ``pairs`` drops."""
        counts = getattr(self, kind)
        return {k.removeprefix("dropped:"): v for k, v in sorted(counts.items()) if k.startswith("dropped:")}

    def as_dict(self) -> dict:
        """JSON-ready counts."""
        return {
            "documents": dict(self.documents),
            "pairs": dict(self.pairs),
            "malformed": dict(self.malformed),
            "templates": {str(k): v for k, v in sorted(self.templates.items())},
            "reader": self.reader,
            "shards": self.shards,
        }

    def format(self) -> str:
        """The human-readable summary the CLI prints."""
        docs, pairs = self.documents, self.pairs
        lines = [
            f"documents: {docs['read']} read, {docs['written']} written as rows",
            *(f"  dropped {reason}: {n}" for reason, n in self.dropped("documents").items()),
            f"pairs: {pairs['parsed']} parsed, {pairs['kept']} kept",
            *(f"  dropped {reason}: {n}" for reason, n in self.dropped("pairs").items()),
        ]
        if self.malformed:
            lines.append(
                "unparsed output: " + ", ".join(f"{k} {v}" for k, v in sorted(self.malformed.items()))
            )
        lines.append("templates: " + ", ".join(f"#{k} {v}" for k, v in sorted(self.templates.items())))
        lines.append("reader (pages): " + ", ".join(f"{k} {v}" for k, v in self.reader.items()))
        lines += [f"shard: {path}" for path in self.shards]
        return "\n".join(lines)


def record_key(sample_key: str) -> tuple[str, str]:
    """``(document id, record key)`` of a PDFA/IDL sample key ``"<shard>#<key>/<page>"``."""
    document_id = sample_key.rpartition("/")[0]
    return document_id, document_id.rpartition("#")[2]


def iter_documents(samples: Iterable[Sample], max_pages: int) -> Iterator[Document]:
    """Group one-page samples back into documents (consecutive samples of the same ``shard#key``),
    keeping at most ``max_pages + 1`` pages in memory per document."""
    current: Document | None = None
    current_id = None
    for sample in samples:
        document_id, key = record_key(sample.key)
        if document_id != current_id:
            if current is not None:
                yield current
            current, current_id = Document(source=sample.source, key=key), document_id
        current.n_pages += len(sample.images)
        if current.n_pages <= max_pages + 1:
            current.pages += sample.images
            current.texts += [item for item in sample.content if isinstance(item, str)]
    if current is not None:
        yield current


def docmatix_row(document: Document, pairs: Sequence[QAPair], image_format: str = "PNG") -> dict:
    """A Docmatix ``images``-config row: page images encoded as ``image_format``, turns with the
    ``"PDFA key: <key>"`` (or ``"IDL key: ..."``) source."""
    source = f"{SOURCE_PREFIX.get(document.source, document.source)}: {document.key}"
    images = [{"bytes": encode_image(page, image_format), "path": None} for page in document.pages]
    return {
        "images": images,
        "texts": [{"user": p.question, "assistant": p.answer, "source": source} for p in pairs],
    }


def _skip_reason(document: Document, config: DocmatixConfig) -> str | None:
    if document.n_pages > config.max_pages:
        return "too_many_pages"
    if len(document.transcription()) < config.min_ocr_chars:
        return "short_ocr"
    return None


def run_pipeline(
    documents: Iterable[Document],
    generate: Generate,
    writer: ParquetShardWriter,
    config: DocmatixConfig = DocmatixConfig(),
    progress: bool = True,
) -> RunSummary:
    """Prompt, generate, parse, filter and write every document; returns the counts (shards not closed)."""
    summary = RunSummary()
    rng = random.Random(config.seed)
    seen_in_run: set[tuple[str, str]] = set()
    documents = islice(documents, config.max_docs)
    bar = tqdm(documents, total=config.max_docs, unit="doc", desc="docmatix", disable=not progress)
    batch: list[tuple[Document, str, int]] = []

    def flush() -> None:
        outputs = generate([prompt for _, prompt, _ in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"generate returned {len(outputs)} outputs for {len(batch)} prompts")
        for (document, _, n_pairs), output in zip(batch, outputs):
            _handle_output(document, output, n_pairs, writer, summary, seen_in_run, config)
        batch.clear()
        bar.set_postfix(rows=summary.documents["written"], kept=summary.pairs["kept"], refresh=False)

    for document in bar:
        summary.documents["read"] += 1
        reason = _skip_reason(document, config)
        if reason is not None:
            summary.documents[f"dropped:{reason}"] += 1
            continue
        template = rng.randrange(len(TEMPLATES))
        summary.templates[template] += 1
        n_pairs = config.pairs_per_page * len(document.pages)
        prompt = build_prompt(document, template, n_pairs, config.max_ocr_chars, config.filters.max_chars)
        batch.append((document, prompt, n_pairs))
        if len(batch) == config.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return summary


def _handle_output(
    document: Document,
    output: str | None,
    n_pairs: int,
    writer: ParquetShardWriter,
    summary: RunSummary,
    seen_in_run: set[tuple[str, str]],
    config: DocmatixConfig,
) -> None:
    """Parse, filter, count and (if a pair survives) write one document's generation."""
    if output is None:
        summary.documents["dropped:prompt_too_long"] += 1
        return
    parsed = parse_generation(output)
    summary.malformed.update(parsed.malformed)
    if not parsed.complete:
        summary.malformed["no_end"] += 1
    kept, dropped = filter_pairs(parsed, n_pairs, seen_in_run, config.filters)
    summary.pairs["parsed"] += len(parsed.pairs)
    summary.pairs["kept"] += len(kept)
    summary.pairs.update({f"dropped:{reason}": n for reason, n in dropped.items()})
    if not kept:
        summary.documents["dropped:no_pair_kept"] += 1
        return
    writer.add(docmatix_row(document, kept, config.image_format))
    summary.documents["written"] += 1


def prepare_output(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``{out_dir}/data``, created; ``FileExistsError`` if it already holds shards (unless ``overwrite``,
    which deletes them and any leftover ``.part-*`` files of an interrupted run)."""
    folder = Path(out_dir) / "data"
    existing = sorted(folder.glob("train-*.parquet")) + sorted(folder.glob(".part-*.parquet.tmp"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {len(existing)} shard file(s); use another --out or --overwrite."
        )
    for path in existing:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_documents(
    source: str, urls: str | Sequence[str], config: DocmatixConfig
) -> tuple[Iterator[Document], RecordStats]:
    """The documents of ``source`` at ``urls`` and the reader's stats; ``ValueError`` for an unknown
    source or when the shards hold no readable document, ``FileNotFoundError`` for missing shards."""
    if source not in SOURCES:
        raise ValueError(f"Unknown document source {source!r}; expected one of {', '.join(SOURCES)}.")
    options = {"dpi": config.dpi, "max_side": config.max_side, "grayscale": config.grayscale}
    stream = iter_samples(source, urls, **options)
    documents = iter_documents(stream, config.max_pages)
    first = next(documents, None)
    if first is None:
        raise ValueError(f"No {source} document found at {urls!r} (reader: {stream.stats.as_dict()}).")
    return chain([first], documents), stream.stats


def generate_docmatix(
    source: str,
    urls: str | Sequence[str],
    generate: Generate,
    out_dir: str | Path,
    config: DocmatixConfig = DocmatixConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Run the whole pipeline on the ``source`` (``"pdfa"`` / ``"idl"``) shards at ``urls`` with
    ``generate``, writing ``{out_dir}/data/train-*.parquet`` and ``{out_dir}/generation_summary.json``."""
    folder = prepare_output(out_dir, overwrite)
    documents, stats = read_documents(source, urls, config)
    about = {"source": source, "urls": urls}
    return write_docmatix(documents, stats, generate, folder, config, progress, about)


def write_docmatix(
    documents: Iterable[Document],
    stats: RecordStats,
    generate: Generate,
    folder: Path,
    config: DocmatixConfig,
    progress: bool = True,
    about: dict | None = None,
) -> RunSummary:
    """``run_pipeline`` into hub-named shards under ``folder`` (``{out}/data``), then
    ``{out}/generation_summary.json`` with ``about``, the configuration and the counts."""
    features = HF_FEATURES["conversation"]
    shards = (config.seed, config.rows_per_shard, config.rows_per_group)
    writer = ParquetShardWriter(folder, CONVERSATION_SCHEMA, features, *shards)
    summary = run_pipeline(documents, generate, writer, config, progress)
    summary.shards = [str(path) for path in writer.close()]
    summary.reader = stats.as_dict()
    record = {**(about or {}), "config": asdict(config), **summary.as_dict()}
    (folder.parent / "generation_summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m datamodules.docmatix`` argument parser."""
    defaults = DocmatixConfig()
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.docmatix", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--source", required=True, choices=SOURCES, help="document dataset format")
    add("--urls", required=True, nargs="+", help="shards: paths, globs, brace patterns, URLs")
    add("--model", required=True, help="local folder of a transformers causal LM (save_pretrained)")
    add("--out", required=True, help="output folder; shards go to OUT/data/train-*.parquet")
    add("--max-docs", type=int, default=None, help="stop after this many documents")
    add("--pairs-per-page", type=int, default=defaults.pairs_per_page, help="pairs asked for per page")
    add("--seed", type=int, default=defaults.seed, help="template choice, sampling, shard names")
    add("--max-pages", type=int, default=defaults.max_pages, help="skip documents with more pages")
    add("--min-ocr-chars", type=int, default=defaults.min_ocr_chars, help="skip shorter transcriptions")
    add("--max-ocr-chars", type=int, default=defaults.max_ocr_chars, help="cut longer transcriptions")
    add("--min-question-chars", type=int, default=defaults.filters.min_question_chars)
    add("--max-chars", type=int, default=defaults.filters.max_chars, help="longest question / answer")
    add("--batch-size", type=int, default=defaults.batch_size, help="prompts per generate call")
    add("--max-new-tokens", type=int, default=1024)
    add("--temperature", type=float, default=0.0, help="0: greedy")
    add("--top-p", type=float, default=1.0)
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    add("--dpi", type=float, default=defaults.dpi, help="page render resolution")
    add("--max-side", type=int, default=None, help="longest page side in pixels")
    add("--grayscale", action="store_true", help="store pages in mode L (default RGB)")
    add("--image-format", default="png", choices=("png", "jpeg"))
    add("--rows-per-shard", type=int, default=defaults.rows_per_shard)
    add("--rows-per-group", type=int, default=defaults.rows_per_group)
    add("--overwrite", action="store_true", help="replace shards already in OUT/data")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> DocmatixConfig:
    """The ``DocmatixConfig`` of parsed CLI arguments (positive sizes checked)."""
    for name in (
        "pairs_per_page",
        "max_pages",
        "batch_size",
        "max_new_tokens",
        "rows_per_shard",
        "rows_per_group",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    filters = FilterConfig(min_question_chars=args.min_question_chars, max_chars=args.max_chars)
    return DocmatixConfig(
        pairs_per_page=args.pairs_per_page,
        seed=args.seed,
        max_docs=args.max_docs,
        max_pages=args.max_pages,
        min_ocr_chars=args.min_ocr_chars,
        max_ocr_chars=args.max_ocr_chars,
        batch_size=args.batch_size,
        filters=filters,
        dpi=args.dpi,
        max_side=args.max_side,
        grayscale=args.grayscale,
        image_format=args.image_format.upper(),
        rows_per_shard=args.rows_per_shard,
        rows_per_group=args.rows_per_group,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate, write, print the summary. Bad input exits with ``error: <message>``."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        check_model_folder(args.model)
        folder = prepare_output(args.out, args.overwrite)  # bad input fails before the model loads
        documents, stats = read_documents(args.source, args.urls, config)
        generator = CausalLMGenerator(
            args.model, args.max_new_tokens, args.temperature, args.top_p, args.device, args.dtype, args.seed
        )
        about = {"source": args.source, "urls": args.urls, "model": str(args.model)}
        summary = write_docmatix(documents, stats, generator, folder, config, not args.no_progress, about)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
