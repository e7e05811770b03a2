"""Lightning callbacks for the training recipes (e.g. resolution ramp-up, NEFTune, stage transitions)."""
