"""Fit a training run's step count to a wall-clock budget (`--train_budget_minutes` of training/sft.py).

`max_steps` becomes a ceiling. The first `budget_calibration_steps` steps time this machine; the callback then keeps the
steps that fit the budget (counted from the start of training) and re-lays the learning-rate schedule over them, so
that warmup and decay end where a run launched with `--max_steps N` would have them. A machine's pace is not constant
(the miniature's stage 2 ran its first epoch at ~0.13 s a step and later ones at ~0.09), so the count is decided again
when a quarter, a half and three quarters of the budget are spent, each time on the pace since the last decision; the
schedule moves a little each time (the rate at 3/4 of a cosine changes by ~0.04 of its peak for a count 5% off).
Should the machine slow down after the last decision, training still ends when the budget is spent, by then in the
schedule's last few percent, where the rate is all but zero.

The count in force is saved with the checkpoints' trainer state; a resumed run continues with it and only keeps the
deadline. In a distributed run every process follows the first process's clock, so all stop at the same step.

Why not simply stop at a deadline: a schedule cut short never decays, and the last steps at a high learning rate are
where a small model's answers move most (the miniature scored 0.78-0.81 on step counts 1% apart).
"""

import time
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, get_scheduler
from transformers.trainer_callback import ExportableState, ProgressCallback


# The first steps of a run pay one-off costs (allocations, the data loader's start): they are not timed.
UNTIMED_STEPS = 2
# Shares of the budget after which the count is decided again, on the pace since the decision before.
RETIME_AT = (0.25, 0.5, 0.75)


def relay_lr_schedule(scheduler, args, num_training_steps: int) -> None:
    """Gives `scheduler` (built by the Trainer for another step count) the schedule `args` lay over
    `num_training_steps`, from the step it is at: warmup and decay then follow `--max_steps num_training_steps`."""
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"--train_budget_minutes re-lays the learning-rate schedule over the steps that fit, which it can do for "
            f"the LambdaLR schedules of `lr_scheduler_type` (linear, cosine, constant_with_warmup, ...), not for "
            f"{type(scheduler).__name__} ({args.lr_scheduler_type})."
        )
    # A stand-in optimizer: building a scheduler sets the learning rate of the optimizer it is given.
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in scheduler.base_lrs])
    fresh = get_scheduler(
        args.lr_scheduler_type, optimizer=stand_in, num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    scheduler.lr_lambdas = fresh.lr_lambdas
    # The next optimizer step already takes the new schedule's rate (and the Trainer logs it, from `get_last_lr`).
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _first_process_says(value):
    """`value` as the first process has it: every process of a distributed run must decide alike."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


class TrainingBudgetCallback(TrainerCallback, ExportableState):
    """Decides how many steps fit `budget_s` seconds of training, after timing `calibration_steps` of them and again
    at `RETIME_AT`; see the module docstring. `clock` is there for tests."""

    def __init__(self, budget_s: float, calibration_steps: int = 50, clock: Callable[[], float] | None = None):
        if budget_s <= 0:
            raise ValueError(f"--train_budget_minutes must be positive, got {budget_s / 60:g}.")
        if calibration_steps < 1:
            raise ValueError(f"--budget_calibration_steps must be at least 1, got {calibration_steps}.")
        self.budget_s = budget_s
        self.calibration_steps = calibration_steps
        self.clock = clock or time.monotonic
        self.decided_max_steps: int | None = None
        self.estimated_step_s: float | None = None
        self.trainer = None  # set by `attach`, to redraw the Trainer's progress bar

    def attach(self, trainer) -> "TrainingBudgetCallback":
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def state(self) -> dict:
        return {
            "args": {"budget_s": self.budget_s, "calibration_steps": self.calibration_steps},
            "attributes": {"decided_max_steps": self.decided_max_steps, "estimated_step_s": self.estimated_step_s},
        }

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self._started = self.clock()
        self._first_step = state.global_step
        self._ceiling = state.max_steps
        self._mark = None  # (step, elapsed seconds) the pace is measured from
        self._retime_at = list(RETIME_AT)
        # A resumed run: the trainer state it loaded holds the checkpoint's callback states.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        if attributes.get("decided_max_steps") is not None:
            self.estimated_step_s = attributes.get("estimated_step_s")
            self._retime_at = []
            self._apply(int(attributes["decided_max_steps"]), args, state, lr_scheduler)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        elapsed = _first_process_says(self.clock() - self._started)
        if self.decided_max_steps is None:
            done = state.global_step - self._first_step
            if done == UNTIMED_STEPS:
                self._mark = (state.global_step, elapsed)
            if done == UNTIMED_STEPS + self.calibration_steps:
                self._decide(args, state, control, lr_scheduler, elapsed)
        elif self._retime_at and elapsed >= self._retime_at[0] * self.budget_s:
            self._decide(args, state, control, lr_scheduler, elapsed)
        elif state.global_step < state.max_steps and elapsed > self.budget_s:
            self._stop(args, control)

    def _decide(self, args, state, control, lr_scheduler, elapsed: float) -> None:
        mark_step, mark_elapsed = self._mark
        step_s = max(elapsed - mark_elapsed, 1e-9) / max(state.global_step - mark_step, 1)
        left_s = max(0.0, self.budget_s - elapsed)
        steps = min(self._ceiling, state.global_step + int(left_s / step_s))
        self._mark = (state.global_step, elapsed)
        self._retime_at = [share for share in self._retime_at if share * self.budget_s > elapsed]
        self.estimated_step_s = round(step_s, 4)
        self._apply(steps, args, state, lr_scheduler)
        if state.global_step >= steps:  # no time left: the Trainer checked the old count before this callback ran
            self._stop(args, control)

    @staticmethod
    def _stop(args, control) -> None:
        control.should_training_stop = True
        control.should_save = args.save_strategy != "no"  # a last checkpoint, as at any planned last step

    def _apply(self, steps: int, args, state, lr_scheduler) -> None:
        self.decided_max_steps = steps
        state.max_steps = steps
        if lr_scheduler is not None:
            relay_lr_schedule(lr_scheduler, args, steps)
        for callback in self.trainer.callback_handler.callbacks if self.trainer is not None else []:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None:
                bar.total = steps
                bar.refresh()
