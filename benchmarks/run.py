"""Ours vs the peer, in one run: training throughput of both stages, padding, peak memory, generation speed.

    python benchmarks/run.py [--json results.json] [--quick] [--batch_size 8 --text_layers 6 ...]

Ours is `LlavaForCausalLM` + our `LlavaProcessor` + `training/sft.py`'s `LlavaSFTTrainer` (length-grouped sampling;
the frozen-tower feature cache where named). The peer is what a user gets without this plug-in: transformers'
`LlavaForConditionalGeneration` with the same sizes and the same weights (converted by
`modeling_llava.convert_llava_hf`), its `LlavaProcessor`, and TRL's `SFTTrainer` with its default vision collator
and random sampling. Both train the same data with the same batch size, learning rate, precision (fp32 on a CPU,
bf16 autocast on a GPU) and no gradient checkpointing.

Fairness: every participant runs in its own process (its own peak memory, its own warm-up); after an untimed
warm-up they take turns, one timed window each, the order rotating every round, so a change in machine load
touches all sides alike. Throughput is the median over windows of samples/s and non-pad tokens/s (non-pad tokens
include image tokens). On a CPU each participant runs 1 torch thread and the table's throughput is per second of
that process's CPU time (the wall-clock ratios are reported next to it): on a shared machine a process can sit on
a busy core for a whole window, and CPU time is what it actually computed. On a GPU it is wall time. The sizes
are in `benchmarks/fixtures.py` (`BenchConfig`); every field is a flag here.

Generation (greedy, KV cache, batch 1 and 8) is sampled over processes, not repeats: a process's allocation history
can shift its speed by more than 10% for its whole life, the same code in two processes included. It runs in
`--generation_processes` rounds; each round starts fresh processes (ours, the peer, and with `--generation_control`
a second process of one side, the A/A control), warms them up, and they take turns, `--generation_repeats` timed
calls per batch size each, the order rotating. Reported per side: the median over its processes; the ratio of the
two medians; the lowest and highest ours / peer ratio within a round; the control's ratio to its side (the noise
floor). Every generation process of both sides gets the same allocator settings (`GENERATION_MALLOC_ENV`, below;
`--generation_malloc inherit` turns them off), and every process's greedy tokens must be the same.
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from unittest import mock


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/run.py` from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks import fixtures, stats, worker  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402


TIMEOUT_S = 900  # a participant silent for this long is reported as stuck
CHOICES = {"generation_control": ("ours", "peer", "none"), "generation_malloc": ("steady", "inherit")}
# glibc's allocator in every generation process, both sides alike, to take allocator noise out of the comparison
# (not to speed up either side). By default glibc raises its mmap threshold as large blocks are freed and trims the
# heap top back to the OS past a threshold that moves with it, so whether the next `generate` gets its buffers from
# memory the process already holds or page-faults them in again depends on that process's allocation history: the
# profiling behind this measured 0 to ~220K minor faults per batch-8 `generate` and two processes of identical code
# 13% apart. A fixed mmap threshold (32 MiB, which every glibc accepts; a larger block is then mmapped on every call,
# the same in every process) and no trimming below 1 GiB make every process reuse what it already holds (measured
# at the default sizes, batch 8: 38-79K faults per call without these, either side; with them a few thousand on a
# process's first full-length call, the KV cache's first touch, and none after). glibc reads these at process start,
# so they are set for the spawned workers only (this process's allocator is already running); other C libraries
# ignore them. Training is measured without them (its processes inherit this process's environment unchanged).
GENERATION_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def parse_args(argv=None) -> tuple[fixtures.BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="Also write the results as JSON here.")
    parser.add_argument("--quick", action="store_true", help="Small sizes and one window: checks the script, not speed.")
    parser.add_argument("--keep", type=Path, help="Build weights, data and cache in this folder and keep them.")
    for f in fields(fixtures.BenchConfig):
        if f.name == "generation_batches":
            parser.add_argument("--generation_batches", type=int, nargs="+")
        elif f.name in CHOICES:
            parser.add_argument(f"--{f.name}", choices=CHOICES[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=float if f.type is float else int)
    args = parser.parse_args(argv)
    values = dict(fixtures.QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in fields(fixtures.BenchConfig) if getattr(args, f.name) is not None})
    if "generation_batches" in values:
        values["generation_batches"] = tuple(values["generation_batches"])
    config = fixtures.BenchConfig(**values)
    if config.generation_processes < 1 or config.generation_repeats < 1:
        parser.error("--generation_processes and --generation_repeats must be at least 1")
    return config, args


class Participant:
    """A worker process and its end of the pipe; a dead or stuck worker is an error naming it."""

    def __init__(self, context, name: str, target, spec: dict):
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(spec, child), daemon=True, name=name)
        self.process.start()
        child.close()

    def recv(self) -> dict:
        if not self.conn.poll(TIMEOUT_S):
            raise RuntimeError(f"benchmark participant {self.name!r} sent nothing for {TIMEOUT_S} s")
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"benchmark participant {self.name!r} died (exit code {self.process.exitcode}); its traceback is above"
            ) from None

    def send(self, message) -> None:
        self.conn.send(message)

    def join(self) -> None:
        self.process.join(30)


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def run_training(context, specs: dict[str, dict], config) -> dict:
    """Participants of one stage take turns, one timed window each; returns per-participant medians and raw windows."""
    participants = {name: Participant(context, name, worker.train, spec) for name, spec in specs.items()}
    for participant in participants.values():
        assert participant.recv().get("ready")
    windows = {name: [] for name in participants}
    for round_ in range(1 + config.windows):  # round 0 is the untimed warm-up
        for name in _rotated(list(participants), round_):
            participants[name].send("go")
            result = participants[name].recv()
            if round_ > 0:
                windows[name].append(result)
    results = {}
    for name, participant in participants.items():
        final = participant.recv()
        participant.join()
        rows = windows[name]
        results[name] = {
            "samples_per_s": statistics.median(w["rows"] / w["seconds"] for w in rows),
            "tokens_per_s": statistics.median(w["tokens"] / w["seconds"] for w in rows),
            "samples_per_cpu_s": statistics.median(w["rows"] / w["cpu_seconds"] for w in rows),
            "tokens_per_cpu_s": statistics.median(w["tokens"] / w["cpu_seconds"] for w in rows),
            "seconds_per_step": statistics.median(w["seconds"] / w["steps"] for w in rows),
            "padding_fed": final["padding_fed"],
            "padding_epoch": final["padding_epoch"],
            "peak_memory": final["peak_memory"],
            "windows": rows,
        }
    return results


def run_generation(context, specs: dict[str, dict], config) -> dict:
    """Rounds of fresh processes, one per participant, taking turns: see `benchmarks/stats.py` for the statistics.

    `specs` holds "ours" and "peer"; with `config.generation_control` another process of that side joins every
    round as "control". In round k the participants start together, warm up, then time `generation_repeats`
    generate calls per batch size each, one call at a time, the order rotating with the round and the repeat.
    """
    if config.generation_control != "none":
        specs = {**specs, "control": specs[config.generation_control]}
    extra = GENERATION_MALLOC_ENV if config.generation_malloc == "steady" else {}
    rounds, peaks, allocator = [], {name: [] for name in specs}, set()
    for round_ in range(config.generation_processes):
        # Spawned processes copy the environment when they start; rotated start order: no side is always first.
        with mock.patch.dict(os.environ, extra):
            participants = {name: Participant(context, f"{name}[{round_}]", worker.generate, specs[name])
                            for name in _rotated(list(specs), round_)}
        for name in specs:
            ready = participants[name].recv()
            assert ready.get("ready")
            allocator.add(tuple(sorted(ready["malloc_env"].items())))
        runs = {name: {size: [] for size in config.generation_batches} for name in specs}
        for repeat in range(config.generation_repeats):
            for size in config.generation_batches:
                for name in _rotated(list(specs), round_ + repeat):
                    participants[name].send({"batch": size})
                    runs[name][size].append(participants[name].recv())
        for name in specs:
            participants[name].send("stop")
            peaks[name].append(participants[name].recv()["peak_memory"])
            participants[name].join()
        rounds.append(runs)
        print(f"[bench] generation round {round_ + 1}/{config.generation_processes} done", flush=True)
    # Every participant of every round must have run under the same allocator settings.
    assert len(allocator) == 1, f"generation processes ran under different allocator settings: {allocator}"
    control = None if config.generation_control == "none" else config.generation_control
    results = stats.summarize_generation(rounds, config.generation_batches, control=control)
    for name, memories in peaks.items():
        results[name]["peak_memory"] = max(memories, key=lambda memory: memory["bytes"])
        results[name]["peak_memory_per_process"] = memories
    results["method"] = {
        "processes_per_side": config.generation_processes, "repeats_per_process": config.generation_repeats,
        "control": control, "malloc_env": dict(next(iter(allocator))),
    }
    return results


def record_lengths(data_path: str, images: str, ours: Path, chat_template: str) -> list[int]:
    """Tokens per record after `<image>` expansion (our `length` column; the peer's processor writes the same ids)."""
    from training import sft  # noqa: PLC0415

    args = sft.LlavaArguments(chat_template=chat_template)
    _, processor = sft.build_model_and_processor(args, sft.ModelConfig(model_name_or_path=str(ours)))
    dataset = sft.prepare_dataset(data_path, sft.DataArguments(image_folder=images), processor, 2048, 0)
    return list(dataset["length"])


def build_cache(work: Path, ours: Path, data: dict, threads: int) -> dict:
    """The feature cache both stages read (same images), built once here and timed: a one-off cost per dataset."""
    import torch  # noqa: PLC0415

    from processing.llava_json import load_llava_json  # noqa: PLC0415
    from training import sft  # noqa: PLC0415
    from training.feature_cache import build_feature_cache  # noqa: PLC0415

    torch.set_num_threads(threads)
    model, processor = sft.build_model_and_processor(sft.LlavaArguments(), sft.ModelConfig(model_name_or_path=str(ours)))
    dataset = load_llava_json(data["stage1"], data["images"])
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = build_feature_cache(work / "feature_cache", model, processor, [dataset], device=device)
    return {"folder": str(cache.folder), "images": len(cache), "seconds": time.perf_counter() - start}


def environment(threads: int) -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    import trl  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "load_average_start": os.getloadavg(),
    }


