"""Hugging Face ``Trainer``: a callback that steps a :class:`~pathsurgeon.RateScheduler` and logs the rate.

>>> scheduler = pathsurgeon.RateScheduler.warmup(model, 0.1, steps=500)
>>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
...                                callbacks=[DropPathCallback(scheduler)])

Steps are optimizer steps (``state.global_step``): before each, the model is put at ``fn(global_step)``,
so gradient accumulation keeps one rate per update and ``resume_from_checkpoint`` continues the schedule.
Every training log gets ``drop_path_rate``: the rate of the steps just taken, as ``learning_rate`` is the
rate of the step just taken. It lands in ``trainer.state.log_history`` and in what callbacks after this
one see (the progress bar or printer). The ``report_to`` integrations (TensorBoard, W&B, ...) are called
before user callbacks; to have them record it too, put this callback first:
``trainer.callback_handler.callbacks.insert(0, callback)``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..schedulers import RateScheduler, require_scheduler

__all__ = ["DropPathCallback"]


class DropPathCallback(TrainerCallback):
    """Keeps ``scheduler``'s model at ``fn(global_step)`` and logs the rate as ``log_name``."""

    def __init__(self, scheduler: RateScheduler, *, log_name: str = "drop_path_rate") -> None:
        self.scheduler = require_scheduler(scheduler, "DropPathCallback")
        self.log_name = log_name

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.scheduler.set_step(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        self.scheduler.set_step(state.global_step)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or not ("loss" in logs or "learning_rate" in logs):
            return  # evaluation and summary logs
        history = state.log_history[-1] if state.log_history else {}
        # Trainer.log appends a copy ({**logs, "step": ...}) before calling back: complete that copy too
        if history.get("step") == state.global_step and history.keys() - {"step"} == logs.keys():
            history[self.log_name] = self.scheduler.rate
        logs[self.log_name] = self.scheduler.rate
