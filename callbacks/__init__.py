"""Lightning callbacks: NEFTune, resolution ramp-up, stage transitions, telemetry, predictions."""

from callbacks.neftune import NEFTune
from callbacks.predictions import PredictionWriter
from callbacks.resolution import ResolutionRampUp
from callbacks.stages import Stage, StageTransition
from callbacks.telemetry import Telemetry

__all__ = ["NEFTune", "PredictionWriter", "ResolutionRampUp", "Stage", "StageTransition", "Telemetry"]
