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

With ``mode="skip"`` or ``"batch"`` a branch also gets a :class:`~pathsurgeon.droppath.Gather`
pre-hook on its first module (its only way in, found on the graph), so the branch runs on the kept
samples only. Each such branch is checked on the example inputs with fixed masks (some samples kept,
then none) against computing it in full; a branch that fails, mixes samples (BatchNorm) or has no
single way in keeps computing every sample, and the report lists it with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from . import slots as slot_lib
from .capture import Capture, capture, training_flags_kept
from .droppath import DropPath, Gather, brief, real_number, validate_mode, validate_rate
from .errors import AlreadySurgeredError, NoBranchesError, PathSurgeonError, VerificationError
from .finder import BranchEntry, ResidualAdd, branch_entries, find_residual_adds
from .inputs import ExampleInputs, example_inputs
from .plan import Plan, Recipe, make_plan, recipe_for, validate_schedule
from .rates import LibraryRates, library_rates
from .verify import eval_outputs, max_abs_diff, tensor_leaves
from .wrappers import check_not_sharded, check_not_wrapped

__all__ = ["Branch", "Fallback", "Preview", "Report", "Skipped", "add", "find", "preview", "set_rate", "strip"]

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
    ``mode``: 'sample' (every sample computed, dropped ones zeroed), 'skip' (only kept samples
    computed) or 'batch' (one draw per mini-batch). ``entry``: with 'skip' or 'batch', the module whose
    input is cut down to the kept samples (None: the branch is computed in full).
    """

    block: str
    index: int
    rate: float
    mechanism: str
    target: str
    batch_axis: int = 0
    unit: str | None = None
    mode: str = "sample"
    entry: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A residual add that was found but is left alone, and why."""

    block: str
    reason: str


@dataclass(frozen=True)
class Fallback:
    """A branch that computes every sample although ``mode`` asked to skip dropped ones, and why.

    With mode 'skip' it runs in 'sample' mode (same results, no saving); with 'batch' it keeps the
    one-draw-per-batch semantics but computes the branch before zeroing it.
    """

    block: str
    target: str
    reason: str


@dataclass
class Report:
    """What :func:`add` did. ``max_abs_diff``: eval-output difference against before (0.0: bitwise equal).

    ``skipped``: residual adds left without drop path, and drop-path sites of the library that are not
    residual branches. ``fallbacks``: branches that compute every sample although ``mode`` is 'skip' or
    'batch'. ``rates_from``: where the rates came from: 'timm constructor', 'torchvision builder' or
    'transformers config' (``schedule="auto"``, the library's own numbers, read from a meta-device
    rebuild), 'recipe' (``recipes/``), 'linear over found units', or the schedule given ('linear
    schedule', 'uniform schedule', 'explicit list'). ``rates_note``: why the library was not asked,
    when ``schedule="auto"`` could not use it.
    """

    branches: list[Branch]
    max_abs_diff: float | None
    method: str
    schedule: str | list[float]
    formula: str
    skipped: list[Skipped] = field(default_factory=list)
    mode: str = "sample"
    fallbacks: list[Fallback] = field(default_factory=list)
    rates_from: str = "linear over found units"
    rates_note: str = ""

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(b.block for b in self.branches))

    def summary(self) -> str:
        check = (
            "eval check skipped"
            if self.max_abs_diff is None
            else f"eval check passed with max |Δ| = {self.max_abs_diff:g}"
        )
        text = f"{len(self.branches)} branches in {len(self.blocks)} blocks; rates from {self.rates_from}; {check}"
        if self.mode != "sample":
            full = len(self.fallbacks)
            skipping = len(self.branches) - full
            text += f"; mode {self.mode!r}: {skipping} branches skip dropped compute, {full} compute in full"
        return text

    def __str__(self) -> str:
        lines = [format_branches(self.branches), self.summary()]
        lines += [f"  computed in full: {f.target}: {f.reason}" for f in self.fallbacks]
        return "\n".join(lines)


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
    """Forward hook applying drop path to a module's output, with the module's training flag.

    A module returning a tuple (Hugging Face attention: output, weights) has its first element dropped.
    """

    def __init__(self, drop: DropPath) -> None:
        self.drop = drop

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self.drop.apply_to(output, module.training)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.drop.apply_to(output[0], module.training), *output[1:])
        return output


