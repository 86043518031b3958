"""The public API: :func:`find`, :func:`preview`, :func:`add`, :func:`set_rate`, :func:`strip`.

:func:`add` reads top to bottom as the pipeline it runs:

1. **validate** every argument (:mod:`pathsurgeon.config`) and the model itself;
2. **discover**: capture a graph of the model, find its residual branches (:mod:`pathsurgeon.capture`,
   :mod:`pathsurgeon.finder`) and the library models inside it, its parts (:mod:`pathsurgeon.parts`);
   each part's branches are selected as if it were the whole model; the model is only read;
3. **observe**: one eval forward of the untouched model — the reference outputs, and the shapes and
   block inputs planning needs (:mod:`pathsurgeon.verify`);
4. **plan** the rate of every branch, part by part, each with its own schedule and its own library's
   rates (:mod:`pathsurgeon.parts`, :mod:`pathsurgeon.plan`, :mod:`pathsurgeon.rates`) and, in modes
   'skip' and 'batch', each branch's way in (:mod:`pathsurgeon.skipping`);
5. **apply** the changes inside one transaction (:mod:`pathsurgeon.changes`), the record first;
6. **verify** the eval outputs against the reference, and check the skipping branches;
7. **record** what was done; any failure before this point undoes everything.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from . import slots as slot_lib
from .capture import Capture, capture
from .changes import (
    RECORD_ATTRIBUTE,
    Change,
    Record,
    Transaction,
    build_changes,
    record_of,
    refuse_existing_surgery,
    silenced_left_alone,
    silencing_changes,
    surgered_submodules,
    unrecorded_changes,
)
from .composite_inputs import composite_inputs, detection_image_size
from .config import (
    DropPathConfig,
    Mode,
    ScheduleName,
    config_from_arguments,
    matches,
    validate_rate,
    validate_schedule,
)
from .errors import (
    CaptureError,
    ExampleInputsError,
    InvalidScheduleError,
    NoBranchesError,
    PathSurgeonError,
    VerificationError,
    warn_user,
)
from .finder import find_residual_adds
from .inputs import EXAMPLE_BATCH, ExampleInputs, example_inputs, made_up_inputs_failed, placement
from .parts import (
    PartPlan,
    PartSelection,
    PartState,
    capturable_parts,
    detection_bodies,
    library_parts,
    part_module,
    part_of,
    part_recipe,
    plan_parts,
    prefixed,
    relative,
    select_by_part,
    split_units,
    surgered_part_by_part,
    unreached_modules,
)
from .plan import make_branch, make_plan
from .report import Branch, Fallback, LeftAlone, PartReport, Preview, Report
from .runstate import serialised
from .skipping import GatheredChange, assign_entries, check_gathers
from .verify import Observation, eval_outputs, max_abs_diff, observe, verification_error
from .wrappers import check_model, check_not_sharded

__all__ = ["add", "find", "is_surgered", "preview", "set_rate", "strip"]

log = logging.getLogger(__name__)  # progress and decisions; warnings stay for what the user must act on

_UNSET: Any = object()
_DEFAULTS = {"schedule": "auto", "mode": "sample", "verify": True}


@serialised
def add(
    model: nn.Module,
    rate: float | DropPathConfig | None = None,
    *,
    schedule: ScheduleName | Sequence[float] = _UNSET,
    mode: Mode = _UNSET,
    verify: bool | float = _UNSET,
    example_inputs: Any = None,
) -> Report:
    """Put DropPath (stochastic depth) on every residual branch of ``model``, in place.

    Takes a :class:`~pathsurgeon.DropPathConfig` or the same settings as keywords (defaults:
    ``schedule="auto"``, ``mode="sample"``, ``verify=True``). ``schedule``: 'auto' (what the model's
    library does; timm: exactly what ``create_model(name, drop_path_rate=rate)`` gives), 'linear'
    (0 → rate over depth units), 'uniform', or a list with one rate per depth unit (then
    ``rate=None``). ``mode``: 'sample' (timm's per-sample drop path, the same code path and random
    numbers), 'skip' (per-sample, but dropped samples are not computed), 'batch' (one draw per branch
    per mini-batch; a dropped branch is not computed, BatchNorms included) or 'fixed_count' (DINOv2's
    efficient stochastic depth: exactly ``max(int(B * (1 - rate)), 1)`` samples computed, scaled by B/k).
    ``verify``: compare eval outputs before and after on ``example_inputs`` (made from the model's config
    when not given), each run from the same fixed RNG state: True demands bitwise equality, a float is an
    absolute tolerance, False skips the check.
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
        try:
            captured, inputs = _capture(model, inputs, example_inputs)
        except CaptureError as error:
            held = _parts_instead(model, error)
            return _add_to_parts(model, config, inputs, held, error, clock)
    with clock("find"):
        selection = select_by_part(captured.view, find_residual_adds(captured.view), library_parts(model),
                                   config.include, config.exclude, type(model).__name__)
        selection.selection.left_alone += _unreached(model, captured)
        if not selection.chosen:
            raise _no_branches(model, selection.left_alone)
    with clock("observe"):
        observation = _with_made_up_inputs(
            model, inputs, example_inputs,
            lambda: _observe(model, inputs, selection, config, given_inputs=example_inputs is not None),
        )
    with clock("plan"):
        planned = _plan(model, captured, selection, config, observation)
        _refuse_zero_rates(model, config.rate, config.schedule_argument, planned.part_plans,
                           [b.rate for b in planned.branches])
    _warn_unmatched_patterns(config, [*selection.blocks, *(k.block for k in selection.left_alone)])

    record = Record(config, [], planned.branches, selection.blocks, captured.method, config.rate,
                    planned.schedule, rates_from=planned.rates_from,
                    parts=[PartState.of(p) for p in planned.part_plans], inputs_given=example_inputs is not None)
    record.bind(model)  # a copy.copy of the model shares the record, and is refused where it would use it
    difference = None
    with Transaction() as transaction:
        # the record is the first change, so that an interrupt at any later point is undone with the rest
        transaction.do(functools.partial(vars(model).__setitem__, RECORD_ATTRIBUTE, record),
                       functools.partial(vars(model).pop, RECORD_ATTRIBUTE, None))
        with clock("apply"):
            silenced = silencing_changes(model, _hooked_parts_slots(captured, planned), planned.branches)
            planned.left_alone.extend(silenced_left_alone(silenced))
            for change in build_changes(model, planned.branches, planned.norms) + silenced:
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
            gathered: list[GatheredChange] = [c for c in record.changes if c.gathers]
            if gathered:
                assert inputs is not None  # only modes other than 'sample' gather, and they require inputs
                seen = observation is not None and observation.batch == inputs.batch_size
                blocks = observation.block_inputs if seen else None
                # check_gathers hands back the very changes it was given, typed by the protocol it reads
                failed = cast(dict[Change, str], check_gathers(model, gathered, inputs, blocks or None))
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
    report = Report(
        branches=record.branches, max_abs_diff=difference, method=captured.method, schedule=planned.schedule,
        formula=planned.formula, left_alone=planned.left_alone, mode=config.mode, fallbacks=record.fallbacks,
        rates_from=planned.rates_from, rates_note=planned.rates_note, timings=clock.seconds,
        parts=_part_reports(planned.part_plans, record.branches, selection),
    )
    _log_added(model, report)
    return report


