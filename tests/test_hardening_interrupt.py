"""Interruption: SIGKILL data generation and training at seeded random points, resume, compare with a clean run.

- Generation is killed 3 times; the final JSONL has every (image, type) exactly once and equals an uninterrupted
  run's samples.
- Training (`training/sft.py`, a checkpoint every step) is killed 3 times and resumed each time with
  `--resume_from_checkpoint last`; the final weights equal an uninterrupted run's bit for bit, and a checkpoint that
  a kill left half-written is never resumed from (transformers writes checkpoints in place, and its own
  `get_last_checkpoint` would pick such a folder).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from training import sft

SEED = 8
SFT = str(REPO / "training" / "sft.py")


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def kill(process):
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------------------------------------


def test_generation_killed_three_times_resumes_to_the_clean_dataset(tmp_path):
    from processing.generate import generate_from_annotations
    from processing.synthetic import make_scene_world
    from processing.teachers import SymbolicTeacher

    world = make_scene_world(tmp_path / "world", 30, "train", seed=3)
    total = 30 * 3
    output = tmp_path / "killed.jsonl"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from processing.generate import generate_from_annotations
        from processing.teachers import SymbolicTeacher

        class Slow(SymbolicTeacher):
            def complete(self, messages):
                time.sleep(0.01)
                return super().complete(messages)

        generate_from_annotations({str(world.annotations_dir)!r}, "train", Slow(), {str(output)!r},
                                  concurrency=3, progress=False, fsync_interval=None)
    """))
    rng = random.Random(SEED)
    lines_at_kill = []
    for _ in range(3):
        start = output.read_bytes().count(b"\n") if output.exists() else 0
        target = start + rng.randint(3, 15)
        process = subprocess.Popen([sys.executable, str(script)], env=env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while process.poll() is None and time.time() < deadline:
            if output.exists() and output.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))  # land anywhere, mid-line included
        assert process.poll() is None, "generation finished before it could be killed"
        kill(process)
        lines_at_kill.append(output.read_bytes().count(b"\n"))
    assert lines_at_kill == sorted(lines_at_kill) and lines_at_kill[-1] < total  # progress, not completion

    stats = generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), output, progress=False)
    assert stats.already_done + stats.written == total
    records = [json.loads(line) for line in output.read_text().splitlines()]
    keys = [(r["image_id"], r["type"]) for r in records]
    assert len(keys) == len(set(keys)) == total  # no duplicates, no gaps

    clean = tmp_path / "clean.jsonl"
    generate_from_annotations(world.annotations_dir, "train", SymbolicTeacher(), clean, progress=False)
    by_key = {(r["image_id"], r["type"]): r for r in map(json.loads, clean.read_text().splitlines())}
    assert {k: r for k, r in zip(keys, records)} == by_key


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

STEPS = 40


@pytest.fixture(scope="module")
def training_inputs(tmp_path_factory, tiny_llava):
    root = tmp_path_factory.mktemp("train")
    model, processor = tiny_llava
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    colors = {"red": (220, 30, 30), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 20)}
    records = []
    for i in range(16):
        name = list(colors)[i % 4]
        Image.new("RGB", (20 + i, 24), colors[name]).save(root / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (root / "train.json").write_text(json.dumps(records))
    return root


def sft_argv(root, out, *extra):
    return [
        "--stage", "stage2", "--model_name_or_path", str(root / "base"), "--data_path", str(root / "train.json"),
        "--image_folder", str(root), "--output_dir", str(out), "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--report_to", "none",
        "--gradient_checkpointing", "false", "--max_length", "128", "--seed", "5", "--dataloader_num_workers", "0",
        "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true", *extra,
    ]


def checkpoint_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) if out.exists() else []


def newest_with_state(out):
    """The newest checkpoint whose trainer_state.json (the Trainer's last write) is there and whole."""
    for step in reversed(checkpoint_steps(out)):
        try:
            json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
            return str(out / f"checkpoint-{step}")
        except (OSError, ValueError):
            continue
    return None


def test_training_killed_three_times_resumes_to_the_uninterrupted_weights(training_inputs, tmp_path):
    root = training_inputs
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, SFT, *sft_argv(root, straight)], check=True, env=env(), capture_output=True)

    rng = random.Random(SEED)
    resumed_from, expected = [], []
    for attempt in range(3):
        log = tmp_path / f"attempt-{attempt}.log"
        reached = max(checkpoint_steps(killed), default=0)
        expected.append(newest_with_state(killed))
        with open(log, "w") as f:
            process = subprocess.Popen([sys.executable, SFT, *sft_argv(root, killed, "--resume_from_checkpoint", "last")],
                                       env=env(), stdout=f, stderr=subprocess.STDOUT)
            deadline = time.time() + 120
            # Wait until this run has saved one checkpoint completely (the Trainer has begun the next one), then kill
            # at a random moment: often in the middle of a save.
            while process.poll() is None and time.time() < deadline and max(checkpoint_steps(killed), default=0) <= reached + 1:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))
            assert process.poll() is None, log.read_text()[-3000:]
            kill(process)
        match = re.search(r"^\[llava\] resuming from (\S+)$", log.read_text(), re.MULTILINE)
        resumed_from.append(match and match[1])
        assert max(checkpoint_steps(killed)) < STEPS and not (killed / "training_summary.json").exists()
    # The first run started fresh; each later one resumed from the newest checkpoint the Trainer had finished.
    assert resumed_from == expected and expected[0] is None and all(expected[1:])

    # Whatever the kills left: every folder that resuming would accept is really complete (weights + state load).
    for step in checkpoint_steps(killed):
        folder = killed / f"checkpoint-{step}"
        if sft.incomplete_checkpoint_reason(folder) is None:
            assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
            assert load_file(folder / "model.safetensors")

    subprocess.run([sys.executable, SFT, *sft_argv(root, killed, "--resume_from_checkpoint", "last")],
                   check=True, env=env(), capture_output=True)
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    base = load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(base[k], a[k]) for k in base)  # training moved the weights: the check is not vacuous
    assert json.loads((killed / "training_summary.json").read_text())["global_steps"] == STEPS

    # Half-written checkpoints, as a kill during a save leaves them, are never resumed from.
    complete = killed / f"checkpoint-{STEPS}"
    no_state = killed / f"checkpoint-{STEPS + 1}"  # killed before trainer_state.json (written last)
    shutil.copytree(complete, no_state)
    (no_state / "trainer_state.json").unlink()
    assert get_last_checkpoint(str(killed)) == str(no_state)  # transformers' own pick would be the broken one
    cut = killed / f"checkpoint-{STEPS + 2}"  # killed while writing the weights of a later save
    shutil.copytree(complete, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    torn_state = killed / f"checkpoint-{STEPS + 3}"  # trainer_state.json itself torn
    shutil.copytree(complete, torn_state)
    (torn_state / "trainer_state.json").write_text((complete / "trainer_state.json").read_text()[:50])

    assert sft.resolve_resume_checkpoint("last", killed) == str(complete)
    for broken, reason in ((no_state, "no trainer_state.json"), (cut, "model.safetensors is missing or unreadable"),
                           (torn_state, "trainer_state.json is cut off")):
        with pytest.raises(ValueError, match=reason):
            sft.resolve_resume_checkpoint(str(broken), killed)
    assert sft.resolve_resume_checkpoint("last", tmp_path / "nothing-yet") is None
