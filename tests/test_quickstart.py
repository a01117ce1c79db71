"""The README's main command, tests-sized (`--preset tiny`): the whole recipe runs, and a rerun resumes."""

import json
import os
import subprocess
import sys

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
    for step in ("drawing the scene world", "symbolic teacher", "stage 1", "stage 2", "scene QA probe"):
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
    assert kinds == {"vqa", "conversation", "detail", "complex"}

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