@serialised
def find(model: nn.Module, example_inputs: Any = None) -> list[Branch]:
    """The residual branches stochastic depth would go on, with the rates the model has now.

    Changes nothing. ``example_inputs`` is only needed for models torch.fx cannot trace (and gives
    hooked branches their batch axis).
    """
    check_model(model)
    record = record_of(model)
    if record is not None:
        return list(record.branches)
    try:
        captured, selection, inputs = _discover(model, example_inputs)
    except CaptureError as error:
        held = _parts_instead(model, error)
        # a detector: its parts, as add treats them (surgered: their records)
        side = detection_image_size(model, padded=True)
        return [b for path in held for b in _inside(path, find(model.get_submodule(path),
                                                              _part_inputs(model.get_submodule(path), side)))]
    if not selection.chosen:
        return []
    shapes = _hook_shapes(model, inputs, selection, made_up=example_inputs is None)
    batch = inputs.batch_size if inputs is not None else None
    branches = []
    for part, chosen in selection.groups:
        module = part_module(model, part)
        blocks = list(dict.fromkeys(relative(a.block, part.path) for a in chosen))
        plan = prefixed(make_plan(module, blocks, 0.0, "auto", part_recipe(model, part)), part.path)
        branches += [
            dataclasses.replace(make_branch(
                a, plan, slot_lib.existing_rate(_module_or_none(model, a.slot)) if a.slot else 0.0, shapes, batch
            ), part=part.path)
            for a in chosen
        ]
    return _in_execution_order(branches, selection)