@dataclass(eq=False)
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
    # modes 'skip' / 'batch': (module, pre-hook id) of each Gather feeding this drop path; several
    # when one slot serves several branches (timm MLP-Mixer, CaiT)
    gathers: list[tuple[nn.Module, int]] = field(default_factory=list)
    silenced: bool = False  # a library drop path held at rate 0 (see _silencing_changes); not a branch

    def undo(self) -> None:
        self.remove_gather()
        if self.hooked is not None:
            self.hooked._forward_hooks.pop(self.hook_id, None)
        else:
            slot_lib.restore_slot(self.parent, self.attr, self.original)

    def install_gather(self) -> None:
        for module, hook_id in self.gathers:
            module._forward_pre_hooks[hook_id] = Gather(self.drop)

    def remove_gather(self) -> None:
        for module, hook_id in self.gathers:
            module._forward_pre_hooks.pop(hook_id, None)
        self.drop._plan = None


@dataclass
class Record:
    """Everything pathsurgeon changed on a model, kept on the model as ``model._pathsurgeon``."""

    changes: list[_Change]
    branches: list[Branch]
    blocks: list[str]  # blocks in execution order, as planned
    method: str
    rate: float | None
    schedule: str | list[float]
    mode: str = "sample"
    fallbacks: list[Fallback] = field(default_factory=list)
    rates_from: str = "linear over found units"
    # the library's rates for set_rate(schedule="auto"); asked at most once per surgery
    library: LibraryRates | None = None
    library_asked: bool = False


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
    recipe = recipe_for(model)
    plan = make_plan(model, _blocks(selected), rate, schedule, recipe)
    rates = _rates(model, captured, selected, plan, rate, schedule, recipe)
    return Preview(
        [_branch(a, plan, r, captured, inputs) for a, r in zip(selected, rates.values, strict=True)],
        rates.rates_from,
        rates.note,
    )


class Preview(list):
    """The branches :func:`preview` returns, with ``rates_from`` and ``rates_note`` as in :class:`Report`."""

    def __init__(self, branches: list[Branch], rates_from: str, rates_note: str = "") -> None:
        super().__init__(branches)
        self.rates_from = rates_from
        self.rates_note = rates_note


