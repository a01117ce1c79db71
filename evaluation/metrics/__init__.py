"""Metrics as `evaluate` modules shipped in the repository, loaded by path (no Hub needed).

    import evaluate
    from evaluation.metrics import metric_path
    pope = evaluate.load(metric_path("pope"))     # or evaluate.load("evaluation/metrics/pope") from a checkout

Each `<name>/<name>.py` is self-contained (standard library + `evaluate`/`datasets`), because `evaluate.load` copies
the file alone; its plain functions (e.g. `pope_metrics`) are what the benchmarks import.
"""

from pathlib import Path

METRICS = ("first_word_accuracy", "pope", "relative_score", "scienceqa")


def metric_path(name: str) -> str:
    """The folder of a metric shipped here, wherever the package is installed."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}: expected one of {METRICS}")
    return str(Path(__file__).resolve().parent / name)
