"""Gradients during training: watch(), the hooks of a recorded step, the JSON-lines log, the rules over time."""