def _discover(model: nn.Module, example_inputs: Any):
    check_not_sharded(model)
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
    mode: str = "sample",
    example_inputs: Any = None,
    verify: bool | float = True,
) -> Report:
    """Put DropPath (stochastic depth) on every residual branch of ``model``, in place.

    ``schedule``: 'auto' (what the model's library does for its family; timm: exactly what
    ``create_model(name, drop_path_rate=rate)`` gives), 'linear' (0 → rate over depth units), 'uniform',
    or a list with one rate per depth unit (then ``rate=None``). ``mode``: 'sample' (timm's per-sample
    drop path, the same code path and random numbers), 'skip' (per-sample, but dropped samples are not
    computed) or 'batch' (one draw per branch per mini-batch; a dropped branch is not computed).
    ``verify``: compare eval outputs before and after on ``example_inputs`` (made from the model's
    config when not given), each run from the same fixed RNG state: True demands bitwise equality, a
    float is an absolute tolerance, False skips the check. On any failure, an interrupt included, the
    model is left exactly as it was; the caller's RNG state is never changed.
    """
    _check_model(model)
    check_not_sharded(model)
    if rate is not None:
        rate = validate_rate(rate)
    mode = validate_mode(mode)
    tolerance = _tolerance(verify)
    _refuse_existing_surgery(model)
    schedule = validate_schedule(schedule, rate)
    _refuse_meta_device(model, tolerance, mode)
    inputs = example_inputs_for(model, example_inputs, required=tolerance is not None or mode != "sample")
    recipe = recipe_for(model)
    captured = capture(model, inputs)
    selected, skipped = _select(captured)
    if not selected:
        raise _no_branches(model)
    plan = make_plan(model, _blocks(selected), rate, schedule, recipe)
    rates = _rates(model, captured, selected, plan, rate, schedule, recipe)
    skipped += [
        Skipped(slot.rpartition(".")[0], f"the library drops {slot} (rate {value:.4g}) off any residual branch; "
                                         "left alone")
        for slot, value in rates.left_alone
        if not any(f"slot {slot} " in k.reason for k in skipped)  # already listed as off the branch
    ]
    branches = [_branch(a, plan, r, captured, inputs) for a, r in zip(selected, rates.values, strict=True)]
    reasons: dict[str, str] = {}  # target -> why that branch computes every sample
    if mode != "sample":
        branches = _with_entries(model, branches, selected, captured, mode, reasons)
    reference = eval_outputs(model, inputs) if tolerance is not None else None

    record = Record(changes=[], branches=branches, blocks=_blocks(selected), method=captured.method, rate=rate,
                    schedule=plan.schedule, mode=mode, rates_from=rates.rates_from, library=rates.library,
                    library_asked=rates.library_asked)
    difference = None
    with _Transaction() as transaction:
        # the record is the first change, so that an interrupt at any later point is undone with the rest
        transaction.do(lambda: vars(model).__setitem__(RECORD_ATTRIBUTE, record),
                       lambda: vars(model).pop(RECORD_ATTRIBUTE, None))
        for change in _changes(model, branches) + _silencing_changes(model, captured, branches, skipped):
            record.changes.append(change)
            transaction.do(functools.partial(_redo, model, change), change.undo)
        if reference is not None:
            difference = max_abs_diff(reference, eval_outputs(model, inputs))
            if not difference <= tolerance:
                raise _verification_error(model, record.changes, reference, inputs, tolerance, difference)
        failed = _check_gathers(model, [c for c in record.changes if c.gathers], inputs)
        for change, reason in failed.items():
            change.remove_gather()
            change.gathers = []
            if mode == "skip":
                change.drop.mode = "sample"
            reasons[change.target] = reason
        record.branches = [
            dataclasses.replace(b, entry=None, mode="sample" if mode == "skip" else mode) if b.target in reasons else b
            for b in branches
        ]
        record.fallbacks = list(dict.fromkeys(
            Fallback(b.block, b.target, reasons[b.target]) for b in branches if b.target in reasons
        ))
    formula = "library" if rates.library is not None else plan.formula
    return Report(record.branches, difference, captured.method, plan.schedule, formula, skipped, mode,
                  record.fallbacks, rates.rates_from, rates.note)


