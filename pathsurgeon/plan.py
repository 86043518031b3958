"""Plan: which depth unit each block belongs to, the rate of every unit under a schedule, and the
:class:`~pathsurgeon.report.Branch` each chosen residual add becomes.

Per-family rules live in ``recipes/*.toml`` (data, not code); see ``recipes/timm.toml`` for the format.
They are the fallback: ``schedule="auto"`` first asks the model's library (:mod:`pathsurgeon.rates`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import validate_schedule
from .errors import InvalidScheduleError
from .finder import ResidualAdd
from .report import Branch
from .tables import table

__all__ = ["Plan", "Recipe", "batch_axis", "make_branch", "make_plan", "recipe_for", "schedule_rates"]

_FORMULAS = ("linear", "linear_open", "uniform")


@dataclass(frozen=True)
class Recipe:
    """How a model family spreads a rate over depth (see recipes/timm.toml)."""

    schedule: str = "linear"
    unit: str | None = None
    unit_type: str | None = None
    zero: tuple[str, ...] = ()
    counted_zero: tuple[str, ...] = ()
    entry: bool = False  # the family has its own entry in the recipe file (not just the defaults)


@dataclass
class Plan:
    """Depth units in execution order, their rates, and which unit each block belongs to."""

    units: list[str]
    rates: list[float]
    unit_of_block: dict[str, str]
    zero_blocks: set[str] = field(default_factory=set)
    schedule: str | list[float] = "auto"
    formula: str = "linear"

    def index_of(self, block: str) -> int:
        unit = self.unit_of_block.get(block)
        return self.units.index(unit) if unit in self.units else -1

    def rate_of(self, block: str) -> float:
        if block in self.zero_blocks:
            return 0.0
        return self.rates[self.index_of(block)]


def recipe_for(model: nn.Module) -> Recipe:
    """The recipe of the library and family ``model``'s class comes from (defaults when unknown)."""
    module = type(model).__module__
    library = module.split(".")[0]
    family = module.split(".")[-1] if library in ("timm", "transformers", "torchvision") else None
    data = table(library) if family else {}
    entry = {**data.get("default", {}), **data.get("family", {}).get(family or "", {})}
    schedule = entry.get("schedule", "linear")
    if schedule not in _FORMULAS:  # a broken recipe file is our bug, say where
        raise RuntimeError(f"recipes/{library}.toml: family {family!r} has unknown schedule {schedule!r}")
    return Recipe(
        schedule=schedule,
        unit=entry.get("unit"),
        unit_type=entry.get("unit_type"),
        zero=tuple(entry.get("zero", ())),
        counted_zero=tuple(entry.get("counted_zero", ())),
        entry=bool(family) and family in data.get("family", {}),
    )


def _matches(name: str, pattern: str) -> bool:
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts, strict=True)
    )


def _enclosing(name: str, pattern: str) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if _matches(candidate, pattern):
            return candidate
    return None


def _enclosing_in(name: str, names: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in names:
            return candidate
    return None


def schedule_rates(formula: str, rate: float, count: int) -> list[float]:
    """Rates of ``count`` units under a formula, computed as timm computes them (float32 linspace)."""
    if count == 0:
        return []
    if formula == "linear":
        return [x.item() for x in torch.linspace(0, rate, count, device="cpu")]
    if formula == "linear_open":
        return [rate * i / count for i in range(count)]
    return [rate] * count


def make_plan(
    model: nn.Module,
    blocks: Sequence[str],
    rate: float | None,
    schedule: str | Sequence[float],
    recipe: Recipe,
) -> Plan:
    """Group ``blocks`` (in execution order) into depth units and give every unit its rate."""
    zero_blocks = {b for b in blocks if any(_enclosing(b, z) for z in recipe.zero)}
    counted = [b for b in blocks if b not in zero_blocks]
    counted_zero = {b for b in counted if any(_enclosing(b, z) for z in recipe.counted_zero)}
    unit_of_block: dict[str, str] = {}
    if recipe.unit or recipe.unit_type:
        units = [
            name
            for name, module in model.named_modules()
            if (recipe.unit and _matches(name, recipe.unit)) or type(module).__name__ == recipe.unit_type
        ]
        unit_set = set(units)
        for block in counted:
            unit_of_block[block] = _enclosing_in(block, unit_set) or block
        units += [u for u in dict.fromkeys(unit_of_block.values()) if u not in unit_set]
    else:
        units = list(dict.fromkeys(counted))
        unit_of_block = {b: b for b in counted}

    schedule = validate_schedule(schedule, rate)
    if isinstance(schedule, str):
        formula = recipe.schedule if schedule == "auto" else schedule
        assert rate is not None  # validate_schedule refuses a named schedule without a rate
        rates = schedule_rates(formula, rate, len(units))
    else:
        if len(schedule) != len(units):
            shown = ", ".join(units[:3]) + (", ..." if len(units) > 3 else "")
            raise InvalidScheduleError(
                f"schedule has {len(schedule)} rates but the model has {len(units)} depth units ({shown}); "
                f"pass {len(units)} rates (pathsurgeon.find(model) lists the units)"
            )
        rates, formula = list(schedule), "explicit"
    if schedule == "auto":  # blocks the library always builds at 0, though they take a place in the count
        always_zero = [any(_enclosing(u, z) for z in recipe.counted_zero) for u in units]
        rates = [0.0 if zero else r for zero, r in zip(always_zero, rates, strict=True)]
        zero_blocks |= counted_zero
    return Plan(units, rates, unit_of_block, zero_blocks, schedule, formula)


def batch_axis(shape: torch.Size | None, batch: int | None) -> int:
    """The axis of ``shape`` that holds the batch: 0, unless exactly one other axis has the batch's size."""
    if shape is None or batch is None:
        return 0
    if len(shape) and shape[0] == batch:
        return 0
    matches = [axis for axis, size in enumerate(shape) if size == batch]
    return matches[0] if len(matches) == 1 else 0


def make_branch(
    residual: ResidualAdd, plan: Plan, rate: float, output_shapes: dict[str, torch.Size], batch: int | None
) -> Branch:
    """The :class:`Branch` a chosen residual add becomes, at ``rate``.

    A slot's drop path masks rows of axis 0, as the module it replaces does (timm, torchvision and HF
    alike), even where the rows are windows of a sample (HF RF-DETR, timm SAM ViT). A hooked module's
    output has its batch axis where the example batch shows it (``output_shapes``, from one forward).
    """
    if residual.slot is not None:
        mechanism, target, axis = "slot", residual.slot, 0
    else:
        assert residual.producer is not None  # select() leaves alone the adds with no module to hook
        mechanism, target = "hook", residual.producer
        axis = batch_axis(output_shapes.get(residual.producer), batch)
    return Branch(residual.block, plan.index_of(residual.block), rate, mechanism, target, axis,
                  plan.unit_of_block.get(residual.block))
