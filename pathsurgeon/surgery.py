"""Model-level surgery: find, add, set_rate, strip.

Order of work in :func:`add`: validate every argument, capture and plan (the model is only read),
then change modules, recording each change in one :class:`Record` kept on the model, then verify.
Any exception after the first change undoes the changes made so far, so the model is left exactly as
it was. :func:`strip` undoes the record.

How a branch is changed, in order of preference:

1. **slot**: the branch passes through a drop-path slot (timm ``DropPath`` / ``nn.Identity`` /
   ``None``, torchvision ``StochasticDepth``, HF ``XxxDropPath``): the slot gets pathsurgeon's
   :class:`DropPath`. Existing drop paths are re-rated this way, never stacked.
2. **hook**: the model has no slots at all and the branch is the output of a child module of the
   block: a forward hook on that module applies drop path to its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from . import slots as slot_lib
from .capture import Capture, capture
from .droppath import DropPath, drop_path, validate_rate
from .errors import AlreadySurgeredError, NoBranchesError, PathSurgeonError, VerificationError
from .finder import ResidualAdd, find_residual_adds
from .inputs import ExampleInputs, example_inputs
from .plan import Plan, make_plan, recipe_for, validate_schedule
from .verify import eval_outputs, max_abs_diff

__all__ = ["Branch", "Report", "add", "find", "preview", "set_rate", "strip"]

RECORD_ATTRIBUTE = "_pathsurgeon"


@dataclass(frozen=True)
class Branch:
    """One residual branch.

    ``block``: qualified name of the module whose forward performs the residual add (``blocks.3``,
    ``layer2.1``). ``index``: depth index of the block's unit in execution order (the schedule's ``i``).
    ``rate``: the drop rate (from :func:`find`: the rate the model has now). ``mechanism``: 'slot' (the
    branch passes through the drop-path slot ``target``) or 'hook' (a forward hook on the module
    ``target``, whose output is the branch). ``batch_axis``: the batch axis of the branch output.
    ``unit``: the depth unit the schedule counts the block in (the block itself for most families).
    """

    block: str
    index: int
    rate: float
    mechanism: str
    target: str
    batch_axis: int = 0
    unit: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A residual add that was found but is left alone, and why."""

    block: str
    reason: str


@dataclass
class Report:
    """What :func:`add` did. ``max_abs_diff``: eval-output difference against before (0.0: bitwise equal)."""

    branches: list[Branch]
    max_abs_diff: float | None
    method: str
    schedule: str | list[float]
    formula: str
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(b.block for b in self.branches))

    def summary(self) -> str:
        check = (
            "eval check skipped"
            if self.max_abs_diff is None
            else f"eval check passed with max |Δ| = {self.max_abs_diff:g}"
        )
        return f"{len(self.branches)} branches in {len(self.blocks)} blocks; {check}"

    def __str__(self) -> str:
        return f"{format_branches(self.branches)}\n{self.summary()}"


def format_branches(branches: list[Branch]) -> str:
    """A table with one row per block: block, depth index, number of branches, rate."""
    blocks: dict[str, list[Branch]] = {}
    for branch in branches:
        blocks.setdefault(branch.block, []).append(branch)
    width = max([len("block")] + [len(b) for b in blocks])
    rows = [f"{'block':<{width}}  {'index':>5}  {'branches':>8}  {'rate':>8}"]
    for block, mine in blocks.items():
        rows.append(f"{block:<{width}}  {mine[0].index:>5}  {len(mine):>8}  {mine[0].rate:>8.4f}")
    return "\n".join(rows)


# --- the record of changes ---------------------------------------------------------------------------


class _BranchHook:
    """Forward hook applying drop path to a module's output, with the module's training flag."""

    def __init__(self, drop: DropPath) -> None:
        self.drop = drop

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            return output
        d = self.drop
        return drop_path(output, d.rate, module.training, d.scale_by_keep, d.batch_axis)


@dataclass
class _Change:
    """One change to the model. ``undo`` restores exactly what was there."""

    block: str
    target: str  # the slot, or the hooked module
    drop: DropPath
    parent: nn.Module | None = None
    attr: str | None = None
    original: slot_lib.SlotContent | None = None
    hook_id: int | None = None
    hooked: nn.Module | None = None

    def undo(self) -> None:
        if self.hooked is not None:
            self.hooked._forward_hooks.pop(self.hook_id, None)
        else:
            slot_lib.restore_slot(self.parent, self.attr, self.original)


