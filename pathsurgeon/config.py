"""What to do to a model: :class:`DropPathConfig`, and the one place every user-given setting is checked.

>>> config = DropPathConfig(0.1, mode="skip", exclude=["blocks.0"])
>>> pathsurgeon.add(model, config)                      # the same as add(model, 0.1, mode="skip", ...)

Every check raises a :class:`~pathsurgeon.errors.PathSurgeonError` whose one line names the problem
and the fix, before anything is read from or done to a model.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .choices import BATCH_NORM_CHOICES, MODES, SCHEDULES, BatchNormChoice, Mode, ScheduleName
from .errors import InvalidModeError, InvalidRateError, InvalidScheduleError, PathSurgeonError

__all__ = [
    "BATCH_NORM_CHOICES",
    "MODES",
    "SCHEDULES",
    "BatchNormChoice",
    "DropPathConfig",
    "Mode",
    "ScheduleName",
    "brief",
    "config_from_arguments",
    "matches",
    "real_number",
    "selected",
    "validate_batch_norm",
    "validate_mode",
    "validate_rate",
    "validate_schedule",
    "validate_tolerance",
]


def real_number(value: object) -> float | None:
    """``value`` as a Python float if it is a real number of any type, else None.

    Python and numpy ints and floats (anything registered as :class:`numbers.Real`) and 0-d real tensors
    count; booleans, complex numbers and tensors with more than one element do not.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if (isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
            and not value.is_meta):  # a meta tensor holds no number to read
        return float(value.item())
    return None


def brief(value: object) -> str:
    """A one-line description of a value for an error message (a tensor by its shape, not its contents)."""
    if isinstance(value, torch.Tensor):
        where = "" if value.device.type == "cpu" else f" on the {value.device} device"
        return f"a {value.dtype} tensor of shape {list(value.shape)}{where}"
    text = repr(value).splitlines()[0] if repr(value) else ""
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def validate_rate(rate: object, *, what: str = "rate", example: str = "rate=0.1") -> float:
    """Return ``rate`` as a float in [0, 1), or raise :class:`~pathsurgeon.errors.InvalidRateError`.

    Any real number type is accepted (``0.1``, ``numpy.float32(0.1)``, ``torch.tensor(0.1)``). ``what`` and
    ``example`` word the message in the caller's syntax (the command line: ``--rate``, ``--rate 0.1``).
    """
    value = real_number(rate)
    if value is None:
        raise InvalidRateError(f"{what} must be a number in [0, 1), got {brief(rate)}; pass e.g. {example}")
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise InvalidRateError(
            f"{what} must be in [0, 1) (the probability of dropping a sample's branch), got {value!r}; "
            f"pass e.g. {example}"
        )
    return value


def validate_mode(mode: object) -> Mode:
    """Return ``mode`` if it is one of :data:`MODES`, or raise :class:`~pathsurgeon.errors.InvalidModeError`."""
    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidModeError(
            f"mode must be one of {', '.join(repr(m) for m in MODES)}, "
            f"got {repr(mode) if isinstance(mode, str) else brief(mode)}; "
            "pass mode='sample' (timm's per-sample drop path) or mode='skip' (same, without computing dropped samples)"
        )
    return mode


def validate_batch_norm(value: object) -> BatchNormChoice:
    """Return ``value`` if it is one of :data:`BATCH_NORM_CHOICES`, else raise a one-line error."""
    if not isinstance(value, str) or value not in BATCH_NORM_CHOICES:
        raise PathSurgeonError(
            f"batch_norm must be one of {', '.join(repr(c) for c in BATCH_NORM_CHOICES)}, got {brief(value)}; "
            "pass batch_norm='kept_rows' to let BatchNorm branches skip dropped samples, else leave the default"
        )
    return value


