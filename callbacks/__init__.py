"""Lightning callbacks for the training recipes: NEFTune, resolution ramp-up, stage transitions, telemetry,
progress (a step bar on a terminal, plain lines in a log file)."""

from callbacks.neftune import NEFTune
from callbacks.progress import PlainProgress, StepProgressBar
from callbacks.resolution import ResolutionRampUp
from callbacks.stages import Stage, StageTransition
from callbacks.telemetry import Telemetry

__all__ = [
    "NEFTune",
    "PlainProgress",
    "ResolutionRampUp",
    "Stage",
    "StageTransition",
    "StepProgressBar",
    "Telemetry",
]