@dataclass
class Record:
    """Everything pathsurgeon changed on a model, kept on the model as ``model._pathsurgeon``."""

    changes: list[_Change]
    branches: list[Branch]
    blocks: list[str]  # blocks in execution order, as planned
    method: str
    rate: float | None
    schedule: str | list[float]


def _record(model: nn.Module) -> Record | None:
    return vars(model).get(RECORD_ATTRIBUTE)


# --- public API ---------------------------------------------------------------------------------------


def find(model: nn.Module, example_inputs: Any = None) -> list[Branch]:
    """The residual branches stochastic depth would go on, with the rates the model has now.

    Changes nothing. ``example_inputs`` is only needed for models torch.fx cannot trace.
    """
    _check_model(model)
    record = _record(model)
    if record is not None:
        return list(record.branches)
    captured, selected, inputs = _discover(model, example_inputs)
    if not selected:
        return []
    plan = make_plan(model, _blocks(selected), 0.0, "auto", recipe_for(model))
    return [
        _branch(a, plan, slot_lib.existing_rate(_module_or_none(model, a.slot)) if a.slot else 0.0, captured, inputs)
        for a in selected
    ]


def preview(
    model: nn.Module, rate: float | None, *, schedule: str | Sequence[float] = "auto", example_inputs: Any = None
) -> list[Branch]:
    """The branches with the rates :func:`add` would give them; changes nothing."""
    _check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    schedule = validate_schedule(schedule, rate)
    captured, selected, inputs = _discover(model, example_inputs)
    if not selected:
        raise _no_branches(model)
    plan = make_plan(model, _blocks(selected), rate, schedule, recipe_for(model))
    return [_branch(a, plan, plan.rate_of(a.block), captured, inputs) for a in selected]


def _discover(model: nn.Module, example_inputs: Any):
    inputs = _inputs_or_none(model, example_inputs)
    captured = capture(model, inputs)
    selected, _ = _select(captured)
    return captured, selected, inputs


def _no_branches(model: nn.Module) -> NoBranchesError:
    return NoBranchesError(
        f"found no residual branch in {type(model).__name__} (no add of a skip and a parameterised "
        "branch); pathsurgeon needs a residual network such as a ViT, ResNet or ConvNeXt"
    )


def add(
    model: nn.Module,
    rate: float | None,
    *,
    schedule: str | Sequence[float] = "auto",
    example_inputs: Any = None,
    verify: bool | float = True,
) -> Report:
    """Put per-sample DropPath on every residual branch of ``model``, in place.

    ``schedule``: 'auto' (what the model's library does for its family; timm: exactly what
    ``create_model(name, drop_path_rate=rate)`` gives), 'linear' (0 → rate over depth units), 'uniform',
    or a list with one rate per depth unit (then ``rate=None``). ``verify``: compare eval outputs before
    and after on ``example_inputs`` (made from the model's config when not given): True demands bitwise
    equality, a float is an absolute tolerance, False skips the check. On any failure the model is left
    exactly as it was.
    """
    _check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    tolerance = _tolerance(verify)
    if _record(model) is not None:
        count = len(_record(model).branches)
        raise AlreadySurgeredError(
            f"model already carries pathsurgeon DropPath on {count} branches; "
            "use pathsurgeon.set_rate(model, rate) to change rates, or pathsurgeon.strip(model) first"
        )
    schedule = validate_schedule(schedule, rate)
    inputs = example_inputs_for(model, example_inputs, required=tolerance is not None)
    recipe = recipe_for(model)
    captured = capture(model, inputs)
    selected, skipped = _select(captured)
    if not selected:
        raise _no_branches(model)
    plan = make_plan(model, _blocks(selected), rate, schedule, recipe)
    branches = [_branch(a, plan, plan.rate_of(a.block), captured, inputs) for a in selected]
    reference = eval_outputs(model, inputs) if tolerance is not None else None

    changes: list[_Change] = []
    try:
        changes = _apply(model, branches)
        difference = None
        if reference is not None:
            difference = max_abs_diff(reference, eval_outputs(model, inputs))
            if not difference <= tolerance:
                for change in reversed(changes):
                    change.undo()
                if not max_abs_diff(reference, eval_outputs(model, inputs)) <= tolerance:
                    raise VerificationError(
                        f"{type(model).__name__} gives different eval outputs on the same inputs from one call to "
                        "the next (random masking?); pass example_inputs that fix its randomness (e.g. noise=) "
                        "or verify=False"
                    )
                culprit = _first_changing_block(model, changes, reference, inputs, tolerance)
                raise VerificationError(
                    f"eval outputs changed after adding DropPath (max |Δ| = {difference:g}), first at block "
                    f"{culprit!r}; the model was rolled back; report this model, or pass verify=False to skip"
                )
    except BaseException:
        for change in reversed(changes):
            change.undo()
        raise
    vars(model)[RECORD_ATTRIBUTE] = Record(
        changes=changes,
        branches=branches,
        blocks=_blocks(selected),
        method=captured.method,
        rate=rate,
        schedule=plan.schedule,
    )
    return Report(branches, difference, captured.method, plan.schedule, plan.formula, skipped)