def main(argv=None) -> dict:
    config, args = parse_args(argv)
    threads = config.threads
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {"config": config.to_dict(), "environment": environment(threads)}
        print(f"[bench] building data and weights in {work}", flush=True)
        data = fixtures.build_data(config, work)
        ours, peer = fixtures.build_weights(config, work, Path(data["captions"]))
        results["feature_cache"] = cache = build_cache(work, ours, data, threads)
        print(f"[bench] feature cache: {cache['images']} images in {cache['seconds']:.1f} s", flush=True)

        common = dict(ours=str(ours), peer=str(peer), images=data["images"], batch_size=config.batch_size,
                      warmup_steps=config.warmup_steps, windows=config.windows,
                      steps_per_window=config.steps_per_window, threads=threads, seed=config.seed)
        for stage, template, lr in (("stage1", "plain", config.stage1_lr), ("stage2", "vicuna_v1", config.stage2_lr)):
            lengths = record_lengths(data[stage], data["images"], ours, template)
            spec = dict(common, stage=stage, chat_template=template, data=data[stage], lr=lr, lengths=lengths)
            specs = {
                "ours_cached": dict(spec, side="ours", cache=cache["folder"]),
                "ours": dict(spec, side="ours"),
                "peer": dict(spec, side="peer"),
            }
            print(f"[bench] {stage}: {', '.join(specs)} take turns ({config.windows} windows of "
                  f"{config.steps_per_window} steps after {config.warmup_steps} warm-up steps)", flush=True)
            results[stage] = run_training(context, specs, config)

        image_files = sorted(str(p) for p in Path(data["images"]).iterdir())[: max(config.generation_batches)]
        spec = dict(common, new_tokens=config.new_tokens, generation_batches=list(config.generation_batches),
                    image_files=image_files)
        control = "" if config.generation_control == "none" else f" (+ a control: {config.generation_control} again)"
        print(f"[bench] generation: {config.generation_processes} rounds of fresh processes, ours and peer{control} "
              f"taking turns", flush=True)
        sides = {"ours": dict(spec, side="ours"), "peer": dict(spec, side="peer")}
        results["generation"] = run_generation(context, sides, config)

    results["environment"]["load_average_end"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - started
    # CPU time of this process and every participant: what the run costs whatever else the machine is doing.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in usage)
    table = markdown_table(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**results, "table": table}, indent=2))
        print(f"[bench] results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