class _Transaction:
    """Changes to a model that are all undone, newest first, if the ``with`` block raises anything.

    ``do(apply, undo)`` registers ``undo`` *before* calling ``apply``, and every undo restores a saved
    state (it is safe to run when ``apply`` did not finish), so an exception or a KeyboardInterrupt at
    any point leaves the model as it was before the block.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> _Transaction:
        return self

    def do(self, apply: Callable[[], None], undo: Callable[[], None]) -> None:
        self._undo.append(undo)
        apply()

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            while self._undo:
                self._undo.pop()()


def _verification_error(
    model: nn.Module, changes: list[_Change], reference: list[torch.Tensor], inputs, tolerance: float, difference: float
) -> VerificationError:
    """Why the eval outputs moved: the model is random from call to call, or a block changed them."""
    for change in reversed(changes):
        change.undo()
    if not max_abs_diff(reference, eval_outputs(model, inputs)) <= tolerance:
        return VerificationError(
            f"{type(model).__name__} gives different eval outputs on the same inputs and seed from one call to "
            "the next (randomness outside torch's generators?); pass example_inputs that fix it or verify=False"
        )
    culprit = _first_changing_block(model, changes, reference, inputs, tolerance)
    return VerificationError(
        f"eval outputs changed after adding DropPath (max |Δ| = {difference:g}), first at block "
        f"{culprit!r}; the model was rolled back; report this model, or pass verify=False to skip"
    )


def set_rate(model: nn.Module, rate: float | None, *, schedule: str | Sequence[float] = "auto") -> list[Branch]:
    """Re-rate a model surgered by :func:`add` (in place); returns the branches with their new rates."""
    _check_model(model)
    if rate is not None:
        rate = validate_rate(rate)
    schedule = validate_schedule(schedule, rate)
    record = _record(model)
    if record is None:
        inner = _surgered_submodules(model)
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
    with _Transaction() as transaction:
        for change, new in zip(record.changes, new_rates, strict=True):
            transaction.do(functools.partial(setattr, change.drop, "rate", new),
                           functools.partial(setattr, change.drop, "rate", change.drop.rate))
        saved = (record.branches, record.rate, record.schedule)
        transaction.do(lambda: _set_record_rates(record, branches, rate, plan.schedule),
                       lambda: _set_record_rates(record, *saved))
    return branches


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


def strip(model: nn.Module) -> nn.Module:
    """Undo :func:`add` in place: every slot and hook back as it was. A no-op on an untouched model.

    Surgery applied to a submodule (``add(model.backbone, ...)``, or a model later wrapped in another
    module) is undone too, so that nothing of pathsurgeon is left anywhere in the tree.
    """
    _check_model(model)
    with _Transaction() as transaction:
        for name in _surgered_submodules(model, include_root=True):
            owner = model.get_submodule(name)
            record = _record(owner)
            for change in reversed(record.changes):
                transaction.do(change.undo, functools.partial(_redo, owner, change))
            transaction.do(functools.partial(vars(owner).pop, RECORD_ATTRIBUTE),
                           functools.partial(vars(owner).__setitem__, RECORD_ATTRIBUTE, record))
    return model


def is_surgered(model: nn.Module) -> bool:
    """True while ``model``, or any module inside it, carries pathsurgeon's changes."""
    return bool(_surgered_submodules(model, include_root=True))


def _surgered_submodules(model: nn.Module, include_root: bool = False) -> list[str]:
    """Names of the modules in ``model``'s tree that hold a surgery record ('' is the model itself)."""
    return [
        name for name, module in model.named_modules()
        if (include_root or name) and RECORD_ATTRIBUTE in vars(module)
    ]


def _refuse_existing_surgery(model: nn.Module) -> None:
    """One surgery per module tree: a second one would drop some branches twice."""
    record = _record(model)
    if record is not None:
        raise AlreadySurgeredError(
            f"model already carries pathsurgeon DropPath on {len(record.branches)} branches; "
            "use pathsurgeon.set_rate(model, rate) to change rates, or pathsurgeon.strip(model) first"
        )
    inner = _surgered_submodules(model)
    if inner:
        raise AlreadySurgeredError(
            f"submodule {inner[0]!r} of this model was already surgered by pathsurgeon.add; adding again would "
            "drop its branches twice: call pathsurgeon.strip(model) first, or set_rate on that submodule"
        )
    for name, module in model.named_modules():
        leftover = None
        if isinstance(module, DropPath) and module.inserted:
            leftover = "pathsurgeon's DropPath"
        elif any(isinstance(h, _BranchHook) for h in module._forward_hooks.values()):
            leftover = "a pathsurgeon drop-path hook"
        elif any(isinstance(h, Gather) for h in module._forward_pre_hooks.values()):
            leftover = "a pathsurgeon gather hook"
        if leftover is not None:
            raise AlreadySurgeredError(
                f"{name or 'the model'} holds {leftover} that no surgery record in this model accounts for (copied "
                "out of a surgered model?); strip the model it came from before copying, or rebuild this one"
            )


