"""Benchmark evaluation, pure parts: the papers' prompts, benchmark readers, few-shot prompting and fakes.
The Lightning side is ``datamodules.EvalDataModule`` + ``callbacks.BenchmarkEvaluation`` (configs in
``configs/eval/``)."""

from vlm.evaluation.benchmarks import BENCHMARKS, Benchmark, Example, get_benchmark
from vlm.evaluation.fakes import write_fake_benchmark
from vlm.evaluation.fewshot import documents, select_shots
from vlm.evaluation.prompts import STOP_WORDS, Document, apply_stop_words, format_prompt

__all__ = [
    "BENCHMARKS",
    "STOP_WORDS",
    "Benchmark",
    "Document",
    "Example",
    "apply_stop_words",
    "documents",
    "format_prompt",
    "get_benchmark",
    "select_shots",
    "write_fake_benchmark",
]
