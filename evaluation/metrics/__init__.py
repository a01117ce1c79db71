"""Metrics as `evaluate` modules shipped in the repository: `evaluate.load("evaluation/metrics/pope")` works offline."""
