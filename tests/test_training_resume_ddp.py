"""training/sft.py as users launch it: killed and resumed, and data-parallel over 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys
import time

import torch
from conftest import REPO
from safetensors.torch import load_file


SFT = str(REPO / "training" / "sft.py")


def stage2_args(tiny_world, tiny_stage1, out, batch, steps=8, **extra):
    args = [
        "--stage", "stage2", "--model_name_or_path", str(tiny_stage1), "--data_path", str(tiny_world["instruct"]),
        "--image_folder", str(tiny_world["images"]), "--output_dir", str(out), "--max_steps", str(steps),
        "--per_device_train_batch_size", str(batch), "--learning_rate", "5e-3", "--report_to", "none",
        "--gradient_checkpointing", "false", "--logging_steps", "1", "--max_length", "512", "--seed", "3",
        "--dataloader_num_workers", "0",
    ]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def assert_same_weights(a, b, atol=0.0):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


def test_resume_after_kill_reaches_the_uninterrupted_weights(tiny_world, tiny_stage1, tmp_path):
    common = dict(save_strategy="steps", save_steps=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, SFT, *stage2_args(tiny_world, tiny_stage1, straight, 4, **common)],
                   check=True, env=env(), capture_output=True)

    process = subprocess.Popen([sys.executable, SFT, *stage2_args(tiny_world, tiny_stage1, killed, 4, **common)],
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert marker.exists(), "the run never reached its step-4 checkpoint"
    assert not (killed / "training_summary.json").exists(), "the run finished before it could be killed"

    subprocess.run(
        [sys.executable, SFT, *stage2_args(tiny_world, tiny_stage1, killed, 4, **common,
                                           resume_from_checkpoint=killed / "checkpoint-4")],
        check=True, env=env(), capture_output=True,
    )
    assert_same_weights(straight, killed)
    # And the comparison is not vacuous: training moved the weights away from stage 1.
    before, after = load_file(tiny_stage1 / "model.safetensors"), load_file(straight / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_two_process_ddp_matches_one_process_with_twice_the_batch(tiny_world, tiny_stage1, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, SFT, *stage2_args(tiny_world, tiny_stage1, single, 4, steps=4, save_strategy="no")],
                   check=True, env=env(), capture_output=True)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "training" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", "29517",
        SFT, *stage2_args(tiny_world, tiny_stage1, ddp, 2, steps=4, save_strategy="no"),
    ]
    result = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # Really one data-parallel group (accelerate falls back to independent processes without `use_cpu`).
    assert json.loads((ddp / "training_summary.json").read_text())["hyperparameters"]["global_batch_size"] == 4
    # Reduction order differs between one process and two, and Adam turns that into update differences on
    # near-zero gradients: 2e-5 here, against 5e-3 for one step at this lr. One process on half the batch (what an
    # unsynchronised rank trains on) ends 2e-2 away.
    assert_same_weights(single, ddp, atol=1e-4)
