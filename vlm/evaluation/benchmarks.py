"""Benchmark readers: local parquet files in their public Hugging Face layouts -> ``Example`` lists.

Each ``Benchmark`` knows its columns, its prompt kind (``vlm.evaluation.prompts``), its metric
(``vlm.metrics``) and how to feed that metric. The layouts are those of the lmms-eval copies on the
Hub (``lmms-lab/textvqa``, ``lmms-lab/VQAv2``, ``lmms-lab/OK-VQA``, ``lmms-lab/DocVQA``,
``lmms-lab/ChartQA``, ``lmms-lab/MMMU``, ``lmms-lab/ai2d``, ``lmms-lab/MMBench`` (``en``),
``lmms-lab/MMStar``, ``AI4Math/MathVista``, ``lmms-lab/COCO-Caption``), as written by ``datasets``
(images as ``{"bytes", "path"}`` structs). ⚠ The column names are taken from those dataset cards as
we know them, not checked against downloaded files here (offline); a reader fails with the missing
column's name if a file differs.
"""

from __future__ import annotations

import ast
import glob
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from torchmetrics import Metric

from vlm.config import IMAGE_TOKEN
from vlm.evaluation.prompts import PromptKind, choice_letter, format_prompt
from vlm.metrics import ANLS, CIDEr, MathVistaAccuracy, MultipleChoiceAccuracy, RelaxedAccuracy, VQAAccuracy


@dataclass(frozen=True)
class Example:
    """One benchmark question: ``images`` (encoded bytes or paths), ``question`` (``<image>`` placeholders
    where the benchmark interleaves images, else none: they go first), option texts ``choices``
    (multiple choice), reference ``answers`` (for multiple choice: the gold letter), ``metadata``, and
    ``prompt``: the benchmark's own user text, used instead of the ``prompts`` template when set."""

    id: str
    images: list[Any]
    question: str
    choices: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None


Row = dict[str, Any]


def _image(value: Any) -> Any:
    """Bytes (or a path when no bytes were embedded) of a ``datasets`` image struct."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") else value["path"]
    return value


def _textvqa(row: Row, index: int) -> Example:
    meta = {"image_id": row.get("image_id")}
    return Example(str(row["question_id"]), [_image(row["image"])], row["question"], [], row["answers"], meta)


def _vqav2(row: Row, index: int) -> Example:
    answers = [a["answer"] for a in row["answers"]]
    meta = {"answer_type": row.get("answer_type"), "question_type": row.get("question_type")}
    return Example(str(row["question_id"]), [_image(row["image"])], row["question"], [], answers, meta)


def _docvqa(row: Row, index: int) -> Example:
    meta = {"docId": row.get("docId"), "question_types": row.get("question_types")}
    return Example(str(row["questionId"]), [_image(row["image"])], row["question"], [], row["answers"], meta)


def _chartqa(row: Row, index: int) -> Example:
    meta = {"type": row.get("type")}
    return Example(str(index), [_image(row["image"])], row["question"], [], [row["answer"]], meta)


def _ai2d(row: Row, index: int) -> Example:
    answer = choice_letter(int(row["answer"]))  # the index of the right option, as a string
    return Example(str(index), [_image(row["image"])], row["question"], list(row["options"]), [answer])


_MMMU_IMAGE = re.compile(r"<image (\d+)>")


def _mmmu(row: Row, index: int) -> Example | None:
    """MMMU multiple-choice questions; each ``<image k>`` of the question and options becomes ``<image>``
    with image k, in reading order. Open questions are skipped (their scorer is not in ``vlm.metrics``)."""
    if row.get("question_type", "multiple-choice") != "multiple-choice":
        return None
    options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
    images: list[Any] = []

    def place(match: re.Match) -> str:
        images.append(_image(row[f"image_{match.group(1)}"]))
        return IMAGE_TOKEN

    question = _MMMU_IMAGE.sub(place, row["question"])
    choices = [_MMMU_IMAGE.sub(place, str(o)) for o in options]
    meta = {"subfield": row.get("subfield"), "topic_difficulty": row.get("topic_difficulty")}
    return Example(str(row["id"]), images, question, choices, [row["answer"]], meta)


def _mmbench(row: Row, index: int) -> Example:
    """MMBench (``dev`` has the answers): options in columns A-D (absent ones null); a non-empty ``hint``
    goes before the multiple-choice prompt as ``Hint: ...`` (our choice; lmms-eval and VLMEvalKit also
    put it first). Scored per row, without MMBench's CircularEval (which also asks each question with
    its options rotated)."""
    choices = [str(row[letter]) for letter in "ABCD" if row.get(letter) not in (None, "", "nan")]
    hint = row.get("hint")
    prompt = None
    if hint not in (None, "", "nan"):
        prompt = f"Hint: {hint}\n" + format_prompt("multiple_choice", row["question"], choices)
    meta = {"category": row.get("category"), "l2_category": row.get("L2-category")}
    return Example(
        str(row["index"]), [_image(row["image"])], row["question"], choices, [row["answer"]], meta, prompt
    )


_MMSTAR_OPTIONS = re.compile(r"\s*Options:\s*(A: .*)\Z", re.DOTALL)
_MMSTAR_LETTER = re.compile(r"(?:^|, )([A-F]): ")


def _mmstar(row: Row, index: int) -> Example:
    """MMStar (``val``): the options are written in the question (``...\nOptions: A: x, B: y, C: z, D: w``);
    they are split off into ``choices`` so the paper's multiple-choice prompt applies."""
    found = _MMSTAR_OPTIONS.search(row["question"])
    if found is None:
        raise ValueError(
            f"MMStar row {row['index']}: no 'Options: A: ...' in the question {row['question']!r}"
        )
    parts = _MMSTAR_LETTER.split(found.group(1))  # ["", "A", text, "B", text, ...]
    choices = [text.strip() for text in parts[2::2]]
    meta = {"category": row.get("category"), "l2_category": row.get("l2_category")}
    question = row["question"][: found.start()]
    return Example(str(row["index"]), [_image(row["image"])], question, choices, [row["answer"]], meta)