@serialised
def preview(
    model: nn.Module, rate: float | None, *, schedule: ScheduleName | Sequence[float] = "auto",
    example_inputs: Any = None,
) -> Preview:
    """The branches with the rates :func:`add` would give them (with ``rates_from``); changes nothing."""
    check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    schedule = validate_schedule(schedule, rate)
    try:
        captured, selection, inputs = _discover(model, example_inputs)
    except CaptureError as error:
        return _preview_parts(model, rate, schedule, _parts_instead(model, error))
    if not selection.chosen:
        raise _no_branches(model, selection.left_alone)
    part_plans = plan_parts(model, selection, list(captured.view.slot_calls.values()), rate, schedule)
    shapes = _hook_shapes(model, inputs, selection, made_up=example_inputs is None)
    batch = inputs.batch_size if inputs is not None else None
    branches = _in_execution_order([
        dataclasses.replace(make_branch(a, planned.plan, r, shapes, batch), part=planned.part.path)
        for planned in part_plans for a, r in zip(planned.chosen, planned.rates.values, strict=True)
    ], selection)
    _refuse_zero_rates(model, rate, schedule, part_plans, [b.rate for b in branches])
    rates_from, note = _rates_summary(part_plans)
    return Preview(branches, rates_from=rates_from, rates_note=note,
                   parts=_part_reports(part_plans, branches, selection))


@serialised
def set_rate(
    model: nn.Module, rate: float | None, *, schedule: ScheduleName | Sequence[float] = "auto"
) -> list[Branch]:
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
        if surgered_part_by_part(model, inner):  # a detector: add surgered its parts, each on its own
            if not isinstance(schedule, str) and len(inner) > 1:
                raise InvalidScheduleError(
                    f"a list schedule cannot be split over the parts {', '.join(inner)} add surgered one by one; "
                    "call set_rate on each part (model.<part>) with its own list"
                )
            return [b for path in inner for b in _inside(path, set_rate(model.get_submodule(path), rate,
                                                                           schedule=schedule))]
        if not inner and (unrecorded := unrecorded_changes(model)):
            # a tree taken out of the model add was given: the rates are planned from the record there
            raise PathSurgeonError(
                f"model holds pathsurgeon's drop path on {len(unrecorded)} branches but not their record, which "
                "stayed on the model add was given (PEFT's merge_and_unload returns the model inside the "
                "PeftModel): call set_rate on the model add was given (it re-rates this tree too), or "
                "pathsurgeon.strip(model) then pathsurgeon.add(model, rate)"
            )
        where = f"; its submodule {inner[0]!r} is: call set_rate on model.{inner[0]}" if inner else ""
        raise PathSurgeonError(
            f"model carries no pathsurgeon DropPath{where or '; call pathsurgeon.add(model, rate) first'}"
        )
    states: list[PartState] = record.parts
    parts = [state.part for state in states]
    rate_of: dict[str, float] = {}  # target -> new rate, part by part, each with its own schedule
    for state, part_schedule in zip(states, split_units(states, schedule), strict=True):
        plan = state.plan(model, rate, part_schedule)
        mine = [c for c in record.changes if part_of(c.block, parts) is state.part]
        by_slot = None
        # the slot each change takes its library rate from: its own, or for a hook its block's (add found it)
        slot_of = {c.target: c.target if c.hooked is None else state.block_slots.get(c.block) for c in mine}
        if schedule == "auto" and None not in slot_of.values():
            # the library's own numbers, from fitted rate laws: no rebuild per call
            assert rate is not None  # state.plan refuses schedule 'auto' without a rate
            by_slot = state.library_rates(model, rate, cast(list[str], list(slot_of.values())))
        for change in mine:
            rate_of[change.target] = (by_slot[cast(str, slot_of[change.target])] if by_slot is not None
                                      else plan.rate_of(change.block))
    new_rates = [0.0 if change.silenced else rate_of[change.target] for change in record.changes]
    branches = [dataclasses.replace(b, rate=rate_of[b.target]) for b in record.branches]
    with Transaction() as transaction:
        for change, new in zip(record.changes, new_rates, strict=True):
            transaction.do(functools.partial(setattr, change.drop, "rate", new),
                           functools.partial(setattr, change.drop, "rate", change.drop.rate))
        saved = (record.branches, record.rate, record.schedule)
        # the whole schedule, every part's slice of a list (save writes it; load replays it over all parts)
        transaction.do(functools.partial(_set_record_rates, record, branches, rate, schedule),
                       functools.partial(_set_record_rates, record, *saved))
    log.debug("set_rate: %d branches of %s re-rated (rate %s, schedule %s)", len(branches), type(model).__name__,
              rate, schedule if isinstance(schedule, str) else f"a list of {len(schedule)}")
    return branches


