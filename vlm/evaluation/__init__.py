"""Benchmark evaluation: the papers' prompts, benchmark readers, few-shot prompting, fakes and the
Lightning glue (``EvalDataModule`` + ``BenchmarkEvaluation``; configs in ``configs/eval/``)."""

from vlm.evaluation.benchmarks import BENCHMARKS, Benchmark, Example, get_benchmark
from vlm.evaluation.fakes import write_fake_benchmark
from vlm.evaluation.fewshot import documents, select_shots
from vlm.evaluation.lightning import BenchmarkEvaluation, EvalDataModule, collate_prompts
from vlm.evaluation.prompts import STOP_WORDS, Document, apply_stop_words, format_prompt

__all__ = [
    "BENCHMARKS",
    "STOP_WORDS",
    "Benchmark",
    "BenchmarkEvaluation",
    "Document",
    "EvalDataModule",
    "Example",
    "apply_stop_words",
    "collate_prompts",
    "documents",
    "format_prompt",
    "get_benchmark",
    "select_shots",
    "write_fake_benchmark",
]
