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
    # Stage 2 trains and answers without vicuna_v1's system prompt (the miniature recipe's `system_prompt: ""`).
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out / "stage2", trust_remote_code=True)
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True)
    assert prompt == "<s> USER: Hi? ASSISTANT:"
    assert "| system prompt | none |" in (out / "stage2" / "README.md").read_text()
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


def test_stage2_plan_gives_the_rest_of_the_budget_and_is_kept_for_resume(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    import quickstart as qs

    preset = qs.PRESETS["default"]
    budget_s = 60 * qs.DEFAULT_BUDGET_MINUTES

    def plan(name, elapsed_s, stage2_steps=None, budget_minutes=None):
        (tmp_path / name).mkdir()
        return qs.plan_stage2(tmp_path / name, preset, stage2_steps, budget_minutes, elapsed_s)

    # By default: the preset's steps as the ceiling, and the minutes left for stage 2's training steps, which
    # training/sft.py fills after timing its first steps (tests/test_training_budget.py).
    default = plan("default", elapsed_s=130)
    assert default["max_steps"] == preset.stage2_steps
    left_s = 60 * default["train_budget_minutes"]
    assert left_s == pytest.approx(qs.BUDGET_SAFETY * budget_s - 130 - qs.STAGE2_OVERHEAD_S, abs=0.1)
    assert 130 + left_s + qs.STAGE2_OVERHEAD_S <= budget_s
    # --budget-minutes fills its budget, past the preset's steps when there is time; --stage2-steps is taken as is.
    roomy = plan("roomy", elapsed_s=130, budget_minutes=30)
    assert roomy["max_steps"] > preset.stage2_steps and roomy["train_budget_minutes"] > 25
    assert plan("exact", elapsed_s=130, stage2_steps=321) == {"max_steps": 321, "rule": "--stage2-steps"}
    # A budget already spent still trains stage 2 a little, rather than not at all.
    assert 60 * plan("late", elapsed_s=2 * budget_s)["train_budget_minutes"] == pytest.approx(qs.MIN_STAGE2_S)
    # The plan is written once: a resumed run continues the schedule it started, whatever its own clock says.
    again = qs.plan_stage2(tmp_path / "default", preset, None, 60.0, elapsed_s=0)
    assert again == default == json.loads((tmp_path / "default" / "stage2_plan.json").read_text())
