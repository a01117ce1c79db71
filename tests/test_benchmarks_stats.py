"""The benchmark's generation statistics (`benchmarks/stats.py`) and how the table shows them, on hand-made numbers."""

import pytest

from benchmarks import stats
from benchmarks.report import _spread


def _run(cpu_seconds, seconds=None, tokens=((1, 2),), digest="p", new_tokens=8):
    return {"new_tokens": new_tokens, "cpu_seconds": cpu_seconds, "seconds": seconds or cpu_seconds,
            "tokens": [list(t) for t in tokens], "prompt_digest": digest}


def test_process_rate_is_the_median_over_a_process_runs():
    runs = [_run(1.0), _run(2.0), _run(4.0)]  # 8, 4 and 2 tokens per second
    assert stats.process_rate(runs) == 4.0
    assert stats.process_rate([_run(1.0, seconds=2.0)], "seconds") == 4.0
    with pytest.raises(ValueError):
        stats.process_rate([])


def test_paired_summary_ratio_of_medians_and_spread():
    summary = stats.paired_summary([10.0, 12.0, 6.0], [8.0, 10.0, 12.0])
    assert summary["median_a"] == 10.0 and summary["median_b"] == 10.0
    assert summary["ratio"] == 1.0  # of the medians, not the median (1.2) or mean of the pairs
    assert summary["paired"] == [1.25, 1.2, 0.5]
    assert (summary["paired_min"], summary["paired_max"]) == (0.5, 1.25)
    assert _spread(summary) == "1.00x (0.50-1.25x)"
    with pytest.raises(ValueError):
        stats.paired_summary([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        stats.paired_summary([], [])


def test_summarize_generation_per_side_per_batch_and_control():
    # Two rounds; in each a fresh ours, peer and control (= ours again) process ran batch 1 and batch 8.
    def participant(cpu_b1, cpu_b8):
        return {1: [_run(cpu_b1)], 8: [_run(cpu_b8, new_tokens=64)]}

    rounds = [
        {"ours": participant(1.0, 2.0), "peer": participant(2.0, 2.0), "control": participant(1.0, 4.0)},
        {"ours": participant(2.0, 4.0), "peer": participant(2.0, 2.0), "control": participant(2.0, 4.0)},
    ]
    results = stats.summarize_generation(rounds, (1, 8), control="ours")
    assert results["ours"]["batch_1"]["per_process"]["tokens_per_cpu_s"] == [8.0, 4.0]
    assert results["ours"]["batch_1"]["tokens_per_cpu_s"] == 6.0
    assert results["peer"]["batch_8"]["tokens_per_cpu_s"] == 32.0
    ratio = results["ratios"]["batch_1"]["tokens_per_cpu_s"]
    assert ratio["ratio"] == 1.5 and ratio["paired"] == [2.0, 1.0]
    assert results["ratios"]["batch_8"]["tokens_per_cpu_s"]["paired"] == [1.0, 0.5]
    control = results["control_ratios"]["batch_8"]["tokens_per_cpu_s"]
    assert control["paired"] == [0.5, 1.0]  # control against ours, round by round
    assert results["identical_tokens"] == {"batch_1": True, "batch_8": True}
    assert results["identical_prompts"] == {"batch_1": True, "batch_8": True}


def test_summarize_generation_flags_any_process_with_other_tokens():
    same = {1: [_run(1.0)]}
    other = {1: [_run(1.0, tokens=((1, 3),))]}
    rounds = [{"ours": same, "peer": same}, {"ours": same, "peer": other}]
    results = stats.summarize_generation(rounds, (1,))
    assert results["identical_tokens"] == {"batch_1": False}
    assert results["identical_prompts"] == {"batch_1": True}
    assert "control_ratios" not in results
    with pytest.raises(ValueError):
        stats.summarize_generation(rounds, (1,), control="ours")  # no control process to compare