def _refuse_meta_device(model: nn.Module, tolerance: float | None, mode: str) -> None:
    on_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    if not on_meta:
        return
    if tolerance is not None:
        raise PathSurgeonError(
            f"{type(model).__name__} is on the meta device (no weights), so its eval outputs cannot be checked; "
            "pass verify=False, or load the weights first (model.to_empty(device='cpu'), then load_state_dict)"
        )
    if mode != "sample":
        raise PathSurgeonError(
            f"mode {mode!r} checks each branch on real numbers, but {type(model).__name__} is on the meta device; "
            "use mode='sample' there, or load the weights first"
        )


# --- helpers ------------------------------------------------------------------------------------------


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise PathSurgeonError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself"
        )
    check_not_wrapped(model)


def _tolerance(verify: bool | float) -> float | None:
    if verify is True:
        return 0.0
    if verify is False or verify is None:
        return None
    value = real_number(verify)
    if value is not None and value >= 0:  # NaN fails the comparison
        return value
    raise PathSurgeonError(f"verify must be True, False or a tolerance >= 0, got {brief(verify)}")


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


@dataclass
class _Rates:
    """The rates of the selected branches under a schedule, and where they came from."""

    values: list[float]
    rates_from: str
    note: str = ""
    library: LibraryRates | None = None
    library_asked: bool = False
    left_alone: list[tuple[str, float]] = field(default_factory=list)  # (slot, rate) the library drops elsewhere


def _rates(
    model: nn.Module,
    captured: Capture,
    selected: list[ResidualAdd],
    plan: Plan,
    rate: float | None,
    schedule: str | list[float],
    recipe: Recipe,
) -> _Rates:
    """``auto``: the library's own per-slot rates where it can be asked, else the recipe; others: the plan."""
    planned = [plan.rate_of(a.block) for a in selected]
    if schedule != "auto":
        return _Rates(planned, "explicit list" if isinstance(schedule, list) else f"{schedule} schedule")
    fallback = "recipe" if recipe.entry else "linear over found units"
    if any(a.slot is None for a in selected):  # hooked branches: the library has no slot to read
        return _Rates(planned, fallback, library_rates(model, rate, []).note, library_asked=True)
    called = list(dict.fromkeys(captured.view.slot_calls.values()))
    source = library_rates(model, rate, called)
    if source.rates is None:
        return _Rates(planned, fallback, source.note, library_asked=True)
    by_slot = source.rates(rate)
    chosen = {a.slot for a in selected}
    left_alone = [(slot, value) for slot, value in by_slot.items() if value > 0 and slot not in chosen]
    return _Rates([by_slot[a.slot] for a in selected], source.rates.rates_from, library=source.rates,
                  library_asked=True, left_alone=left_alone)


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
        if selected:
            return selected, skipped
        # Every slot is also called off its branch (HF CvT calls its layer's one drop path on the
        # attention branch and on the layer output, shortcut included): filling a slot would drop
        # more than a residual branch, so the branches are hooked like those of a model without slots.
        skipped = []
        adds = [dataclasses.replace(a, slot=None, slot_call=None) for a in adds]
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
            branch_nodes.setdefault(a.producer, set()).add(a.producer_output)
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
        # the drop path a slot holds masks rows of axis 0 (timm, torchvision, HF alike), even where the
        # rows are windows of a sample (HF RF-DETR, timm SAM ViT): so does the DropPath that fills it
        mechanism, target, axis = "slot", add_.slot, 0
    else:
        mechanism, target = "hook", add_.producer
        shape = captured.output_shapes.get(add_.producer) if add_.producer else None
        axis = _batch_axis([shape] if shape is not None else [], batch)
    return Branch(add_.block, plan.index_of(add_.block), rate, mechanism, target, axis,
                  plan.unit_of_block.get(add_.block))


def _changes(model: nn.Module, branches: list[Branch]) -> list[_Change]:
    """One change per slot or hooked module, built but not applied (the caller applies them in order)."""
    by_target: dict[str, list[Branch]] = {}
    for branch in branches:  # one slot can be called on several branches (timm CaiT, MLP-Mixer)
        by_target.setdefault(branch.target, []).append(branch)
    return [_change(model, mine[0], [b.entry for b in mine if b.entry]) for mine in by_target.values()]


