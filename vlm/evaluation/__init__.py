"""Benchmark evaluation, pure parts: the papers' prompts, benchmark readers, few-shot prompting, fakes, and
the one prompt path (``PromptItem`` -> ``collate_prompts`` -> ``PromptBatch``; ``PromptScorer``).
The Lightning side is ``datamodules.EvalDataModule`` + ``callbacks.BenchmarkEvaluation`` (configs in
``configs/eval/``)."""

from vlm.evaluation.batch import PromptBatch, PromptItem, collate_prompts, generation_inputs
from vlm.evaluation.benchmarks import BENCHMARKS, Benchmark, Example, get_benchmark
from vlm.evaluation.fakes import write_fake_benchmark
from vlm.evaluation.fewshot import documents, select_shots
from vlm.evaluation.prompts import STOP_WORDS, PromptTurn, apply_stop_words, format_prompt
from vlm.evaluation.scoring import PromptScorer, held_out_accuracy

__all__ = [
    "BENCHMARKS",
    "STOP_WORDS",
    "Benchmark",
    "Example",
    "PromptBatch",
    "PromptItem",
    "PromptScorer",
    "PromptTurn",
    "apply_stop_words",
    "collate_prompts",
    "documents",
    "format_prompt",
    "generation_inputs",
    "get_benchmark",
    "held_out_accuracy",
    "select_shots",
    "write_fake_benchmark",
]
