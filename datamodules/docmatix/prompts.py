"""The generation prompt: five task templates over a document's OCR transcription (ours, written to
the Idefics3 paper's description), the rules and the strict output format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

SOURCES = ("pdfa", "idl")
SOURCE_PREFIX = {"pdfa": "PDFA key", "idl": "IDL key"}  # m4 recognises Docmatix rows by "PDFA key"
Generate = Callable[[list[str]], list[str | None]]

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
class PdfDocument:
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


def build_prompt(
    document: PdfDocument, template: int, n_pairs: int, max_ocr_chars: int, max_chars: int
) -> str:
    """The prompt: ``PROMPT_HEADER`` (transcription), ``TEMPLATES[template]``, ``RULES``, ``OUTPUT_FORMAT``.

    ``n_pairs`` is the number of pairs asked for; the transcription is cut at ``max_ocr_chars``.
    """
    header = PROMPT_HEADER.format(n_pages=len(document.texts), text=document.transcription(max_ocr_chars))
    task = TEMPLATES[template].format(n_pairs=n_pairs)
    return "\n\n".join([header, task, RULES.format(max_chars=max_chars), OUTPUT_FORMAT])
