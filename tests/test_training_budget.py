"""`--train_budget_minutes` (training/budget.py): the steps that fit a budget, the schedule laid over them, resume."""

import json
import math
import types

import pytest
import torch
from safetensors.torch import load_file

from training import budget, sft


def run(tiny_world, tiny_stage1, out, *extra, steps=40):
    return sft.main([
        "--stage", "stage2", "--model_name_or_path", str(tiny_stage1), "--data_path", str(tiny_world["instruct"]),
        "--image_folder", str(tiny_world["images"]), "--output_dir", str(out), "--max_steps", str(steps),
        "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0.1", "--report_to", "none", "--gradient_checkpointing", "false", "--logging_steps", "1",
        "--max_length", "512", "--seed", "3", "--save_strategy", "steps", "--save_steps", "4", *extra,
    ])


def fake_clock(monkeypatch, *readings):
    """The callback's clock reads `readings` in turn (one at the start and one after each step), then stands still at
    the last."""
    values = iter(readings)
    last = [readings[-1]]

    def monotonic():
        last[0] = next(values, last[0])
        return last[0]

    monkeypatch.setattr(budget, "time", types.SimpleNamespace(monotonic=monotonic))


def step_times(*paces, steps=200):
    """Clock readings for a run whose steps take `seconds` each from `start_step` on, for each `(start_step, seconds)`
    of `paces`: one reading at the start and one after each step."""
    readings, now = [0.0], 0.0
    for step in range(1, steps + 1):
        now += next(seconds for start, seconds in reversed(paces) if step >= start)
        readings.append(now)
    return readings


CALIBRATED = budget.UNTIMED_STEPS + 4  # the step at which 4 calibration steps are timed


def learning_rates(folder):
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}


@pytest.fixture(scope="module")
def budgeted(tiny_world, tiny_stage1, tmp_path_factory):
    """Ceiling 40 steps, 4 calibration steps timed at 1 s each, 20 s of budget: 20 steps fit."""
    out = tmp_path_factory.mktemp("budgeted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_clock(monkeypatch, *step_times((1, 1.0), steps=CALIBRATED))  # then time stands still: no re-timing
        summary = run(tiny_world, tiny_stage1, out, "--train_budget_minutes", str(20 / 60),
                      "--budget_calibration_steps", "4")
    return out, summary


def test_budget_keeps_the_steps_that_fit_and_lays_the_schedule_over_them(budgeted, tiny_world, tiny_stage1, tmp_path):
    out, summary = budgeted
    assert summary["global_steps"] == 20
    assert summary["hyperparameters"]["max_steps"] == 40  # the ceiling, as given
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["max_steps"] == 20
    assert state["stateful_callbacks"]["TrainingBudgetCallback"]["attributes"]["decided_max_steps"] == 20

    # After the decision the learning rate is, step for step, that of a run launched with --max_steps 20: warmup
    # and cosine decay end where that run's do (before it, the ceiling's schedule: a slower warmup).
    straight = tmp_path / "straight"
    run(tiny_world, tiny_stage1, straight, steps=20)
    budgeted_lr, straight_lr = learning_rates(out / "checkpoint-20"), learning_rates(straight / "checkpoint-20")
    assert sorted(budgeted_lr) == sorted(straight_lr) == list(range(1, 21))
    for step in range(CALIBRATED + 1, 21):
        assert budgeted_lr[step] == pytest.approx(straight_lr[step], rel=1e-6), step
    assert budgeted_lr[2] < straight_lr[2]  # the ceiling's warmup (4 steps) is slower than the 20 steps' (2)


def test_resumed_run_keeps_the_decided_steps_without_timing_again(budgeted, tiny_world, tiny_stage1, tmp_path,
                                                                   monkeypatch):
    out, _ = budgeted
    # Time stands still: a run that timed the machine again would find its steps free and train to the ceiling (40).
    fake_clock(monkeypatch, 100.0)
    resumed = tmp_path / "resumed"
    summary = run(tiny_world, tiny_stage1, resumed, "--train_budget_minutes", str(20 / 60),
                  "--budget_calibration_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-12"))
    assert summary["global_steps"] == 20
    final, again = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=0, rtol=0, msg=key)
    state = json.loads((resumed / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["TrainingBudgetCallback"]["attributes"]["estimated_step_s"] == 1.0


def test_budget_spent_by_the_calibration_stops_there(tiny_world, tiny_stage1, tmp_path, monkeypatch):
    fake_clock(monkeypatch, *step_times((1, 1.0)))
    summary = run(tiny_world, tiny_stage1, tmp_path / "late", "--train_budget_minutes", str(6 / 60),
                  "--budget_calibration_steps", "4")
    assert summary["global_steps"] == CALIBRATED
    assert (tmp_path / "late" / f"checkpoint-{CALIBRATED}").is_dir()  # saved where it stopped, as at any last step


def test_a_machine_that_speeds_up_gets_more_steps_at_the_next_decision(tiny_world, tiny_stage1, tmp_path, monkeypatch):
    # 40 s of budget. Timed at 1 s a step: 40 steps fit. Then 0.5 s a step: at 10 s (a quarter of the budget) 30 s are
    # left for 60 more steps, and the half and three-quarter points agree.
    fake_clock(monkeypatch, *step_times((1, 1.0), (CALIBRATED + 1, 0.5)))
    out = tmp_path / "faster"
    summary = run(tiny_world, tiny_stage1, out, "--train_budget_minutes", str(40 / 60), "--budget_calibration_steps",
                  "4", steps=100)
    steps = CALIBRATED + round((10 - CALIBRATED) / 0.5) + 60
    assert summary["global_steps"] == steps
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["max_steps"] == steps
    assert state["stateful_callbacks"]["TrainingBudgetCallback"]["attributes"]["estimated_step_s"] == 0.5
    # The schedule ends where a run launched with that many steps ends: the cosine's last step, after its warmup.
    warmup = math.ceil(0.1 * steps)
    last = learning_rates(out / f"checkpoint-{steps}")[steps]
    assert last == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * (steps - 1 - warmup) / (steps - warmup))), rel=1e-6)


def test_a_machine_that_slows_down_still_ends_within_the_budget(tiny_world, tiny_stage1, tmp_path, monkeypatch):
    # 1 s a step until step 30 (40 steps fit 40 s, at every decision), then step 31 takes 15 s: the budget is spent.
    fake_clock(monkeypatch, *step_times((1, 1.0), (31, 15.0), (32, 1.0)))
    summary = run(tiny_world, tiny_stage1, tmp_path / "slow", "--train_budget_minutes", str(40 / 60),
                  "--budget_calibration_steps", "4", steps=100)
    assert summary["global_steps"] == 31
    assert json.loads((tmp_path / "slow" / "checkpoint-31" / "trainer_state.json").read_text())["max_steps"] == 40


def test_budget_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="--train_budget_minutes must be positive"):
        budget.TrainingBudgetCallback(0)
    weight = torch.nn.Parameter(torch.zeros(1))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([weight], lr=0.1))
    args = types.SimpleNamespace(lr_scheduler_type="reduce_lr_on_plateau")
    with pytest.raises(ValueError, match="not for ReduceLROnPlateau"):
        budget.relay_lr_schedule(plateau, args, 10)
