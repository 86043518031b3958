"""Rates over training: a scheduler that re-rates a surgered model step by step, like torch's LR schedulers.

>>> scheduler = pathsurgeon.RateScheduler.warmup(model, 0.1, steps=1000)   # the model is at fn(0) = 0
>>> for batch in loader:
...     loss_fn(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
...     scheduler.step()                                                    # now at fn(k)

At step ``k`` the model is exactly as after ``pathsurgeon.set_rate(model, fn(k))`` with the schedule over
depth the model carries (the one :func:`~pathsurgeon.add` gave it, unless ``schedule=`` says otherwise):
every step goes through :func:`~pathsurgeon.set_rate`, so the rates over depth are always the ones the
rest of pathsurgeon computes. A step only changes Python floats on the inserted modules: no capture, no
new modules, and under ``torch.compile`` no recompilation (the compiled graph reads the rate at run time).

A list schedule (one rate per depth unit) has no single rate to give ``fn(k)`` to; the scheduler scales
the list so that its largest rate is ``fn(k)``: ``rate_i(k) = list_i * fn(k) / max(list)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from .config import ScheduleName, validate_rate
from .errors import InvalidRateError, InvalidScheduleError, PathSurgeonError

__all__ = ["Early", "Late", "RateScheduler", "Warmup", "require_scheduler"]


# --- the common shapes, as picklable functions of the step --------------------------------------------


@dataclass(frozen=True)
class Warmup:
    """Linear warm-up (Composer's ``drop_warmup``): 0 at step 0, ``rate`` from step ``steps`` on."""

    rate: float
    steps: int

    def __call__(self, step: int) -> float:
        return self.rate * min(step, self.steps) / self.steps


@dataclass(frozen=True)
class Early:
    """Early stochastic depth (Liu et al. 2023, *Dropout Reduces Underfitting*): on before ``until``, then 0.

    ``decay="constant"``: ``rate`` for steps ``0 .. until-1``. ``decay="linear"``: from ``rate`` at step 0
    down to 0 at step ``until - 1``, as ``numpy.linspace(rate, 0, until)`` (the paper's ``drop_scheduler``
    in facebookresearch/dropout).
    """

    rate: float
    until: int
    decay: str = "constant"

    def __call__(self, step: int) -> float:
        if step >= self.until:
            return 0.0
        if self.decay == "constant" or self.until == 1:
            return self.rate
        return self.rate * (self.until - 1 - step) / (self.until - 1)


@dataclass(frozen=True)
class Late:
    """Late stochastic depth, or a delayed start (PVT's 0 then 0.1): 0 before step ``start``, then ``rate``."""

    rate: float
    start: int

    def __call__(self, step: int) -> float:
        return self.rate if step >= self.start else 0.0


# --- the scheduler ------------------------------------------------------------------------------------


class RateScheduler:
    """Sets a surgered model's drop-path rate to ``fn(step)`` at every step.

    ``fn(step) -> rate`` for ``step = 0, 1, 2, ...``; after construction the model is at ``fn(0)``, each
    :meth:`step` advances one step. ``schedule``: the schedule over depth ('auto', 'linear', 'uniform' or
    a list); by default the one the model carries now. A step is whatever you call :meth:`step` on; the
    trainer integrations (:mod:`pathsurgeon.integrations`) count optimizer steps.

    :meth:`state_dict` / :meth:`load_state_dict` resume it (the step; ``fn`` is not saved, as with
    ``torch.optim.lr_scheduler.LambdaLR``: build the scheduler with the same function, then load).
    """

    def __init__(
        self, model: nn.Module, fn: Callable[[int], float], *, schedule: ScheduleName | Sequence[float] | None = None
    ) -> None:
        from .changes import record_of
        from .wrappers import check_model

        check_model(model)
        if not callable(fn):
            raise PathSurgeonError(
                f"fn must be a function of the step returning a rate, got {type(fn).__name__}; "
                "pass e.g. lambda step: 0.1 * min(step, 1000) / 1000"
            )
        record = record_of(model)
        if record is None:
            raise PathSurgeonError(
                "model carries no pathsurgeon DropPath; call pathsurgeon.add(model, rate) before RateScheduler"
            )
        if schedule is None:
            schedule = record.config.schedule_argument  # the schedule over depth add was given
        if isinstance(schedule, str):
            self._shape: list[float] | None = None
        else:
            from .config import validate_schedule

            self._shape = cast(list[float], validate_schedule(schedule, None))  # a list schedule: a list
            if not self._shape or max(self._shape) == 0.0:
                raise InvalidScheduleError(
                    "a list schedule of zeros cannot be scaled to fn(step); pass schedule='linear' "
                    "(or another list) to RateScheduler"
                )
        self.model = model
        self.fn = fn
        self.schedule: ScheduleName | list[float] = (
            schedule if isinstance(schedule, str) else list(cast(list[float], self._shape))  # set above
        )
        self.last_step = -1
        self.rate = 0.0
        self.set_step(0)

    # named constructors for the common shapes

    @classmethod
    def warmup(cls, model: nn.Module, rate: float, steps: int, **kwargs: Any) -> RateScheduler:
        """Linear warm-up from 0 at step 0 to ``rate`` at step ``steps``, then constant."""
        return cls(model, Warmup(validate_rate(rate), _count(steps, "steps", minimum=1)), **kwargs)

    @classmethod
    def early(
        cls, model: nn.Module, rate: float, until: int, *, decay: str = "constant", **kwargs: Any
    ) -> RateScheduler:
        """``rate`` (``decay="constant"``) or ``rate`` falling linearly to 0 (``"linear"``) until ``until``; then 0."""
        if decay not in ("constant", "linear"):
            raise InvalidScheduleError(f"decay must be 'constant' or 'linear', got {decay!r}")
        return cls(model, Early(validate_rate(rate), _count(until, "until", minimum=1), decay), **kwargs)

    @classmethod
    def late(cls, model: nn.Module, rate: float, start: int, **kwargs: Any) -> RateScheduler:
        """0 before step ``start``, ``rate`` from then on (late stochastic depth; PVT's delayed start)."""
        return cls(model, Late(validate_rate(rate), _count(start, "start", minimum=0)), **kwargs)

    # stepping

    def step(self) -> float:
        """Advance one step; returns the new rate."""
        return self.set_step(self.last_step + 1)

    def set_step(self, step: int) -> float:
        """Put the model at step ``step`` (``fn(step)``); what integrations call with the trainer's step count.

        The rate is checked before anything changes: a bad ``fn(step)`` leaves model and scheduler as they were.
        """
        from .changes import record_of
        from .surgery import set_rate

        step = _count(step, "step", minimum=0)
        rate = self.rate_at(step)
        record = record_of(self.model)
        if record is None:
            raise PathSurgeonError(
                "the model was stripped (pathsurgeon.strip) while a RateScheduler still steps it; "
                "stop stepping the scheduler after strip, or add again and make a new RateScheduler"
            )
        if self._shape is None:
            if record.rate != rate or record.schedule != self.schedule:  # else set_rate would change nothing
                set_rate(self.model, rate, schedule=self.schedule)
        else:
            peak = max(self._shape)
            scaled = [value * rate / peak for value in self._shape]
            if record.schedule != scaled:
                set_rate(self.model, None, schedule=scaled)
        self.last_step, self.rate = step, rate
        return rate

    def rate_at(self, step: int) -> float:
        """``fn(step)``, checked to be a rate in [0, 1); changes nothing."""
        value = self.fn(step)
        try:
            return validate_rate(value)
        except InvalidRateError:
            raise InvalidRateError(
                f"the rate function gave {value!r} at step {step}; it must return a number in [0, 1) "
                "for every step (the model was left at step "
                f"{self.last_step if self.last_step >= 0 else 'none'})"
            ) from None

    # resuming

    def state_dict(self) -> dict[str, Any]:
        """``{"last_step": k, "rate": fn(k)}``; the rate is for reading (logs), resuming uses the step."""
        return {"last_step": self.last_step, "rate": self.rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: put the model at the saved step under this scheduler's ``fn``."""
        if not isinstance(state, dict) or "last_step" not in state:
            raise PathSurgeonError(
                "not a RateScheduler state: expected a dict with 'last_step'; pass scheduler.state_dict()"
            )
        self.set_step(state["last_step"])

    def __repr__(self) -> str:
        schedule = self.schedule if isinstance(self.schedule, str) else f"list of {len(self.schedule)}"
        return (f"RateScheduler(fn={self.fn!r}, schedule={schedule!r}, last_step={self.last_step}, "
                f"rate={self.rate:.4g})")


def _count(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    ):
        raise PathSurgeonError(f"{what} must be a whole number of steps, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise PathSurgeonError(f"{what} must be at least {minimum}, got {int(value)}")
    return int(value)


def require_scheduler(value: object, who: str) -> RateScheduler:
    """``value`` if it is a :class:`RateScheduler`, else a one-line error naming ``who`` needs one."""
    if not isinstance(value, RateScheduler):
        raise PathSurgeonError(
            f"{who} needs a pathsurgeon.RateScheduler, got {type(value).__name__}; "
            "pass e.g. RateScheduler.warmup(model, 0.1, steps=500)"
        )
    return value
