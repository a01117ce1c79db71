"""The README's main command, tests-sized (`--preset tiny`): the whole recipe runs, and a rerun resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def run_quickstart(out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py"), "--preset", "tiny", "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=True,
    )


def test_quickstart_tiny_runs_every_step_and_resumes(tmp_path):
    out = tmp_path / "qs"
    first = run_quickstart(out)
    for step in ("drawing the scene world", "symbolic teacher", "aligned to the annotated regions", "stage 1", "stage 2",
                 "scene QA probe"):
        assert step in first.stdout, step
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["per_template"]) == {"color", "count", "exists"}
    assert results["n"] == sum(results["n_per_template"].values()) > 0
    assert 0.0 <= results["overall"] <= 1.0 and results["stage2_steps"] == 4
    for stage in ("stage1", "stage2"):
        summary = json.loads((out / stage / "training_summary.json").read_text())
        assert summary["stage"] == stage and summary["global_steps"] > 0
    stage2_data = json.loads((out / "data" / "stage2.json").read_text())
    kinds = {record.get("type", "vqa") for record in stage2_data}
    assert kinds == {"vqa", "color", "conversation", "detail", "complex"}
    # The checkpoints carry the region-aligned tower, not the contrastive CLIP it was aligned from.
    from safetensors.torch import load_file

    stage2 = load_file(out / "stage2" / "model.safetensors")
    for name, is_the_tower in (("clip_regions", True), ("clip", False)):
        clip = load_file(out / "parts" / name / "model.safetensors")
        key = "vision_model.embeddings.patch_embedding.weight"
        assert torch.equal(stage2["model.vision_tower." + key.removeprefix("vision_model.")], clip[key]) == is_the_tower

    # A rerun finds every step's output and only evaluates again, to the same numbers.
    second = run_quickstart(out)
    assert "drawing the scene world" not in second.stdout and "stage 2:" not in second.stdout
    again = json.loads((out / "eval_results.json").read_text())
    assert (again["overall"], again["per_template"]) == (results["overall"], results["per_template"])

    # Saved tokenizers carry no truncation left over from training: a prompt is never cut behind the user's back.
    from transformers import AutoTokenizer

    for folder in (out / "parts" / "lm", out / "stage1", out / "stage2"):
        assert len(AutoTokenizer.from_pretrained(folder)(" red" * 600)["input_ids"]) >= 600, folder

    # The stage-2 checkpoint answers through the pipeline, from its own code.
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(out / "stage2"), trust_remote_code=True)
    image = Image.open(next((out / "world" / "images" / "eval").glob("*.png")))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "How many shapes are in the image?"}]}]
    reply = pipe(text=messages, generate_kwargs={"max_new_tokens": 3, "do_sample": False})
    assert isinstance(reply[0]["generated_text"][-1]["content"], str)


def _stage1_summary(out, seconds_per_step):
    (out / "stage1").mkdir(parents=True)
    summary = {"stage": "stage1", "train_runtime_s": 500 * seconds_per_step, "global_steps": 500}
    (out / "stage1" / "training_summary.json").write_text(json.dumps(summary))


def test_stage2_plan_fits_the_budget_at_the_measured_speed_and_is_kept_for_resume(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    import quickstart as qs

    preset = qs.PRESETS["default"]
    budget_s = 60 * qs.DEFAULT_BUDGET_MINUTES

    def plan(name, seconds_per_step, elapsed_s, stage2_steps=None, budget_minutes=None):
        out = tmp_path / name
        _stage1_summary(out, seconds_per_step)
        return qs.plan_stage2(out, preset, stage2_steps, budget_minutes, elapsed_s)

    # A machine 2x faster than the README's keeps the preset's steps; a slower one gets fewer, and what it gets fits.
    fast = plan("fast", 0.03, elapsed_s=75)
    assert fast["max_steps"] == preset.stage2_steps and fast["rule"] == "preset"
    slow = plan("slow", 0.175, elapsed_s=190)
    assert qs.MIN_STAGE2_STEPS < slow["max_steps"] < preset.stage2_steps
    assert slow["rule"] == "preset, cut to the default budget"
    assert slow["estimated_step_s"] == pytest.approx(qs.STAGE2_PER_STAGE1_STEP * 0.175, abs=1e-3)
    planned_s = 190 + qs.STAGE2_OVERHEAD_S + slow["max_steps"] * slow["estimated_step_s"]
    assert budget_s * 0.9 < planned_s <= budget_s
    # --budget-minutes fills its budget, past the preset's steps when there is time; --stage2-steps is taken as is.
    assert plan("roomy", 0.07, elapsed_s=75, budget_minutes=30)["max_steps"] > preset.stage2_steps
    assert plan("exact", 0.07, elapsed_s=75, stage2_steps=321) == {"max_steps": 321, "rule": "--stage2-steps"}
    # A budget already spent still trains a minimum, rather than nothing.
    assert plan("late", 0.175, elapsed_s=2 * budget_s)["max_steps"] == qs.MIN_STAGE2_STEPS
    # The plan is written once: a resumed run continues the schedule it started, whatever its own clock says.
    again = qs.plan_stage2(tmp_path / "slow", preset, None, 60.0, elapsed_s=0)
    assert again == slow == json.loads((tmp_path / "slow" / "stage2_plan.json").read_text())