@serialised
def strip(model: nn.Module) -> nn.Module:
    """Undo :func:`add` in place: every slot and hook back as it was. A no-op on an untouched model.

    Surgery applied to a submodule (``add(model.backbone, ...)``, or a model later wrapped in another
    module) is undone too, so that nothing of pathsurgeon is left anywhere in the tree.
    """
    check_model(model)
    stripped = 0
    with Transaction() as transaction:
        for name in surgered_submodules(model, include_root=True):
            owner = model.get_submodule(name)
            record = record_of(owner)
            assert record is not None  # surgered_submodules lists only modules holding a record
            for change in reversed(record.changes):
                transaction.do(change.undo, change.install)
                stripped += 1
            transaction.do(functools.partial(vars(owner).pop, RECORD_ATTRIBUTE),
                           functools.partial(vars(owner).__setitem__, RECORD_ATTRIBUTE, record))
        for change in unrecorded_changes(model):  # their record stayed on a wrapper (PEFT's merge_and_unload)
            transaction.do(change.undo, change.install)
            stripped += 1
    if stripped:
        log.info("stripped pathsurgeon's drop path from %s (%d changes undone)", type(model).__name__, stripped)
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


def _discover(model: nn.Module, given_inputs: Any) -> tuple[Capture, PartSelection, ExampleInputs | None]:
    check_not_sharded(model)
    inputs = _inputs(model, given_inputs, required=False)
    captured, inputs = _capture(model, inputs, given_inputs)
    selection = select_by_part(captured.view, find_residual_adds(captured.view), library_parts(model),
                               model_name=type(model).__name__)
    selection.selection.left_alone += _unreached(model, captured)
    return captured, selection, inputs


@dataclass
class _Observed(Observation):
    inputs: ExampleInputs | None = None  # what the reference outputs were computed on


def _observe(
    model: nn.Module, inputs: ExampleInputs | None, selection: PartSelection, config: DropPathConfig, given_inputs: bool
) -> _Observed | None:
    """The one eval forward of the untouched model, where anything needs it (else None).

    Needed for the eval check (the reference outputs) and for hooked branches (their batch axis).
    Made-up inputs are cut to one sample when only the eval check needs them: every op in eval mode
    treats samples alike, and the surgery's modules are the identity there, so one sample shows any
    change the full batch would. Where the forward sees the whole batch anyway, it also records the
    block inputs a block-by-block skip check would re-run (else that check records them itself).
    """
    hooks = {cast(str, a.producer) for a in selection.chosen if a.slot is None}  # select() chose each for it
    skipping = config.mode != "sample"
    if inputs is None or (config.tolerance is None and not hooks):
        return None
    if not (hooks or given_inputs):
        inputs = inputs.first_samples(1)
    blocks = selection.blocks if skipping and (inputs.batch_size or 0) >= 2 else ()  # else the check records them
    observed = observe(model, inputs, shapes_of=hooks, inputs_of=blocks)
    return _Observed(observed.outputs, observed.output_shapes, observed.block_inputs, observed.batch, inputs)


@dataclass
class _Planned:
    branches: list[Branch]  # the branches to change (those config selects)
    left_alone: list[LeftAlone]
    reasons: dict[str, str]  # target -> why that branch computes every sample (modes 'skip' and 'batch')
    part_plans: list[PartPlan]
    schedule: ScheduleName | list[float]
    formula: str
    rates_from: str
    rates_note: str
    norms: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # target -> its BatchNorms


def _refuse_zero_rates(model: nn.Module, rate: float | None, schedule: str | list[float],
                       part_plans: list[PartPlan], rates: list[float]) -> None:
    """An fx GraphModule whose residual adds all land in one depth unit (a traced model whose blocks were
    inlined, adds at the top of its graph) would get rate 0 on every branch from a linear schedule at a
    non-zero rate, and its library's rates are not known: refused rather than reported as a success."""
    if not rate or schedule not in ("auto", "linear") or not rates or any(rates):
        return
    if any(p.rates.library is not None or len(p.plan.units) > 1 for p in part_plans):
        return  # the library's own numbers, zeros included; or zeros a recipe keeps
    if not any(isinstance(m, fx.GraphModule) for m in model.modules()):
        return
    blocks = sorted({b or "(the model)" for p in part_plans for b in p.plan.unit_of_block})
    raise PathSurgeonError(
        f"all {len(rates)} residual branches of this fx GraphModule lie in one depth unit (blocks: "
        f"{', '.join(blocks[:3])}), so linear rates over depth give each 0 at rate {rate}, and no library's rates "
        "are known for it: add drop path before tracing, or pass schedule='uniform' or a list of rates"
    )


def _warn_unmatched_patterns(config: DropPathConfig, blocks: Sequence[str]) -> None:
    """Warn, naming the closest block names, about each include / exclude pattern that matches no block
    with a residual branch: a typo (``exclude=["block.0"]``) would otherwise silently change nothing."""
    names = list(dict.fromkeys(blocks))
    for argument, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if any(matches(name, [pattern]) for name in names):
                continue
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5) or names[:3]
            warn_user(
                f"{argument} pattern {pattern!r} matches no block with residual branches (closest: "
                f"{', '.join(close)}); pathsurgeon.find(model) lists the block names"
            )


