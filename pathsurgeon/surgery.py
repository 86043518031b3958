"""The public API: :func:`find`, :func:`preview`, :func:`add`, :func:`set_rate`, :func:`strip`.

:func:`add` reads top to bottom as the pipeline it runs:

1. **validate** every argument (:mod:`pathsurgeon.config`) and the model itself;
2. **discover**: capture a graph of the model and find its residual branches (:mod:`pathsurgeon.capture`,
   :mod:`pathsurgeon.finder`); the model is only read;
3. **observe**: one eval forward of the untouched model — the reference outputs, and the shapes and
   block inputs planning needs (:mod:`pathsurgeon.verify`);
4. **plan** the rate of every branch (:mod:`pathsurgeon.plan`, :mod:`pathsurgeon.rates`) and, in modes
   'skip' and 'batch', each branch's way in (:mod:`pathsurgeon.skipping`);
5. **apply** the changes inside one transaction (:mod:`pathsurgeon.changes`), the record first;
6. **verify** the eval outputs against the reference, and check the skipping branches;
7. **record** what was done; any failure before this point undoes everything.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import slots as slot_lib
from .capture import Capture, capture
from .changes import (
    RECORD_ATTRIBUTE,
    Record,
    Transaction,
    build_changes,
    record_of,
    refuse_existing_surgery,
    silencing_changes,
    surgered_submodules,
    unrecorded_changes,
)
from .config import DropPathConfig, config_from_arguments, validate_rate, validate_schedule
from .errors import NoBranchesError, PathSurgeonError
from .finder import Selection, find_residual_adds, select
from .inputs import ExampleInputs, example_inputs
from .plan import make_branch, make_plan, recipe_for
from .rates import LibraryRates, library_rates, rates_for
from .report import Branch, Fallback, LeftAlone, Preview, Report
from .skipping import assign_entries, check_gathers
from .verify import Observation, eval_outputs, max_abs_diff, observe, verification_error
from .wrappers import check_model, check_not_sharded

__all__ = ["add", "find", "is_surgered", "preview", "set_rate", "strip"]

_UNSET: Any = object()
_DEFAULTS = {"schedule": "auto", "mode": "sample", "verify": True}


def add(
    model: nn.Module,
    rate: float | DropPathConfig | None = None,
    *,
    schedule: str | Sequence[float] = _UNSET,
    mode: str = _UNSET,
    verify: bool | float = _UNSET,
    example_inputs: Any = None,
) -> Report:
    """Put DropPath (stochastic depth) on every residual branch of ``model``, in place.

    Takes a :class:`~pathsurgeon.DropPathConfig` or the same settings as keywords (defaults:
    ``schedule="auto"``, ``mode="sample"``, ``verify=True``). ``schedule``: 'auto' (what the model's
    library does; timm: exactly what ``create_model(name, drop_path_rate=rate)`` gives), 'linear'
    (0 → rate over depth units), 'uniform', or a list with one rate per depth unit (then
    ``rate=None``). ``mode``: 'sample' (timm's per-sample drop path, the same code path and random
    numbers), 'skip' (per-sample, but dropped samples are not computed) or 'batch' (one draw per branch
    per mini-batch; a dropped branch is not computed). ``verify``: compare eval outputs before and after
    on ``example_inputs`` (made from the model's config when not given), each run from the same fixed
    RNG state: True demands bitwise equality, a float is an absolute tolerance, False skips the check.
    On any failure, an interrupt included, the model is left exactly as it was; the caller's RNG state
    is never changed.
    """
    given = {k: v for k, v in (("schedule", schedule), ("mode", mode), ("verify", verify)) if v is not _UNSET}
    config = config_from_arguments(rate, given, _DEFAULTS)
    check_model(model)
    check_not_sharded(model)
    refuse_existing_surgery(model)
    _refuse_meta_device(model, config)
    clock = _Clock()

    with clock("capture"):
        inputs = _inputs(model, example_inputs, required=config.tolerance is not None or config.mode != "sample")
        captured = capture(model, inputs)
    with clock("find"):
        selection = select(captured.view, find_residual_adds(captured.view))
        if not selection.chosen:
            raise _no_branches(model, selection.left_alone)
    with clock("observe"):
        observation = _observe(model, inputs, selection, config, given_inputs=example_inputs is not None)
    with clock("plan"):
        planned = _plan(model, captured, selection, config, observation)

    record = Record(config, [], planned.branches, selection.blocks, captured.method, config.rate,
                    planned.schedule, rates_from=planned.rates.rates_from, library=planned.rates.library,
                    library_asked=planned.rates.library_asked)
    difference = None
    with Transaction() as transaction:
        # the record is the first change, so that an interrupt at any later point is undone with the rest
        transaction.do(functools.partial(vars(model).__setitem__, RECORD_ATTRIBUTE, record),
                       functools.partial(vars(model).pop, RECORD_ATTRIBUTE, None))
        with clock("apply"):
            for change in build_changes(model, planned.branches) + silencing_changes(
                model, list(captured.view.slot_calls.values()), planned.branches, planned.left_alone
            ):
                record.changes.append(change)
                transaction.do(change.install, change.undo)
        if observation is not None and config.tolerance is not None:
            with clock("verify"):
                difference = max_abs_diff(observation.outputs, eval_outputs(model, observation.inputs))
                if not difference <= config.tolerance:
                    raise verification_error(model, record.changes, observation.outputs, observation.inputs,
                                             config.tolerance, difference)
        with clock("skip checks"):
            reasons = dict(planned.reasons)  # target -> why that branch computes every sample
            gathered = [c for c in record.changes if c.gathers]
            if gathered:
                failed = check_gathers(model, gathered, observation.block_inputs, observation.batch)
                for change, reason in failed.items():
                    change.remove_gathers()
                    change.gathers = []
                    if config.mode == "skip":
                        change.drop.mode = "sample"
                    reasons[change.target] = reason
        record.branches = [
            dataclasses.replace(b, entry=None, mode="sample" if config.mode == "skip" else config.mode)
            if b.target in reasons else b
            for b in planned.branches
        ]
        record.fallbacks = list(dict.fromkeys(
            Fallback(b.block, b.target, reasons[b.target]) for b in planned.branches if b.target in reasons
        ))
    return Report(record.branches, difference, captured.method, planned.schedule, planned.formula,
                  planned.left_alone, config.mode, record.fallbacks, planned.rates.rates_from, planned.rates.note,
                  clock.seconds)


def find(model: nn.Module, example_inputs: Any = None) -> list[Branch]:
    """The residual branches stochastic depth would go on, with the rates the model has now.

    Changes nothing. ``example_inputs`` is only needed for models torch.fx cannot trace (and gives
    hooked branches their batch axis).
    """
    check_model(model)
    record = record_of(model)
    if record is not None:
        return list(record.branches)
    captured, selection, inputs = _discover(model, example_inputs)
    if not selection.chosen:
        return []
    plan = make_plan(model, selection.blocks, 0.0, "auto", recipe_for(model))
    shapes = _hook_shapes(model, inputs, selection)
    batch = inputs.batch_size if inputs is not None else None
    return [
        make_branch(a, plan, slot_lib.existing_rate(_module_or_none(model, a.slot)) if a.slot else 0.0, shapes, batch)
        for a in selection.chosen
    ]


def preview(
    model: nn.Module, rate: float | None, *, schedule: str | Sequence[float] = "auto", example_inputs: Any = None
) -> Preview:
    """The branches with the rates :func:`add` would give them (with ``rates_from``); changes nothing."""
    check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    schedule = validate_schedule(schedule, rate)
    captured, selection, inputs = _discover(model, example_inputs)
    if not selection.chosen:
        raise _no_branches(model, selection.left_alone)
    recipe = recipe_for(model)
    plan = make_plan(model, selection.blocks, rate, schedule, recipe)
    rates = rates_for(model, list(captured.view.slot_calls.values()), selection.chosen, plan, rate, schedule, recipe)
    shapes = _hook_shapes(model, inputs, selection)
    batch = inputs.batch_size if inputs is not None else None
    branches = [make_branch(a, plan, r, shapes, batch) for a, r in zip(selection.chosen, rates.values, strict=True)]
    return Preview(branches, rates.rates_from, rates.note)


def set_rate(model: nn.Module, rate: float | None, *, schedule: str | Sequence[float] = "auto") -> list[Branch]:
    """Re-rate a model surgered by :func:`add` (in place); returns the branches with their new rates.

    Cheap enough to call every training step (:class:`~pathsurgeon.RateScheduler` does): with
    ``schedule="auto"`` the library's rates come from laws fitted once, with no rebuild per call.
    """
    check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    schedule = validate_schedule(schedule, rate)
    record = record_of(model)
    if record is None:
        inner = surgered_submodules(model)
        where = f"; its submodule {inner[0]!r} is: call set_rate on model.{inner[0]}" if inner else ""
        raise PathSurgeonError(
            f"model carries no pathsurgeon DropPath{where or '; call pathsurgeon.add(model, rate) first'}"
        )
    plan = make_plan(model, record.blocks, rate, schedule, recipe_for(model))
    library = _record_library(model, record, rate) if schedule == "auto" else None
    if library is not None:  # the library's own numbers, from fitted rate laws: no rebuild per call
        by_slot = library(rate)
        new_rates = [0.0 if change.silenced else by_slot[change.target] for change in record.changes]
        branches = [dataclasses.replace(b, rate=by_slot[b.target]) for b in record.branches]
    else:
        new_rates = [0.0 if change.silenced else plan.rate_of(change.block) for change in record.changes]
        branches = [dataclasses.replace(b, rate=plan.rate_of(b.block)) for b in record.branches]
    with Transaction() as transaction:
        for change, new in zip(record.changes, new_rates, strict=True):
            transaction.do(functools.partial(setattr, change.drop, "rate", new),
                           functools.partial(setattr, change.drop, "rate", change.drop.rate))
        saved = (record.branches, record.rate, record.schedule)
        transaction.do(functools.partial(_set_record_rates, record, branches, rate, plan.schedule),
                       functools.partial(_set_record_rates, record, *saved))
    return branches


def strip(model: nn.Module) -> nn.Module:
    """Undo :func:`add` in place: every slot and hook back as it was. A no-op on an untouched model.

    Surgery applied to a submodule (``add(model.backbone, ...)``, or a model later wrapped in another
    module) is undone too, so that nothing of pathsurgeon is left anywhere in the tree.
    """
    check_model(model)
    with Transaction() as transaction:
        for name in surgered_submodules(model, include_root=True):
            owner = model.get_submodule(name)
            record = record_of(owner)
            for change in reversed(record.changes):
                transaction.do(change.undo, change.install)
            transaction.do(functools.partial(vars(owner).pop, RECORD_ATTRIBUTE),
                           functools.partial(vars(owner).__setitem__, RECORD_ATTRIBUTE, record))
        for change in unrecorded_changes(model):  # their record stayed on a wrapper (PEFT's merge_and_unload)
            transaction.do(change.undo, change.install)
    return model


def is_surgered(model: nn.Module) -> bool:
    """True while ``model``, or any module inside it, carries pathsurgeon's changes (with or without the
    record: a tree taken out of the surgered model, as PEFT's ``merge_and_unload()`` returns it, counts)."""
    return bool(surgered_submodules(model, include_root=True)) or bool(unrecorded_changes(model))


# --- the stages of add -------------------------------------------------------------------------------


class _Clock:
    """Seconds spent per stage, for :attr:`Report.timings` (and ``benchmarks/add_time.py``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _discover(model: nn.Module, given_inputs: Any) -> tuple[Capture, Selection, ExampleInputs | None]:
    check_not_sharded(model)
    inputs = _inputs(model, given_inputs, required=False)
    captured = capture(model, inputs)
    return captured, select(captured.view, find_residual_adds(captured.view)), inputs


@dataclass
class _Observed(Observation):
    inputs: ExampleInputs | None = None  # what the reference outputs were computed on


def _observe(
    model: nn.Module, inputs: ExampleInputs | None, selection: Selection, config: DropPathConfig, given_inputs: bool
) -> _Observed | None:
    """The one eval forward of the untouched model, where anything needs it (else None).

    Needed for the eval check (the reference outputs), for hooked branches (their batch axis) and for
    modes 'skip' and 'batch' (the block inputs their check re-runs). Made-up inputs are cut to one
    sample when only the check needs them: every op in eval mode treats samples alike, and the
    surgery's modules are the identity there, so one sample shows any change the full batch would.
    """
    hooks = {a.producer for a in selection.chosen if a.slot is None}
    skipping = config.mode != "sample"
    if inputs is None or (config.tolerance is None and not hooks and not skipping):
        return None
    if not (hooks or skipping or given_inputs):
        inputs = inputs.first_samples(1)
    blocks = selection.blocks if skipping else ()
    observed = observe(model, inputs, shapes_of=hooks, inputs_of=blocks)
    return _Observed(observed.outputs, observed.output_shapes, observed.block_inputs, observed.batch, inputs)


@dataclass
class _Planned:
    branches: list[Branch]  # the branches to change (those config selects)
    left_alone: list[LeftAlone]
    reasons: dict[str, str]  # target -> why that branch computes every sample (modes 'skip' and 'batch')
    rates: Any  # rates.BranchRates
    schedule: str | list[float]
    formula: str


def _plan(
    model: nn.Module, captured: Capture, selection: Selection, config: DropPathConfig, observation: _Observed | None
) -> _Planned:
    """Rates over every chosen block (so that excluding blocks moves no other rate), then the branches
    the config selects, with their way in for modes 'skip' and 'batch'."""
    recipe = recipe_for(model)
    plan = make_plan(model, selection.blocks, config.rate, config.schedule_argument, recipe)
    rates = rates_for(model, list(captured.view.slot_calls.values()), selection.chosen, plan, config.rate,
                      config.schedule_argument, recipe)
    left_alone = list(selection.left_alone)
    left_alone += [
        LeftAlone(slot.rpartition(".")[0], f"the library drops {slot} (rate {value:.4g}) off any residual branch; "
                                           "left alone")
        for slot, value in rates.left_alone
        if not any(f"slot {slot} " in k.reason for k in left_alone)  # already listed as off the branch
    ]
    shapes = observation.output_shapes if observation is not None else {}
    batch = observation.batch if observation is not None else None
    chosen, branches = [], []
    for residual, rate in zip(selection.chosen, rates.values, strict=True):
        if config.selects(residual.block):
            chosen.append(residual)
            branches.append(make_branch(residual, plan, rate, shapes, batch))
        elif not any(k.block == residual.block and "excluded" in k.reason for k in left_alone):
            left_alone.append(LeftAlone(residual.block, "excluded by the config's include / exclude patterns"))
    if not branches:
        raise PathSurgeonError(
            f"the config's include {list(config.include)} / exclude {list(config.exclude)} patterns leave none of "
            f"the {len(selection.blocks)} blocks with branches (e.g. {selection.blocks[0]!r}); "
            "check the patterns against pathsurgeon.find(model)"
        )
    reasons: dict[str, str] = {}
    if config.mode != "sample":
        branches = assign_entries(model, branches, chosen, captured.view, config.mode, reasons)
    formula = "library" if rates.library is not None else plan.formula
    return _Planned(branches, left_alone, reasons, rates, plan.schedule, formula)


# --- helpers ------------------------------------------------------------------------------------------


def _refuse_meta_device(model: nn.Module, config: DropPathConfig) -> None:
    on_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    if not on_meta:
        return
    if config.tolerance is not None:
        raise PathSurgeonError(
            f"{type(model).__name__} is on the meta device (no weights), so its eval outputs cannot be checked; "
            "pass verify=False, or load the weights first (model.to_empty(device='cpu'), then load_state_dict)"
        )
    if config.mode != "sample":
        raise PathSurgeonError(
            f"mode {config.mode!r} checks each branch on real numbers, but {type(model).__name__} is on the meta "
            "device; use mode='sample' there, or load the weights first"
        )


def _no_branches(model: nn.Module, left_alone: Sequence[LeftAlone] = ()) -> NoBranchesError:
    if left_alone:  # residual adds were found, but none is one the model's library drops
        first = left_alone[0]
        return NoBranchesError(
            f"found {len(left_alone)} residual adds in {type(model).__name__} and left every one alone "
            f"({first.block}: {first.reason}); if they are residual branches, report the model to pathsurgeon"
        )
    return NoBranchesError(
        f"found no residual branch in {type(model).__name__} (no add of a shortcut and a parameterised "
        "branch); pathsurgeon needs a residual network such as a ViT, ResNet or ConvNeXt"
    )


def _inputs(model: nn.Module, given: Any, *, required: bool) -> ExampleInputs | None:
    """The example inputs: the user's, or made from the model's config (None where that is impossible
    and nothing requires them)."""
    if given is not None or required:
        return example_inputs(model, given)
    try:
        return example_inputs(model, None)
    except PathSurgeonError:
        return None


def _hook_shapes(model: nn.Module, inputs: ExampleInputs | None, selection: Selection) -> dict[str, Any]:
    """Output shapes of the modules hooks would go on, from one eval forward (none needed for slots)."""
    hooks = {a.producer for a in selection.chosen if a.slot is None}
    if not hooks or inputs is None:
        return {}
    return observe(model, inputs, shapes_of=hooks).output_shapes


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a None slot
        return None


def _set_record_rates(record: Record, branches: list[Branch], rate: float | None, schedule) -> None:
    record.branches, record.rate, record.schedule = branches, rate, schedule


def _record_library(model: nn.Module, record: Record, rate: float) -> LibraryRates | None:
    """The library rates of a surgered model's slots; asked on the first ``auto`` re-rate if add did not."""
    if not record.library_asked:
        slots = [change.target for change in record.changes if change.hooked is None]
        if len(slots) == len(record.changes):
            record.library = library_rates(model, rate, slots).rates
        record.library_asked = True
    return record.library