def _silencing_changes(
    model: nn.Module, captured: Capture, branches: list[Branch], skipped: list[Skipped]
) -> list[_Change]:
    """With hooked branches, the model's own drop paths that run get rate 0, so nothing drops twice.

    Only where a model has drop-path slots but none can be filled (see :func:`_select`). Each is a
    change like any other (built here, applied by the caller's transaction): ``strip`` puts the
    library's module back, ``set_rate`` keeps it at 0.
    """
    if not any(b.mechanism == "hook" for b in branches):
        return []
    changes: list[_Change] = []
    for slot in dict.fromkeys(captured.view.slot_calls.values()):
        parent_name, _, attr = slot.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = slot_lib.read_slot(parent, attr)
        rate = slot_lib.existing_rate(original.value)
        if rate == 0.0:
            continue
        drop = DropPath(0.0)
        drop.inserted = True
        drop.train(parent.training)
        changes.append(_Change(parent_name, slot, drop, parent=parent, attr=attr, original=original, silenced=True))
        skipped.append(Skipped(parent_name, f"slot {slot} (rate {rate:.4g}) is also called off the residual "
                                            "branch: held at rate 0 while the branches are hooked"))
    return changes


def _change(model: nn.Module, branch: Branch, entries: list[str]) -> _Change:
    if branch.mechanism == "slot":
        parent_name, _, attr = branch.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = slot_lib.read_slot(parent, attr)
        scale = getattr(original.value, "scale_by_keep", True)
        # a Hugging Face layer would hold HF's own DropPath here, which draws its mask its own way
        draw = "uniform_floor" if type(parent).__module__.startswith("transformers.") else "bernoulli"
        drop = DropPath(branch.rate, scale_by_keep=scale, batch_axis=branch.batch_axis, mode=branch.mode, draw=draw)
        drop.inserted = True
        drop.train(parent.training)  # a new module defaults to training; follow the model's mode
        change = _Change(branch.block, branch.target, drop, parent=parent, attr=attr, original=original)
    else:
        hooked = model.get_submodule(branch.target)
        drop = DropPath(branch.rate, batch_axis=branch.batch_axis, mode=branch.mode)
        drop.inserted = True
        handle = hooked.register_forward_hook(_BranchHook(drop))
        hooked._forward_hooks.pop(handle.id)  # installed by _redo, like every other change
        change = _Change(branch.block, branch.target, drop, hook_id=handle.id, hooked=hooked)
    for entry in entries:
        gathered = model.get_submodule(entry)
        handle = gathered.register_forward_pre_hook(Gather(drop))
        gathered._forward_pre_hooks.pop(handle.id)  # installed by _redo
        change.gathers.append((gathered, handle.id))
    return change


def _redo(model: nn.Module, change: _Change) -> None:
    if change.hooked is not None:
        change.hooked._forward_hooks[change.hook_id] = _BranchHook(change.drop)
    else:
        slot_lib.write_slot(change.parent, change.attr, change.drop)
    change.install_gather()


def _with_entries(
    model: nn.Module,
    branches: list[Branch],
    selected: list[ResidualAdd],
    captured: Capture,
    mode: str,
    reasons: dict[str, str],
) -> list[Branch]:
    """The branches in ``mode``, each with the module a Gather goes on; ``reasons`` gets the others."""
    entries: dict[fx.Node, BranchEntry] = branch_entries(captured.view, selected)
    for branch, residual in zip(branches, selected, strict=True):
        entry = entries[residual.add]
        if branch.target in reasons:  # a slot serving several branches skips only if all of them can
            continue
        if entry.module is None:
            reasons[branch.target] = entry.reason
        elif (norm := _batch_norm_in(model, entry.modules)) is not None:
            reasons[branch.target] = (
                f"{norm} is a BatchNorm: in training it mixes samples"
                if mode == "skip"
                else f"{norm} is a BatchNorm: it cannot run on an empty batch in training"
            )
    return [
        dataclasses.replace(
            branch, mode=mode, entry=None if branch.target in reasons else entries[residual.add].module
        )
        for branch, residual in zip(branches, selected, strict=True)
    ]