def _plan(
    model: nn.Module, captured: Capture, selection: PartSelection, config: DropPathConfig,
    observation: _Observed | None,
) -> _Planned:
    """Rates part by part, each over every chosen block of the part (so that excluding blocks moves no
    other rate), then the branches the config selects, with their way in for modes 'skip' and 'batch'."""
    part_plans = plan_parts(model, selection, list(captured.view.slot_calls.values()), config.rate,
                            config.schedule_argument)
    left_alone = list(selection.left_alone)
    for planned in part_plans:
        left_alone += [
            LeftAlone(slot.rpartition(".")[0], f"the library drops {slot} (rate {value:.4g}) off any residual "
                                               "branch; left alone")
            for slot, value in planned.rates.off_branch.items()
            if not any(f"slot {slot} " in k.reason for k in left_alone)  # already listed as off the branch
        ]
    shapes = observation.output_shapes if observation is not None else {}
    batch = observation.batch if observation is not None else None
    # one add node may close several residual branches (parallel paths summed before the add: timm
    # ParallelThingsBlock), so a branch is known by its add and its own slot or producer
    planned_branches = {}  # (add node, slot, producer) -> branch
    for planned in part_plans:
        for residual, rate in zip(planned.chosen, planned.rates.values, strict=True):
            branch = dataclasses.replace(make_branch(residual, planned.plan, rate, shapes, batch),
                                         part=planned.part.path)
            planned_branches[residual.node, residual.slot, residual.producer] = branch
    chosen, branches = [], []
    for residual in selection.chosen:  # execution order
        branch = planned_branches[residual.node, residual.slot, residual.producer]
        if config.selects(residual.block):
            chosen.append(residual)
            branches.append(branch)
        elif not any(k.block == residual.block and "excluded" in k.reason for k in left_alone):
            left_alone.append(LeftAlone(residual.block, "excluded by the config's include / exclude patterns"))
    if not branches:
        raise PathSurgeonError(
            f"the config's include {list(config.include)} / exclude {list(config.exclude)} patterns leave none of "
            f"the {len(selection.blocks)} blocks with branches (e.g. {selection.blocks[0]!r}); "
            "check the patterns against pathsurgeon.find(model)"
        )
    reasons: dict[str, str] = {}
    norms: dict[str, tuple[str, ...]] = {}
    if config.mode != "sample":
        branches, reasons, norms = assign_entries(model, branches, chosen, captured.view, config.mode,
                                                  config.batch_norm)
    formulas = {"library" if p.rates.library is not None else p.plan.formula for p in part_plans}
    formula = formulas.pop() if len(formulas) == 1 else "per part"
    rates_from, note = _rates_summary(part_plans)
    schedule = validate_schedule(config.schedule_argument, config.rate)
    return _Planned(branches, left_alone, reasons, part_plans, schedule, formula, rates_from, note, norms)


def _add_to_parts(
    model: nn.Module, config: DropPathConfig, inputs: ExampleInputs | None, held: list[str], error: CaptureError,
    clock: _Clock,
) -> Report:
    """A model that cannot be captured whole (a torchvision detector) but holds parts that can (its
    ``backbone.body``, a timm or Hugging Face backbone): :func:`add` on each part, with inputs made for
    it (images at the size the detector's transform makes, else the part's own made-up inputs); the
    rest is left alone. The model's own eval outputs are checked on ``inputs``; on any failure every
    part is stripped again. :func:`strip` on the model undoes it all (surgery on submodules included)."""
    log.info("%s cannot be captured whole (%s); adding drop path to its parts %s alone",
             type(model).__name__, _first_clause(error), ", ".join(held))
    reference = None
    if config.tolerance is not None and inputs is not None:
        with clock("observe"):
            reference = eval_outputs(model, inputs)
    side = detection_image_size(model, padded=True)
    reports: list[tuple[str, Report]] = []
    difference = None
    with Transaction() as transaction:
        for path in held:
            part = model.get_submodule(path)
            part_inputs = _part_inputs(part, side)
            with clock("parts"):
                transaction.do(functools.partial(_add_part, reports, path, part, config, part_inputs),
                               functools.partial(_strip_part, part))
        if reference is not None:
            assert inputs is not None and config.tolerance is not None
            with clock("verify"):
                difference = max_abs_diff(reference, eval_outputs(model, inputs))
            if not difference <= config.tolerance:
                raise VerificationError(
                    f"{type(model).__name__}'s eval outputs moved by {difference:.3g} after drop path went into "
                    f"{', '.join(held)}; nothing was changed; report the model to pathsurgeon"
                )
    report = _parts_report(model, config, reports, held, error, difference, clock)
    _log_added(model, report)
    return report


def _parts_instead(model: nn.Module, error: CaptureError) -> list[str]:
    """The parts that are surgered one by one in a model that cannot be captured whole (a detector's
    backbone body); ``error`` raised again where it holds none."""
    held = capturable_parts(model)
    if not held:
        raise error
    return held


