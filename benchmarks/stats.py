"""Pure aggregation of the generation measurement: per-process rates, medians over processes, paired ratios.

No torch here: `tests/test_benchmarks_stats.py` checks these functions on hand-made numbers.

Why processes and not repeats: two processes running the same code can differ by more than 10% in generation
speed for their whole lifetime (in the profiling behind this, glibc returned large freed buffers to the OS and
page-faulted them in again, 0 to ~220K faults per batch-8 `generate` depending on each process's allocation
history), so repeats inside one process do not average that out. The benchmark therefore runs each side in several
fresh processes, one number per process, and reports the median over processes per side, the ratio of those
medians and the min-max of the ratios within each round (the processes of a round take turns in the same minutes).
"""

import statistics
from collections.abc import Sequence


def process_rate(runs: Sequence[dict], seconds_key: str = "cpu_seconds") -> float:
    """One process's generation speed: the median over its timed runs of new tokens per `seconds_key` second."""
    if not runs:
        raise ValueError("no timed runs")
    return statistics.median(run["new_tokens"] / run[seconds_key] for run in runs)


def paired_summary(a: Sequence[float], b: Sequence[float]) -> dict:
    """Side `a` against side `b`, one value per process, paired by round (a[i] and b[i] ran in the same round).

    Returns the median of each side, `ratio` = median(a) / median(b), and the ratios of the pairs (`paired`) with
    their min and max: the spread a reader compares the ratio against.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-zero number of values per side, got {len(a)} and {len(b)}")
    median_a, median_b = statistics.median(a), statistics.median(b)
    paired = [x / y for x, y in zip(a, b)]
    return {
        "median_a": median_a, "median_b": median_b, "ratio": median_a / median_b, "paired": paired,
        "paired_min": min(paired), "paired_max": max(paired),
    }


def summarize_generation(rounds: Sequence[dict], sizes: Sequence[int], control: str | None = None) -> dict:
    """Results of the generation rounds, per side and batch size.

    `rounds[k][name][size]` is the list of timed-run dicts (`new_tokens`, `seconds`, `cpu_seconds`, `tokens`,
    `prompt_digest`, optionally `minor_faults`) of participant `name` ("ours", "peer", and "control" when there is
    one) in round k, each round holding fresh processes. `control` names the side the control process runs.
    """
    names = list(rounds[0])
    if ("control" in names) != (control is not None):
        raise ValueError("a control process needs `control` (the side it runs), and `control` needs one")
    results: dict = {name: {} for name in names}
    for size in sizes:
        key = f"batch_{size}"
        for name in names:
            per_process = {metric: [process_rate(r[name][size], seconds) for r in rounds]
                           for metric, seconds in (("tokens_per_s", "seconds"), ("tokens_per_cpu_s", "cpu_seconds"))}
            results[name][key] = {
                "tokens_per_s": statistics.median(per_process["tokens_per_s"]),
                "tokens_per_cpu_s": statistics.median(per_process["tokens_per_cpu_s"]),
                "per_process": per_process,
                "seconds": [[run["seconds"] for run in r[name][size]] for r in rounds],
                "minor_faults": [[run.get("minor_faults") for run in r[name][size]] for r in rounds],
            }
        pairs = [("ratios", "ours", "peer")] + ([("control_ratios", "control", control)] if control else [])
        for label, a, b in pairs:
            results.setdefault(label, {})[key] = {
                metric: paired_summary(results[a][key]["per_process"][metric], results[b][key]["per_process"][metric])
                for metric in ("tokens_per_s", "tokens_per_cpu_s")
            }
        runs = [run for r in rounds for name in names for run in r[name][size]]
        results.setdefault("identical_tokens", {})[key] = all(run["tokens"] == runs[0]["tokens"] for run in runs)
        results.setdefault("identical_prompts", {})[key] = all(
            run["prompt_digest"] == runs[0]["prompt_digest"] for run in runs
        )
    return results
