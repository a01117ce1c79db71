"""The benchmark's results as a Markdown table (what the README shows)."""


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _spread(summary: dict) -> str:
    """`stats.paired_summary`'s ratio of medians with the min-max of the paired ratios."""
    return f"{summary['ratio']:.2f}x ({summary['paired_min']:.2f}-{summary['paired_max']:.2f}x)"


def _mib(memory: dict) -> float:
    return memory["bytes"] / 2**20


def markdown_table(results: dict) -> str:
    env, config = results["environment"], results["config"]
    on_cpu = results["stage1"]["peer"]["peak_memory"]["kind"] == "peak_rss"
    # On a CPU the throughput columns are per second of the participant's CPU time (see benchmarks/run.py).
    suffix, unit = ("_per_cpu_s", "CPU-s") if on_cpu else ("_per_s", "s")
    memory_label = "peak RSS" if on_cpu else "peak GPU memory allocated"
    lines = [
        f"Device: {env['device']}, {env['threads']} torch thread(s) per participant; torch {env['torch']}, "
        f"transformers {env['transformers']}, trl {env['trl']}. Load average at start / end: "
        f"{env['load_average_start'][0]:.2f} / {env['load_average_end'][0]:.2f}.",
        f"Model: tower {config['image_size']} px / patch {config['patch_size']} ({config['vision_layers']} x "
        f"{config['vision_hidden_size']}), LM {config['text_layers']} x {config['text_hidden_size']}; "
        f"{config['num_images']} images, batch {config['batch_size']}; median of {config['windows']} windows of "
        f"{config['steps_per_window']} step(s) per participant after {config['warmup_steps']} warm-up step(s).",
        "",
        "| measurement | ours | peer | ours / peer | ours / peer, wall clock |",
        "|---|---|---|---|---|",
    ]

    def throughput(label, stage, name, metric, fmt):
        ours, peer = results[stage][name], results[stage]["peer"]
        a, b = ours[metric + suffix], peer[metric + suffix]
        wall = _ratio(ours[metric + "_per_s"], peer[metric + "_per_s"])
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {_ratio(a, b)} | {wall} |")

    for stage, cached_label in (("stage1", "cached tower features, frozen LM"), ("stage2", "cached tower features")):
        n, r = stage[-1], results[stage]
        for name, label in (("ours_cached", cached_label), ("ours", "tower every step")):
            throughput(f"stage {n} samples/{unit} (ours: {label}; length-grouped)", stage, name, "samples", "{:.2f}")
            throughput(f"stage {n} non-pad tokens/{unit} (ours: {label})", stage, name, "tokens", "{:.0f}")
        for key, label in (("padding_fed", "batches fed in the run"), ("padding_epoch", "one epoch of each sampler")):
            lines.append(f"| stage {n} padding, {label} (ours length-grouped, peer random) | "
                         f"{100 * r['ours'][key]:.1f}% | {100 * r['peer'][key]:.1f}% | | |")
        cached, plain, peer = (_mib(r[name]["peak_memory"]) for name in ("ours_cached", "ours", "peer"))
        lines.append(f"| stage {n} {memory_label}, MiB (ours: with cache / without) | {cached:.0f} / {plain:.0f} | "
                     f"{peer:.0f} | {_ratio(cached, peer)} / {_ratio(plain, peer)} | |")
    g = results["generation"]
    ratios, controls = g.get("ratios", {}), g.get("control_ratios", {})
    for key in (k for k in g["ours"] if k.startswith("batch_")):
        a, b = g["ours"][key]["tokens" + suffix], g["peer"][key]["tokens" + suffix]
        cells = [_ratio(a, b), _ratio(g["ours"][key]["tokens_per_s"], g["peer"][key]["tokens_per_s"])]
        if key in ratios:  # several processes per side: the ratio of the medians and the spread of the pairs
            cells = [_spread(ratios[key]["tokens" + suffix]), _spread(ratios[key]["tokens_per_s"])]
        lines.append(f"| generation tokens/{unit}, KV cache, greedy, batch {key.removeprefix('batch_')} | "
                     f"{a:.1f} | {b:.1f} | {cells[0]} | {cells[1]} |")
    for key, control in controls.items():
        side = g["method"]["control"]
        cells = [_spread(control["tokens" + suffix]), _spread(control["tokens_per_s"])]
        lines.append(f"| generation A/A control, batch {key.removeprefix('batch_')}: {side} vs {side} in two "
                     f"processes (the noise floor) | | | {cells[0]} | {cells[1]} |")
    identical = all(g["identical_tokens"].values()) and all(g["identical_prompts"].values())
    lines.append(f"| greedy tokens identical to the peer's (same prompts, same weights) | "
                 f"{'yes' if identical else 'NO'} | | | |")
    if "method" in g:
        method = g["method"]
        malloc = ", ".join(f"{k}={v}" for k, v in sorted(method["malloc_env"].items()))
        lines += [
            "",
            f"Generation: median over {method['processes_per_side']} fresh processes per side, "
            f"{method['repeats_per_process']} timed generate call(s) per batch size in each after a warm-up; a round "
            f"starts one process per side{' plus the control' if method['control'] else ''} and they take turns. "
            f"Ratio: of the medians; in brackets: the lowest and highest ratio within a round. Allocator in every "
            f"generation process: {malloc or 'no MALLOC_* settings (glibc defaults)'}.",
        ]
    cache = results["feature_cache"]
    lines += [
        "",
        f"Feature cache: {cache['images']} images computed once in {cache['seconds']:.1f} s (both stages and later runs "
        f"reuse it; not in the throughput above). Whole run: {results['wall_seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU.",
    ]
    return "\n".join(lines)