def _part_inputs(part: nn.Module, side: int | None) -> torch.Tensor | None:
    """Images at the size a detector's transform makes (``side``), for its backbone body; None: the
    part's own made-up inputs."""
    if side is None:
        return None
    device, dtype = placement(part)
    generator = torch.Generator().manual_seed(0)
    return torch.randn((EXAMPLE_BATCH, 3, side, side), generator=generator).to(device, dtype)


def _inside(path: str, branches: Sequence[Branch]) -> list[Branch]:
    """A part's branches named from the model that holds the part at ``path``."""
    def name(inner: str | None) -> str | None:
        return f"{path}.{inner}" if inner else (path if inner == "" else None)

    return [dataclasses.replace(b, block=cast(str, name(b.block)), target=cast(str, name(b.target)),
                                unit=name(b.unit), entry=name(b.entry), part=path) for b in branches]


def _preview_parts(
    model: nn.Module, rate: float | None, schedule: ScheduleName | Sequence[float], held: list[str]
) -> Preview:
    """:func:`preview` of a model :func:`add` surgers part by part (a detector): each part's preview,
    named from the model."""
    side = detection_image_size(model, padded=True)
    branches: list[Branch] = []
    part_reports: list[PartReport] = []
    notes: list[str] = []
    for path in held:
        part = model.get_submodule(path)
        preview_ = preview(part, rate, schedule=schedule, example_inputs=_part_inputs(part, side))
        mine = _inside(path, preview_)
        branches += mine
        library, source, note = _part_origin(model, path, preview_.rates_from, preview_.rates_note,
                                             preview_.parts)
        if note:
            notes.append(f"{path}: {note}")
        part_reports.append(PartReport(
            path=path, library=library, source=source, rates_from=preview_.rates_from, rates_note=note,
            blocks=len({b.block for b in mine}), branches=len(mine),
        ))
    sources = {p.rates_from for p in part_reports}
    return Preview(branches, rates_from=sources.pop() if len(sources) == 1 else "per part",
                   rates_note="; ".join(notes), parts=part_reports)


def _part_origin(model: nn.Module, path: str, rates_from: str, note: str,
                 parts: Sequence[PartReport]) -> tuple[str | None, str, str]:
    """(library, source, rates note) of a part surgered on its own: a detection backbone body is
    torchvision's (which builds no drop path there)."""
    if isinstance(model.get_submodule(path), detection_bodies()):
        if rates_from == "linear over found units":
            note = ("torchvision builds no drop path into a detector's backbone (a ResNet's or MobileNetV3's "
                    "stages): linear over its found units")
        return "torchvision", "detection backbone", note
    return next((p.library for p in parts if p.library), None), "library part", note


def _add_part(reports: list[tuple[str, Report]], path: str, part: nn.Module, config: DropPathConfig,
              inputs: Any) -> None:
    reports.append((path, add(part, config, example_inputs=inputs)))


def _strip_part(part: nn.Module) -> None:
    strip(part)


def _parts_report(
    model: nn.Module, config: DropPathConfig, reports: list[tuple[str, Report]], held: list[str],
    error: CaptureError, difference: float | None, clock: _Clock,
) -> Report:
    """One report for the model: each part's branches under the part's path, the rest left alone."""
    branches: list[Branch] = []
    left_alone: list[LeftAlone] = []
    fallbacks: list[Fallback] = []
    part_reports: list[PartReport] = []
    notes: list[str] = []

    def inside(path: str, name: str | None) -> str | None:
        return f"{path}.{name}" if name else (path if name == "" else None)

    for path, report in reports:
        mine = _inside(path, report.branches)
        branches += mine
        left_alone += [LeftAlone(cast(str, inside(path, k.block)), k.reason) for k in report.left_alone]
        fallbacks += [Fallback(cast(str, inside(path, f.block)), cast(str, inside(path, f.target)), f.reason)
                      for f in report.fallbacks]
        library, source, note = _part_origin(model, path, report.rates_from, report.rates_note, report.parts)
        if note:
            notes.append(f"{path}: {note}")
        part_reports.append(PartReport(
            path=path, library=library, source=source, rates_from=report.rates_from, rates_note=note,
            blocks=len({b.block for b in mine}), branches=len(mine),
        ))
    reason = (f"{type(model).__name__} cannot be captured whole ({_first_clause(error)}); drop path went into "
              f"its parts {', '.join(held)} alone")
    left_alone += [LeftAlone(name, reason) for name in _outside(model, held)]
    sources = {r.rates_from for _, r in reports}
    rates_from = sources.pop() if len(sources) == 1 else "per part"
    formulas = {r.formula for _, r in reports}
    schedule = validate_schedule(config.schedule_argument, config.rate)
    return Report(
        branches=branches, max_abs_diff=difference, method="per part", schedule=schedule,
        formula=formulas.pop() if len(formulas) == 1 else "per part", left_alone=left_alone, mode=config.mode,
        fallbacks=fallbacks, rates_from=rates_from, rates_note="; ".join(notes), timings=clock.seconds,
        parts=part_reports,
    )