def _batch_norm_in(model: nn.Module, names: frozenset[str]) -> str | None:
    for name in sorted(names):
        module = _module_or_none(model, name)
        if module is None:
            continue
        for sub_name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                return f"{name}.{sub_name}" if sub_name else name
    return None


_CHECK_TOLERANCE = 1e-5


def _check_gathers(model: nn.Module, changes: list[_Change], inputs: ExampleInputs) -> dict[_Change, str]:
    """Run each gathered branch's block with fixed masks, on kept rows and in full; return the failures.

    In eval mode (no dropout, no BatchNorm updates) with the drop forced on: first some samples kept,
    then none. Both runs of a block get the same inputs, captured from one eval forward of the model.
    """
    if not changes:
        return {}
    if inputs.batch_size is None or inputs.batch_size < 2:
        return {c: "the check needs example inputs with a batch of at least 2" for c in changes}
    calls: dict[str, tuple[tuple, dict]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, (args, kwargs))

        return hook

    handles = [
        model.get_submodule(name).register_forward_pre_hook(recorder(name), with_kwargs=True)
        for name in dict.fromkeys(c.block for c in changes)
    ]
    try:
        eval_outputs(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    batch = inputs.batch_size
    some = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(batch)])
    failures: dict[_Change, str] = {}
    with training_flags_kept(model, training=False), torch.no_grad():
        for change in changes:
            if change.block not in calls:
                failures[change] = f"{change.block} did not run on the example inputs"
                continue
            block = model.get_submodule(change.block)
            args, kwargs = calls[change.block]
            mode = change.drop.mode
            try:
                reason = _compare_kept(block, change, args, kwargs, some, mode)
                if reason is None:
                    reason = _check_none_kept(block, change, args, kwargs, batch, mode)
                if reason is not None:
                    failures[change] = reason
            except Exception as error:  # noqa: BLE001 - any failure means: compute this branch in full
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                failures[change] = f"it fails on a subset of the batch ({type(error).__name__}: {message[:120]})"
            finally:
                change.drop._forced_keep = None
                change.drop.mode = mode
                change.install_gather()
                change.drop._plan = None
    return failures


def _check_none_kept(block: nn.Module, change: _Change, args: tuple, kwargs: dict, batch: int, mode: str):
    """No sample kept: an empty batch if the branch takes one, else one sample multiplied by zero."""
    none = torch.zeros(batch)
    change.drop.empty_ok = True
    try:
        if _compare_kept(block, change, args, kwargs, none, mode) is None:
            return None
    except Exception:  # noqa: BLE001 - e.g. a reshape with -1 cannot infer a size from 0 elements
        pass
    change.drop.empty_ok = False
    return _compare_kept(block, change, args, kwargs, none, mode)


def _compare_kept(block: nn.Module, change: _Change, args: tuple, kwargs: dict, keep: torch.Tensor, mode: str):
    """Run ``block`` with ``keep`` forced, in full and on kept rows; None if the outputs agree, else why."""
    change.drop._forced_keep = keep
    change.remove_gather()
    change.drop.mode = "sample"
    full = tensor_leaves(block(*_cloned(args), **_cloned(kwargs)))
    change.install_gather()
    change.drop.mode = mode
    kept = tensor_leaves(block(*_cloned(args), **_cloned(kwargs)))
    scale = max((float(t.abs().max()) for t in full if t.numel() and t.is_floating_point()), default=1.0)
    if max_abs_diff(full, kept) <= _CHECK_TOLERANCE * (1.0 + scale):
        return None
    kind = "some samples" if bool(keep.any()) else "no sample"
    return f"computing kept samples only changes the block's output ({kind} kept)"


def _cloned(tree: Any) -> Any:
    return _pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tree)


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
