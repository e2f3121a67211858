"""The calibrated pipeline: activation capture, statistics, the layer-by-layer driver and its run context."""
