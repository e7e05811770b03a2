"""Lightning callbacks for the training recipes: NEFTune, resolution ramp-up, telemetry.

``StageTransition`` (data mixture / freezing changes between stages) comes with the training issue.
"""

from callbacks.neftune import NEFTune
from callbacks.resolution import ResolutionRampUp
from callbacks.telemetry import Telemetry

__all__ = ["NEFTune", "ResolutionRampUp", "Telemetry"]