def validate_schedule(schedule: object, rate: float | None) -> ScheduleName | list[float]:
    """Check a schedule (and that ``rate`` fits it) without looking at a model."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise InvalidScheduleError(
                f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} or a list of per-unit rates"
            )
        if rate is None:
            raise InvalidScheduleError(f"schedule={schedule!r} needs a rate; pass e.g. rate=0.1")
        return schedule
    if not isinstance(schedule, (list, tuple)) and not (isinstance(schedule, torch.Tensor) and schedule.ndim == 1):
        raise InvalidScheduleError(
            f"schedule must be {', '.join(repr(s) for s in SCHEDULES)} or a list of rates, "
            f"got {type(schedule).__name__}"
        )
    if rate is not None:
        raise InvalidScheduleError(
            "pass either rate= or a list schedule, not both; the list already gives every unit's rate"
        )
    values = schedule.tolist() if isinstance(schedule, torch.Tensor) else list(schedule)
    return [validate_rate(r, what=f"schedule[{i}]") for i, r in enumerate(values)]


def validate_tolerance(verify: object) -> float | None:
    """``verify`` as the tolerance of the eval check: True → 0.0 (bitwise), False/None → None (no check)."""
    if verify is True:
        return 0.0
    if verify is False or verify is None:
        return None
    value = real_number(verify)
    if value is not None and value >= 0:  # NaN fails the comparison
        return value
    raise PathSurgeonError(f"verify must be True, False or a tolerance >= 0, got {brief(verify)}")


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether block ``name`` matches any of the glob ``patterns``: the one place ``include`` / ``exclude``
    patterns are matched (``fnmatch``, case-sensitive, ``*`` may span dots)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def selected(block: str, include: Iterable[str], exclude: Iterable[str], *, no_include_selects: bool = True) -> bool:
    """Whether ``include`` / ``exclude`` select ``block``: an ``include`` pattern matches it (or, with
    ``no_include_selects``, there is none) and no ``exclude`` pattern does. Parts left alone by default
    (regions, language models) are brought in only by a pattern that names them: ``no_include_selects=False``."""
    include = tuple(include)
    included = matches(block, include) or (no_include_selects and not include)
    return included and not matches(block, exclude)


def _globs(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(g, str) and g for g in value):
        raise PathSurgeonError(
            f"{what} must be a list of glob patterns over block names, got {brief(value)}; "
            f"pass e.g. {what}=['blocks.0', 'stages.3.*']"
        )
    return tuple(value)


@dataclass(frozen=True)
class DropPathConfig:
    """Everything :func:`pathsurgeon.add` needs to know, checked when it is made.

    ``rate``: the drop-path rate (the deepest unit's under a linear schedule); None with a list
    ``schedule``. ``schedule``: 'auto' (the model's library's own numbers), 'linear', 'uniform', or one
    rate per depth unit. ``mode``: 'sample', 'skip', 'batch' or 'fixed_count' (see docs/guide/modes.md).
    ``batch_norm``: what a branch holding a BatchNorm does in modes 'skip' and 'fixed_count':
    'fallback' (default: every sample computed) or 'kept_rows' (the kept samples only; the BatchNorm's
    statistics then come from those samples, see :data:`BATCH_NORM_CHOICES`).
    ``verify``: True (eval outputs bitwise equal), a tolerance, or False (no check).
    ``include`` / ``exclude``: glob patterns (``fnmatch``, ``*`` may span dots) over block names
    (``blocks.3``, ``stages.1.blocks.0``). A branch is changed if its block matches an ``include``
    pattern (every block when there is none) and no ``exclude`` pattern. The schedule is computed over
    all blocks, so excluding some does not move the others' rates; excluded branches are listed in
    ``Report.left_alone`` and keep whatever drop path their library built into them.
    """

    rate: float | None = None
    schedule: ScheduleName | tuple[float, ...] = "auto"
    mode: Mode = "sample"
    verify: bool | float = True
    include: tuple[str, ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())
    batch_norm: BatchNormChoice = "fallback"

    def __post_init__(self) -> None:
        rate = validate_rate(self.rate) if self.rate is not None else None
        schedule: ScheduleName | list[float] | tuple[float, ...] = validate_schedule(self.schedule, rate)
        if isinstance(schedule, list):
            schedule = tuple(schedule)
        verify: bool | float
        if isinstance(self.verify, bool):
            verify = self.verify
        else:
            tolerance = validate_tolerance(self.verify)
            verify = False if tolerance is None else tolerance
        for name, value in (
            ("rate", rate),
            ("schedule", schedule),
            ("mode", validate_mode(self.mode)),
            ("verify", verify),
            ("include", _globs(self.include, "include")),
            ("exclude", _globs(self.exclude, "exclude")),
            ("batch_norm", validate_batch_norm(self.batch_norm)),
        ):
            object.__setattr__(self, name, value)

    @property
    def tolerance(self) -> float | None:
        """The eval check's absolute tolerance; None when there is no check."""
        return validate_tolerance(self.verify)

    @property
    def schedule_argument(self) -> ScheduleName | list[float]:
        """The schedule in the form the planner takes (a list, not a tuple)."""
        return list(self.schedule) if isinstance(self.schedule, tuple) else self.schedule

    def selects(self, block: str) -> bool:
        """Whether the branches of ``block`` are changed (see the class docstring)."""
        return selected(block, self.include, self.exclude)

    def replace(self, **changes: Any) -> DropPathConfig:
        """A copy with some fields changed (and checked again)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return DropPathConfig(**{**values, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what a saved checkpoint's manifest holds)."""
        return {
            "rate": self.rate,
            "schedule": self.schedule_argument,
            "mode": self.mode,
            "verify": self.verify,
            "include": list(self.include),
            "exclude": list(self.exclude),
            **({"batch_norm": self.batch_norm} if self.batch_norm != "fallback" else {}),  # format 2 as before
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DropPathConfig:
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**values)


def config_from_arguments(
    rate: DropPathConfig | float | None, given: dict[str, Any], defaults: dict[str, Any]
) -> DropPathConfig:
    """The config of a call that takes either a :class:`DropPathConfig` or the same settings as keywords.

    ``given``: the keyword settings the caller passed explicitly; ``defaults``: the rest.
    """
    if isinstance(rate, DropPathConfig):
        if given:
            raise PathSurgeonError(
                f"pass either a DropPathConfig or {', '.join(sorted(given))}=..., not both; "
                "put every setting in the config (config.replace(...) makes a changed copy)"
            )
        return rate
    return DropPathConfig(rate, **{**defaults, **given})