def set_rate(model: nn.Module, rate: float | None, *, schedule: str | Sequence[float] = "auto") -> list[Branch]:
    """Re-rate a model surgered by :func:`add` (in place); returns the branches with their new rates."""
    _check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    schedule = validate_schedule(schedule, rate)
    record = _record(model)
    if record is None:
        raise PathSurgeonError(
            "model carries no pathsurgeon DropPath; call pathsurgeon.add(model, rate) first"
        )
    plan = make_plan(model, record.blocks, rate, schedule, recipe_for(model))
    new_rates = [plan.rate_of(change.block) for change in record.changes]
    old_rates = [change.drop.rate for change in record.changes]
    branches = [
        Branch(b.block, b.index, plan.rate_of(b.block), b.mechanism, b.target, b.batch_axis, b.unit)
        for b in record.branches
    ]
    try:
        for change, new in zip(record.changes, new_rates, strict=True):
            change.drop.rate = new
    except BaseException:
        for change, old in zip(record.changes, old_rates, strict=True):
            change.drop.rate = old
        raise
    record.branches, record.rate, record.schedule = branches, rate, plan.schedule
    return branches


def strip(model: nn.Module) -> nn.Module:
    """Undo :func:`add` in place: every slot and hook back as it was. A no-op on an untouched model."""
    _check_model(model)
    record = _record(model)
    if record is None:
        return model
    undone: list[_Change] = []
    try:
        for change in reversed(record.changes):
            change.undo()
            undone.append(change)
    except BaseException:
        for change in reversed(undone):
            _redo(model, change)
        raise
    del vars(model)[RECORD_ATTRIBUTE]
    return model


def is_surgered(model: nn.Module) -> bool:
    """True while ``model`` carries pathsurgeon's changes."""
    return _record(model) is not None


# --- helpers ------------------------------------------------------------------------------------------


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise PathSurgeonError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself"
        )


def _tolerance(verify: bool | float) -> float | None:
    if verify is True:
        return 0.0
    if verify is False or verify is None:
        return None
    if isinstance(verify, (int, float)) and not math.isnan(verify) and verify >= 0:
        return float(verify)
    raise PathSurgeonError(f"verify must be True, False or a tolerance >= 0, got {verify!r}")


def example_inputs_for(model: nn.Module, given: Any, *, required: bool) -> ExampleInputs | None:
    if given is not None or required:
        return example_inputs(model, given)
    return _inputs_or_none(model, None)


def _inputs_or_none(model: nn.Module, given: Any) -> ExampleInputs | None:
    if given is not None:
        return example_inputs(model, given)
    try:
        return example_inputs(model, None)
    except PathSurgeonError:
        return None


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a None slot
        return None


def _blocks(selected: list[ResidualAdd]) -> list[str]:
    return list(dict.fromkeys(a.block for a in selected))


def _select(captured: Capture) -> tuple[list[ResidualAdd], list[Skipped]]:
    """Pick the residual adds to wrap: those on drop-path slots if the model has any, else hookable ones."""
    view = captured.view
    adds = find_residual_adds(view)
    skipped: list[Skipped] = []
    if any(a.slot is not None for a in adds):
        branch_slot_calls = {}
        for a in adds:
            if a.slot is not None:
                branch_slot_calls.setdefault(a.slot, set()).add(a.slot_call)
        off_branch = {
            slot for node, slot in view.slot_calls.items() if node not in branch_slot_calls.get(slot, set())
        }
        selected = []
        for a in adds:
            if a.slot is None:
                skipped.append(Skipped(a.block, "no drop-path slot on this branch; its library never drops it"))
            elif a.slot in off_branch:
                skipped.append(Skipped(a.block, f"slot {a.slot} is also called off the residual branch"))
            else:
                selected.append(a)
        return selected, skipped
    producers_ok = _hookable_producers(view, adds)
    selected = []
    for a in adds:
        if a.producer is None:
            skipped.append(Skipped(a.block, "branch is computed inline in the block; no module to hook"))
        elif a.producer not in producers_ok:
            skipped.append(Skipped(a.block, f"{a.producer} output is also used off the residual branch"))
        else:
            selected.append(a)
    return selected, skipped


