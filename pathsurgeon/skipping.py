"""Modes ``"skip"`` and ``"batch"``: a branch computes only the samples that keep it.

A :class:`~pathsurgeon.droppath.Gather` forward pre-hook on the branch's way in (its first module, found
on the graph by :func:`pathsurgeon.finder.branch_entries`) draws which rows keep the branch and passes on
only those; the :class:`~pathsurgeon.droppath.DropPath` at the end of the branch scatters the scaled rows
back into a full-size zero tensor, which the block's own code adds to its shortcut. Both are training-time
code (:mod:`pathsurgeon.droppath`); this module is the add-time part: which branches may gather.
In mode ``"skip"`` the draw is per sample, the very draw of mode ``"sample"`` (so under one seed the
same samples are kept); in mode ``"batch"`` it is one draw for the whole batch, as torchvision's
``StochasticDepth(mode="batch")`` makes it.

Before a branch is handed a Gather, :func:`assign_entries` rules out branches that mix samples
(BatchNorm) or have no single way in, and :func:`check_gathers` runs each gathered branch's block with
fixed masks, on the kept rows and in full, on inputs recorded from the example forward: a branch whose
outputs differ computes every sample instead. Every such branch is reported with the reason. The fixed
masks come from check-only hooks (:func:`_forced`), put in for the run and taken out after it: a DropPath
carries no state for these checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.utils import _pytree

from .droppath import DropPath, Gather, KeptRows, draw_rows, mask_shape
from .finder import ResidualAdd, branch_entries
from .runstate import private_rng, training_flags_kept
from .verify import eval_outputs, max_abs_diff, observe, tensor_leaves

if TYPE_CHECKING:  # pragma: no cover
    from .graph import GraphView
    from .inputs import ExampleInputs
    from .report import Branch

# Gather and draw_rows: their import path until pathsurgeon 0.3.0 (a model pickled then names skipping.Gather)
__all__ = ["Gather", "assign_entries", "check_gathers", "check_whole_model", "draw_rows"]


# --- at add time: which branches may skip ----------------------------------------------------------------


class Assigned(NamedTuple):
    """What :func:`assign_entries` decided: the branches with their entries, why the others compute every
    sample, and the BatchNorms of each gathered branch (target → BatchNorm names)."""

    branches: list[Branch]
    reasons: dict[str, str]
    norms: dict[str, tuple[str, ...]]


def assign_entries(
    model: nn.Module,
    branches: list[Branch],
    selected: list[ResidualAdd],
    view: GraphView,
    mode: str,
    batch_norm: str = "fallback",
) -> Assigned:
    """The branches in ``mode``, each with the module a Gather goes on, and why the others compute every
    sample (``reasons``, by target).

    A branch holding a BatchNorm is gathered in mode 'batch' (a kept branch runs on the whole batch, a
    dropped one on no row: its BatchNorms neither compute nor update, as in Huang et al. 2016 and
    Composer's block-wise stochastic depth) and, with ``batch_norm="kept_rows"``, in modes 'skip' and
    'fixed_count' (its BatchNorms see the kept rows only); otherwise it computes every sample.
    ``norms`` (target → BatchNorm names): the BatchNorms of every gathered branch.
    """
    reasons: dict[str, str] = {}
    norms: dict[str, tuple[str, ...]] = {}
    entries = branch_entries(view, selected)
    for branch, residual in zip(branches, selected, strict=True):
        entry = entries[residual.node, residual.slot_call]
        if branch.target in reasons:  # a slot serving several branches skips only if all of them can
            continue
        if entry.module is None:
            reasons[branch.target] = entry.reason
            continue
        found = _batch_norms_in(model, entry.modules)
        if not found:
            continue
        if any(type(model.get_submodule(n)) is nn.SyncBatchNorm for n in found):
            # its statistics are gathered across ranks: an empty or short batch on one rank changes all
            reasons[branch.target] = f"{found[0]} is a SyncBatchNorm: every rank must compute the same rows"
        elif mode == "batch" or batch_norm == "kept_rows":
            norms[branch.target] = tuple(dict.fromkeys((*norms.get(branch.target, ()), *found)))
        else:
            reasons[branch.target] = (
                f"{found[0]} is a BatchNorm: in training it would see the kept samples only "
                "(pass DropPathConfig(..., batch_norm='kept_rows') to accept that)"
            )
    assigned = [
        dataclasses.replace(
            branch, mode=mode,
            entry=None if branch.target in reasons else entries[residual.node, residual.slot_call].module,
        )
        for branch, residual in zip(branches, selected, strict=True)
    ]
    return Assigned(assigned, reasons, norms)


def _batch_norms_in(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The BatchNorms among (and inside) the modules ``names``, by qualified name, each once."""
    found: dict[str, None] = {}
    for name in sorted(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        for sub_name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                found[f"{name}.{sub_name}" if sub_name else name] = None
    return list(found)


class GatheredChange(Protocol):
    """What the check needs of a change (see :class:`pathsurgeon.changes.Change`)."""

    block: str
    drop: DropPath
    norms: tuple[nn.Module, ...]
    gathers: list[tuple[nn.Module, Gather]]
    empty_ok: bool

    def install_gathers(self) -> None: ...

    def remove_gathers(self) -> None: ...


class _ForcedGather(Gather):
    """A Gather that keeps the rows of a fixed 0/1 ``keep`` (in eval too), for the checks only."""

    def __init__(self, drop: DropPath, norms: tuple[nn.Module, ...], empty_ok: bool, keep: torch.Tensor) -> None:
        super().__init__(drop, norms, empty_ok)
        self.keep = keep

    def draw(self, x: torch.Tensor, training: bool) -> KeptRows | None:
        return self.kept(self.keep, x.shape[self.drop.batch_axis], x.device)


@dataclasses.dataclass(frozen=True)
class _Masked:
    """The reference a kept-rows run must give: the branch computed on every row, masked with ``keep``."""

    keep: torch.Tensor
    scale: float

    def apply(self, x: torch.Tensor, batch_axis: int) -> torch.Tensor:
        return x * self.keep.to(device=x.device, dtype=x.dtype).view(mask_shape(x, batch_axis)) * self.scale


class _InFull:
    """A pre-hook for the checks only: the branch computes every row, its DropPath masks them (:class:`_Masked`)."""

    def __init__(self, drop: DropPath, keep: torch.Tensor) -> None:
        self.drop, self.keep = drop, keep

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.drop.kept_rows = _Masked(self.keep, self.drop.scale())


_CHECK_TOLERANCE = 1e-5


def check_whole_model(model: nn.Module, changes: list[GatheredChange], inputs: ExampleInputs) -> bool:
    """Every gathered branch at once, on whole-model eval forwards: the cheap first try of the check.

    With the drop forced on, sample 0 keeping every branch and the other samples none, the model on
    kept rows must give what it gives in full (each branch computed on the whole batch, then masked:
    a branch that mixes samples shows at sample 0); with no sample kept (each branch on an empty
    batch), the samples after the first must give what they give in full. Three forwards, about three
    samples' worth, where checking block by block re-runs each block four times. False on any error,
    difference, or outputs whose batch axis is not plain: the caller then checks block by block
    (:func:`check_gathers`), which names the branches that must compute every sample. Every change is
    back as it was, with ``empty_ok`` set where this passed.
    """
    batch = inputs.batch_size
    if not changes or batch is None or batch < 2:
        return False
    first = torch.zeros(batch)
    first[0] = 1.0
    passed = False
    try:
        with _forced(changes, [first] * len(changes), in_full=True):
            full = eval_outputs(model, inputs)  # the model's own code on every row, each branch masked
        with _forced(changes, [first] * len(changes)):
            kept = eval_outputs(model, inputs)
        with _forced(changes, [torch.zeros(batch - 1)] * len(changes), empty_ok=True):
            none_kept = eval_outputs(model, inputs.samples(1, batch))
        axes = _batch_axes(full, none_kept)
        passed = (
            axes is not None
            and max_abs_diff(full, kept) <= _tolerance(full)
            and max_abs_diff([t.narrow(a, 1, batch - 1) for t, a in zip(full, axes, strict=True)], none_kept)
            <= _tolerance(full)
        )
    except Exception:  # noqa: BLE001 - checked block by block, which says why
        passed = False
    if passed:
        for change in changes:
            change.empty_ok = True
    return passed


@contextlib.contextmanager
def _forced(
    changes: list[GatheredChange], keeps: list[torch.Tensor], in_full: bool = False, empty_ok: bool | None = None
) -> Iterator[None]:
    """Inside: the drop of each change forced on with its ``keeps`` (which rows keep the branch), by
    check-only pre-hooks in place of its Gathers: on the kept rows (no sample kept: an empty batch if
    ``empty_ok``, by default the change's own), or ``in_full``: every row computed, then masked (the
    reference). Afterwards every change has its own Gathers back and no kept rows left over."""
    handles = []
    try:
        for change, keep in zip(changes, keeps, strict=True):
            change.remove_gathers()
            ok = change.empty_ok if empty_ok is None else empty_ok
            for module, gather in change.gathers:
                hook = _InFull(change.drop, keep) if in_full else _ForcedGather(change.drop, gather.norms, ok, keep)
                handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for change in changes:
            change.drop.kept_rows = None
            change.install_gathers()


def _batch_axes(outputs: list[torch.Tensor], fewer: list[torch.Tensor]) -> list[int] | None:
    """Per output, the one axis where the batch's outputs and those of all but its first sample differ
    in length (by one), or None if any output has not exactly one such axis."""
    if len(outputs) != len(fewer):
        return None
    axes = []
    for whole, part in zip(outputs, fewer, strict=True):
        if whole.dim() != part.dim():
            return None
        differ = [i for i, (a, b) in enumerate(zip(whole.shape, part.shape, strict=True)) if a != b]
        if len(differ) != 1 or whole.shape[differ[0]] != part.shape[differ[0]] + 1:
            return None
        axes.append(differ[0])
    return axes


def _tolerance(outputs: list[torch.Tensor]) -> float:
    scale = max((float(t.abs().max()) for t in outputs if t.numel() and t.is_floating_point()), default=1.0)
    return _CHECK_TOLERANCE * (1.0 + scale)


def check_gathers(
    model: nn.Module,
    changes: list[GatheredChange],
    inputs: ExampleInputs,
    block_inputs: dict[str, tuple[tuple, dict]] | None = None,
) -> dict[GatheredChange, str]:
    """Check that the gathered branches compute on kept rows what they compute in full; the failures.

    First all at once on the whole model (:func:`check_whole_model`). Where that fails, each block on
    its own, run with fixed masks, on kept rows and in full, in eval mode (no dropout, no BatchNorm
    updates) with the drop forced on: first some samples kept, then none. Both runs of a block get the
    inputs it receives in an eval forward of ``inputs`` (``block_inputs``: block name → ``(args,
    kwargs)``, recorded here if not given) and the same RNG state. The branches of one block are
    checked together first (each keeps other samples, as independent draws would); only a block where
    that fails is checked branch by branch, to name the branch. Branches with BatchNorms are then
    checked in training (:func:`_check_norms_left_alone`).
    """
    if not changes:
        return {}
    batch = inputs.batch_size
    if batch is None or batch < 2:
        return {c: "the check needs example inputs with a batch of at least 2" for c in changes}
    compared = check_whole_model(model, changes, inputs)
    if compared:  # only the BatchNorm checks are left
        changes = [c for c in changes if getattr(c, "norms", ())]
        if not changes:
            return {}
    if block_inputs is None:  # an eval forward: the surgered model computes there what the untouched one did
        block_inputs = observe(model, inputs, inputs_of={c.block for c in changes}).block_inputs
    blocks: dict[str, list[GatheredChange]] = {}
    for change in changes:
        blocks.setdefault(change.block, []).append(change)
    failures: dict[GatheredChange, str] = {}
    with training_flags_kept(model, training=False), torch.no_grad():
        for name, group in blocks.items():
            if name not in block_inputs:
                failures.update((c, f"{name} did not run on the example inputs") for c in group)
                continue
            block = model.get_submodule(name)
            args, kwargs = block_inputs[name]
            if not compared and not (len(group) > 1 and _together(model, block, group, args, kwargs, batch)):
                for change in group:
                    reason = _alone(model, block, change, args, kwargs, batch)
                    if reason is not None:
                        failures[change] = reason
            for change in group:
                if getattr(change, "norms", ()) and change not in failures:
                    reason = _check_norms_left_alone(model, block, change, args, kwargs, batch)
                    if reason is not None:
                        failures[change] = reason
    return failures


def _check_norms_left_alone(model, block, change: GatheredChange, args: tuple, kwargs: dict, batch: int):
    """A gathered branch with BatchNorms, in training: None if a dropped call leaves every buffer of
    its BatchNorms as it was (nothing computed, nothing counted) and, where one sample can be kept
    (modes 'skip', 'fixed_count'), the BatchNorms train on it; else why not. The block's buffers (the
    shortcut's BatchNorms update in training too) and train/eval flags are restored afterwards."""
    if not change.empty_ok:
        return (f"{_name_in(model, change.norms[0])} is a BatchNorm and the branch cannot run on an empty batch: "
                "a dropped branch would still update it")
    saved = [(buffer, buffer.clone()) for buffer in block.buffers()]
    before = [[b.clone() for b in norm.buffers()] for norm in change.norms]
    try:
        for keep, what in ((torch.zeros(batch), "no sample kept"), (torch.eye(batch)[0], "one sample kept")):
            if what == "one sample kept" and change.drop.mode == "batch":  # a kept branch sees the whole batch
                break
            try:
                with _forced([change], [keep]), training_flags_kept(block, training=True), private_rng(model):
                    block(*_cloned(args), **_cloned(kwargs))
            except Exception as error:  # noqa: BLE001 - any failure means: compute this branch in full
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                return f"a BatchNorm branch fails in training with {what} ({type(error).__name__}: {message[:100]})"
            if what == "no sample kept":
                after = [list(norm.buffers()) for norm in change.norms]
                for norm, old, new in zip(change.norms, before, after, strict=True):
                    if any(not torch.equal(x, y) for x, y in zip(old, new, strict=True)):
                        return f"{_name_in(model, norm)} is a BatchNorm that a dropped branch still updates"
        return None
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _name_in(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), type(module).__name__)


def _together(model, block, group: list[GatheredChange], args: tuple, kwargs: dict, batch: int) -> bool:
    """All branches of ``block`` at once: true if they agree with some and with no samples kept."""
    try:
        some = [_alternate(batch, k) for k in range(len(group))]
        if _compare_kept(model, block, group, args, kwargs, some) is not None:
            return False
        for change in group:
            change.empty_ok = True
        return _compare_kept(model, block, group, args, kwargs, [torch.zeros(batch)] * len(group)) is None
    except Exception:  # noqa: BLE001 - checked branch by branch, which says why
        return False


def _alone(model, block, change: GatheredChange, args: tuple, kwargs: dict, batch: int) -> str | None:
    """One branch of ``block``, the others computing in full: None if it agrees, else why not."""
    try:
        reason = _compare_kept(model, block, [change], args, kwargs, [_alternate(batch, 0)])
        if reason is None:
            reason = _check_none_kept(model, block, change, args, kwargs, batch)
        return reason
    except Exception as error:  # noqa: BLE001 - any failure means: compute this branch in full
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"it fails on a subset of the batch ({type(error).__name__}: {message[:120]})"


def _alternate(batch: int, offset: int) -> torch.Tensor:
    """Every other sample kept, starting at sample ``offset % 2``."""
    return torch.tensor([1.0 if (i + offset) % 2 == 0 else 0.0 for i in range(batch)])


def _check_none_kept(model, block, change: GatheredChange, args: tuple, kwargs: dict, batch: int):
    """No sample kept: an empty batch if the branch takes one, else one sample multiplied by zero."""
    none = [torch.zeros(batch)]
    change.empty_ok = True
    try:
        if _compare_kept(model, block, [change], args, kwargs, none) is None:
            return None
    except Exception:  # noqa: BLE001 - e.g. a reshape with -1 cannot infer a size from 0 elements
        pass
    change.empty_ok = False
    return _compare_kept(model, block, [change], args, kwargs, none)


def _compare_kept(
    model, block, changes: list[GatheredChange], args: tuple, kwargs: dict, keeps: list[torch.Tensor]
) -> str | None:
    """Run ``block`` with ``keeps`` forced on ``changes``, in full and on kept rows; None if the outputs
    agree, else why. Every change is back in its own mode with its Gathers installed when it returns."""
    with _forced(changes, keeps, in_full=True), private_rng(model):
        full = tensor_leaves(block(*_cloned(args), **_cloned(kwargs)))
    with _forced(changes, keeps), private_rng(model):
        kept = tensor_leaves(block(*_cloned(args), **_cloned(kwargs)))
    if max_abs_diff(full, kept) <= _tolerance(full):
        return None
    kind = "some samples" if any(bool(keep.any()) for keep in keeps) else "no sample"
    return f"computing kept samples only changes the block's output ({kind} kept)"


def _cloned(tree: Any) -> Any:
    return _pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tree)