def _mathvista(row: Row, index: int) -> Example:
    """MathVista (``testmini``): multiple-choice questions get the paper's multiple-choice prompt and the
    gold letter as answer; free-form ones the dataset's ``query`` (its hint on the answer's format).
    ``metadata`` keeps what ``MathVistaAccuracy`` needs: the gold text, answer type and precision."""
    choices = list(row["choices"] or []) if row["question_type"] == "multi_choice" else []
    answers = [choice_letter(choices.index(row["answer"]))] if choices else [row["answer"]]
    meta = {
        "answer": row["answer"],
        "answer_type": row["answer_type"],
        "precision": row.get("precision"),
        "question_type": row["question_type"],
    }
    prompt = None if choices else row["query"]
    return Example(
        str(row["pid"]), [_image(row["decoded_image"])], row["question"], choices, answers, meta, prompt
    )


def _coco(row: Row, index: int) -> Example:
    meta = {"file_name": row.get("file_name")}
    return Example(str(row["question_id"]), [_image(row["image"])], "", [], list(row["answer"]), meta)


def _update_references(metric: Metric, preds: Sequence[str], examples: Sequence[Example]) -> None:
    metric.update(list(preds), [e.answers for e in examples])


def _update_choices(metric: Metric, preds: Sequence[str], examples: Sequence[Example]) -> None:
    metric.update(list(preds), [e.answers[0] for e in examples], choices=[e.choices for e in examples])


def _update_mathvista(metric: Metric, preds: Sequence[str], examples: Sequence[Example]) -> None:
    metric.update(
        list(preds),
        [e.metadata["answer"] for e in examples],
        choices=[e.choices or None for e in examples],
        answer_types=[e.metadata["answer_type"] for e in examples],
        precisions=[e.metadata["precision"] for e in examples],
    )


@dataclass(frozen=True)
class Benchmark:
    """How to read, prompt and score one benchmark (``BENCHMARKS[name]``)."""

    name: str
    hub_id: str
    split: str
    reader: Callable[[Row, int], Example | None]
    prompt: PromptKind
    metric_name: str
    metric: Callable[[], Metric]
    update: Callable[[Metric, Sequence[str], Sequence[Example]], None] = _update_references

    def read(self, files: str | Sequence[str]) -> list[Example]:
        """Every example of the parquet ``files`` (paths or glob patterns; ``${VAR}`` expanded), in order."""
        return list(self.iter_examples(files))

    def iter_examples(self, files: str | Sequence[str]) -> Iterator[Example]:
        index = 0
        for path in expand_files(files):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    try:
                        example = self.reader(row, index)
                    except KeyError as error:
                        raise KeyError(f"{path}: {self.name} rows need column {error}") from None
                    index += 1
                    if example is not None:
                        yield example


def expand_files(files: str | Sequence[str]) -> list[str]:
    """Sorted matches of each path / glob pattern (``${VAR}`` and ``~`` expanded); none is an error."""
    patterns = [files] if isinstance(files, str) else list(files)
    out = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.path.expandvars(pattern))
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"No benchmark file matches {pattern!r}.")
        out += matches
    return out


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("textvqa", "lmms-lab/textvqa", "validation", _textvqa, "vqa", "vqa_acc", VQAAccuracy),
        Benchmark("vqav2", "lmms-lab/VQAv2", "validation", _vqav2, "vqa", "vqa_acc", VQAAccuracy),
        Benchmark("okvqa", "lmms-lab/OK-VQA", "val2014", _textvqa, "vqa", "vqa_acc", VQAAccuracy),
        Benchmark("docvqa", "lmms-lab/DocVQA", "validation", _docvqa, "vqa", "anls", ANLS),
        Benchmark("chartqa", "lmms-lab/ChartQA", "test", _chartqa, "vqa", "relaxed_acc", RelaxedAccuracy),
        Benchmark(
            "mmmu",
            "lmms-lab/MMMU",
            "validation",
            _mmmu,
            "multiple_choice",
            "acc",
            lambda: MultipleChoiceAccuracy(letters="ABCDEFGHI"),
            _update_choices,
        ),
        Benchmark(
            "ai2d",
            "lmms-lab/ai2d",
            "test",
            _ai2d,
            "multiple_choice",
            "acc",
            MultipleChoiceAccuracy,
            _update_choices,
        ),
        Benchmark(
            "mmbench",
            "lmms-lab/MMBench",
            "dev",
            _mmbench,
            "multiple_choice",
            "acc",
            MultipleChoiceAccuracy,
            _update_choices,
        ),
        Benchmark(
            "mmstar",
            "lmms-lab/MMStar",
            "val",
            _mmstar,
            "multiple_choice",
            "acc",
            MultipleChoiceAccuracy,
            _update_choices,
        ),
        Benchmark(
            "mathvista",
            "AI4Math/MathVista",
            "testmini",
            _mathvista,
            "multiple_choice",
            "acc",
            MathVistaAccuracy,
            _update_mathvista,
        ),
        Benchmark("coco", "lmms-lab/COCO-Caption", "val", _coco, "caption", "cider", CIDEr),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The ``Benchmark`` called ``name`` (a key of ``BENCHMARKS``)."""
    if name not in BENCHMARKS:
        raise KeyError(f"Unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}.")
    return BENCHMARKS[name]
