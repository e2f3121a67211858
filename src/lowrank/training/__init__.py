"""Training compressed models: the healing loop, its losses and teacher text."""