def _log_added(model: nn.Module, report: Report) -> None:
    """What ``add`` decided on its own, for the ``pathsurgeon`` logger: the outcome, each branch left
    alone and each branch computing in full (the report holds them all; nothing here is a warning)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info("added drop path to %s: %s", type(model).__name__, report.summary())
    for item in report.left_alone:
        log.debug("left %s alone: %s", item.block, item.reason)
    for fallback in report.fallbacks:
        log.info("%s computes every sample in mode %r: %s", fallback.target, report.mode, fallback.reason)


def _first_clause(error: CaptureError) -> str:
    text = str(error)
    start = text.find("(")
    return text[start + 1:].split(";")[0].split(". ")[0].strip(" )") if start >= 0 else text.split(";")[0]


def _outside(model: nn.Module, held: list[str]) -> list[str]:
    """The outermost modules of ``model`` that hold none of the ``held`` parts (what was left alone)."""
    names: list[str] = []

    def walk(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if full in held:
                continue
            if any(h.startswith(full + ".") for h in held):
                walk(child, full)
            else:
                names.append(full)

    walk(model, "")
    return names


def _rates_summary(part_plans: list[PartPlan]) -> tuple[str, str]:
    """``rates_from`` and ``rates_note`` of the whole model: the one part's, or 'per part'."""
    if len(part_plans) == 1 and not part_plans[0].part.path:
        return part_plans[0].rates.rates_from, part_plans[0].rates.note
    sources = {p.rates.rates_from for p in part_plans}
    notes = "; ".join(f"{p.part.name}: {p.rates.note}" for p in part_plans if p.rates.note)
    return (sources.pop() if len(sources) == 1 else "per part"), notes


def _part_reports(part_plans: list[PartPlan], branches: list[Branch], selection: PartSelection) -> list[PartReport]:
    """The planned parts, then the regions left alone (no library gives them drop path)."""
    planned = [
        PartReport(path=p.part.path, library=p.part.library, source=p.part.source, rates_from=p.rates.rates_from,
                   rates_note=p.rates.note, blocks=len({b.block for b in branches if b.part == p.part.path}),
                   branches=sum(1 for b in branches if b.part == p.part.path))
        for p in part_plans
    ]
    # the include= patterns that bring each in are named once, in report.left_alone
    alone = [
        PartReport(path=part.path, library=part.library, source=part.source, rates_from="left alone",
                   rates_note=f"no {'' if part.is_region else 'vision '}library gives it drop path",
                   blocks=0, branches=0)
        for part in selection.parts if not part.default
    ]
    return planned + alone


def _in_execution_order(branches: list[Branch], selection: PartSelection) -> list[Branch]:
    order = {(a.block, a.slot or a.producer): i for i, a in enumerate(selection.chosen)}
    return sorted(branches, key=lambda b: order.get((b.block, b.target), len(order)))


def _hooked_parts_slots(captured: Capture, planned: _Planned) -> list[str]:
    """The drop-path slots the model calls inside parts whose branches are hooked (see
    :func:`~pathsurgeon.changes.silencing_changes`): a slot of another part is filled, not silenced."""
    parts = [p.part for p in planned.part_plans]
    hooked = {b.part for b in planned.branches if b.mechanism == "hook"}
    slots = []
    for slot in captured.view.slot_calls.values():
        holder = part_of(slot, parts)
        if holder is not None and holder.path in hooked:
            slots.append(slot)
    return slots


# --- helpers ------------------------------------------------------------------------------------------


def _on_meta(model: nn.Module) -> bool:
    """Whether any of the model's tensors is on the meta device (holds no numbers)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _refuse_meta_device(model: nn.Module, config: DropPathConfig) -> None:
    if not _on_meta(model):
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
    and nothing requires them); a composite's run every tower and prompt path
    (:mod:`pathsurgeon.composite_inputs`)."""
    if given is None:
        made = composite_inputs(model)
        if made is not None:
            return made
    if given is not None or required:
        return example_inputs(model, given)
    try:
        return example_inputs(model, None)
    except ExampleInputsError:
        raise  # the model states a size no input can have, or one too costly to run: say so, even here
    except PathSurgeonError:
        return None


