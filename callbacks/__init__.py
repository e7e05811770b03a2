"""Lightning callbacks for the training recipes: NEFTune, resolution ramp-up, stage transitions, telemetry."""

from callbacks.neftune import NEFTune
from callbacks.resolution import ResolutionRampUp
from callbacks.stages import Stage, StageTransition
from callbacks.telemetry import Telemetry

__all__ = ["NEFTune", "ResolutionRampUp", "Stage", "StageTransition", "Telemetry"]
