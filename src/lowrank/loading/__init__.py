"""Loading and saving: model sources, compressed checkpoints and exports to standard layouts."""