def _with_made_up_inputs(model: nn.Module, inputs: ExampleInputs | None, given: Any, run: Callable[[], Any]) -> Any:
    """``run()``; where pathsurgeon made the inputs up and the model refuses them, an
    :class:`~pathsurgeon.ExampleInputsError` that says to pass ``example_inputs``, not what the model raised."""
    if given is not None or inputs is None:
        return run()
    try:
        with _made_up_inputs_checked(model, inputs, made_up=True):
            return run()
    except CaptureError as error:  # the inputs may be what failed, or not: an eager forward tells
        refused = _eager_refusal(model, inputs)
        if refused is not None:
            raise made_up_inputs_failed(model, inputs, refused) from error
        shown = ", ".join(
            f"{name}{list(v.shape)}" for name, v in
            [*((f"arg{i}", a) for i, a in enumerate(inputs.args)), *inputs.kwargs.items()] if hasattr(v, "shape")
        )
        raise CaptureError(f"{error}; it ran on inputs pathsurgeon made up ({shown}): if {type(model).__name__} "
                           "takes others, pass example_inputs=") from error


def _capture(model: nn.Module, inputs: ExampleInputs | None, given: Any) -> tuple[Capture, ExampleInputs | None]:
    """The graph, and the inputs it was captured on: a model that returns a key/value cache
    (``DynamicCache``, ``EncoderDecoderCache``: no type torch.export can capture) is captured again with
    ``use_cache=False`` where its forward takes it and the inputs do not set it; else the error says how."""
    try:
        return _with_made_up_inputs(model, inputs, given, lambda: capture(model, inputs)), inputs
    except CaptureError as error:
        if inputs is None or not _cache_output(error):
            raise
        hint = CaptureError(
            f"{error}; {type(model).__name__} returns a key/value cache, which no graph capture can hold: "
            "set model.config.use_cache = False (or pass use_cache=False in example_inputs) and call again"
        )
        if not _takes_use_cache(model) or "use_cache" in inputs.kwargs:
            raise hint from error
        uncached = ExampleInputs(inputs.args, {**inputs.kwargs, "use_cache": False})
        try:
            return _with_made_up_inputs(model, uncached, given, lambda: capture(model, uncached)), uncached
        except CaptureError as again:  # use_cache=False did not help: say how, else what failed then
            if _cache_output(again):
                raise hint from again
            raise


def _cache_output(error: CaptureError) -> bool:
    """Whether torch.export failed on a key/value cache the model returned (``DynamicCache``, ...)."""
    return "Cache" in str(error) and "not a known type" in str(error)


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``use_cache``: by name, or through ``**kwargs`` it hands to a
    language model (transformers 5's Llava and PaliGemma)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _eager_refusal(model: nn.Module, inputs: ExampleInputs) -> Exception | None:
    """What the model raises when simply run, in eval mode, on ``inputs`` (None if it runs): a capture
    that failed on made-up inputs the model itself refuses is the inputs' fault. Not judged on the meta
    device, where a model's own ``.item()`` fails whatever the inputs."""
    if _on_meta(model):
        return None
    try:
        eval_outputs(model, inputs)
    except Exception as error:  # noqa: BLE001 - the model's own error, reported as the inputs' fault
        return error
    return None


def _unreached(model: nn.Module, captured: Capture) -> list[LeftAlone]:
    """Modules the example inputs did not run (a graph from torch.export holds only what ran)."""
    if captured.method != "torch.export":
        return []
    return [
        LeftAlone(name, "not run by the example inputs, so residual branches in it were not looked for; "
                        "pass example_inputs that run it")
        for name in unreached_modules(model, captured.view)
    ]


def _hook_shapes(
    model: nn.Module, inputs: ExampleInputs | None, selection: PartSelection, *, made_up: bool
) -> dict[str, Any]:
    """Output shapes of the modules hooks would go on, from one eval forward (none needed for slots)."""
    hooks = {cast(str, a.producer) for a in selection.chosen if a.slot is None}  # select() chose each for it
    if not hooks or inputs is None:
        return {}
    with _made_up_inputs_checked(model, inputs, made_up=made_up):
        return observe(model, inputs, shapes_of=hooks).output_shapes


@contextmanager
def _made_up_inputs_checked(model: nn.Module, inputs: ExampleInputs, *, made_up: bool) -> Iterator[None]:
    """A forward on inputs pathsurgeon made from the model's config that fails is the inputs' fault (a
    size or channel count the config does not state): say so, and to pass ``example_inputs``."""
    try:
        yield
    except PathSurgeonError:
        raise
    except Exception as error:
        if not made_up:
            raise  # the user's own inputs: the model's error is the user's to read
        raise made_up_inputs_failed(model, inputs, error) from error


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a None slot
        return None


def _set_record_rates(record: Record, branches: list[Branch], rate: float | None, schedule) -> None:
    record.branches, record.rate, record.schedule = branches, rate, schedule
