"""The CI gate: --fail-on, rule selection, baselines and [tool.gradcheck] configuration."""