def _hookable_producers(view, adds: list[ResidualAdd]) -> set[str]:
    """Producers whose every output leaving the module is the branch operand of a residual add."""
    branch_nodes: dict[str, set[fx.Node]] = {}
    for a in adds:
        if a.producer is not None:
            branch_nodes.setdefault(a.producer, set()).add(a.branch)
    ok = set()
    for producer, branches in branch_nodes.items():
        outputs = set()
        for node, stack in view.module_stack.items():
            if producer in stack and any(producer not in view.module_stack.get(u, ()) for u in node.users):
                outputs.add(node)
        if outputs <= branches:
            ok.add(producer)
    return ok


def _batch_axis(shapes: list[torch.Size], batch: int | None) -> int:
    if not shapes or batch is None:
        return 0
    shape = shapes[0]
    if len(shape) and shape[0] == batch:
        return 0
    matches = [axis for axis, size in enumerate(shape) if size == batch]
    return matches[0] if len(matches) == 1 else 0


def _branch(add_: ResidualAdd, plan: Plan, rate: float, captured: Capture, inputs) -> Branch:
    batch = inputs.batch_size if inputs is not None else None
    if add_.slot is not None:
        mechanism, target = "slot", add_.slot
        axis = _batch_axis(captured.probe_shapes.get(add_.slot, []), batch)
    else:
        mechanism, target = "hook", add_.producer
        shape = captured.output_shapes.get(add_.producer) if add_.producer else None
        axis = _batch_axis([shape] if shape is not None else [], batch)
    return Branch(add_.block, plan.index_of(add_.block), rate, mechanism, target, axis,
                  plan.unit_of_block.get(add_.block))


def _apply(model: nn.Module, branches: list[Branch]) -> list[_Change]:
    """Change the model, one change per slot or hooked module; on failure undo and re-raise."""
    changes: list[_Change] = []
    done: set[str] = set()
    try:
        for branch in branches:
            if branch.target in done:  # one slot called on several branches (timm CaiT, MLP-Mixer)
                continue
            done.add(branch.target)
            changes.append(_change(model, branch))
            _redo(model, changes[-1])
    except BaseException:
        for change in reversed(changes):
            change.undo()
        raise
    return changes


def _change(model: nn.Module, branch: Branch) -> _Change:
    if branch.mechanism == "slot":
        parent_name, _, attr = branch.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = slot_lib.read_slot(parent, attr)
        scale = getattr(original.value, "scale_by_keep", True)
        drop = DropPath(branch.rate, scale_by_keep=scale, batch_axis=branch.batch_axis)
        drop.train(parent.training)  # a new module defaults to training; follow the model's mode
        return _Change(branch.block, branch.target, drop, parent=parent, attr=attr, original=original)
    hooked = model.get_submodule(branch.target)
    drop = DropPath(branch.rate, batch_axis=branch.batch_axis)
    handle = hooked.register_forward_hook(_BranchHook(drop))
    hooked._forward_hooks.pop(handle.id)  # installed by _redo, like every other change
    return _Change(branch.block, branch.target, drop, hook_id=handle.id, hooked=hooked)


def _redo(model: nn.Module, change: _Change) -> None:
    if change.hooked is not None:
        change.hooked._forward_hooks[change.hook_id] = _BranchHook(change.drop)
    else:
        slot_lib.write_slot(change.parent, change.attr, change.drop)


def _first_changing_block(
    model: nn.Module, changes: list[_Change], reference: list[torch.Tensor], inputs, tolerance: float
) -> str:
    """With all changes undone: re-apply them one by one until the eval outputs move; name that block."""
    try:
        for change in changes:
            _redo(model, change)
            if not max_abs_diff(reference, eval_outputs(model, inputs)) <= tolerance:
                return change.block
        return changes[-1].block if changes else "?"
    finally:
        for change in reversed(changes):
            change.undo()
