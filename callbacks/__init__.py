"""Lightning callbacks for the training recipes: NEFTune, resolution ramp-up, stage transitions, telemetry,
progress (a step bar on a terminal, plain lines in a log file), predictions (``predictions.jsonl``),
benchmark scores (``BenchmarkEvaluation``)."""

from callbacks.evaluation import BenchmarkEvaluation
from callbacks.neftune import NEFTune
from callbacks.predictions import PredictionWriter
from callbacks.progress import PlainProgress, StepProgressBar
from callbacks.resolution import ResolutionRampUp
from callbacks.stages import Stage, StageTransition
from callbacks.telemetry import Telemetry

__all__ = [
    "BenchmarkEvaluation",
    "NEFTune",
    "PlainProgress",
    "PredictionWriter",
    "ResolutionRampUp",
    "Stage",
    "StageTransition",
    "StepProgressBar",
    "Telemetry",
]
