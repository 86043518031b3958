"""The changes pathsurgeon makes to a model, the one record of them, and the transaction around them.

A :class:`Change` is one slot filled or one forward hook registered (plus, in modes 'skip', 'batch' and
'fixed_count', the :class:`~pathsurgeon.droppath.Gather` pre-hooks feeding it); it knows how to put itself in and take
itself out. Every change of one ``add`` is listed in a :class:`Record` kept on the model itself
(``model._pathsurgeon``), which is what ``set_rate`` re-rates and ``strip`` undoes. Changes are made
inside a :class:`Transaction`, which undoes them, newest first, if anything goes wrong — an
exception or an interrupt — so a model is either untouched or completely changed.

How a branch is changed, in order of preference:

1. **slot**: the branch passes through a drop-path slot (timm ``DropPath`` / ``nn.Identity`` / ``None``,
   torchvision ``StochasticDepth``, HF ``XxxDropPath``): the slot gets pathsurgeon's DropPath. Existing
   drop paths are re-rated this way, never stacked.
2. **hook**: the model has no slots to fill and the branch is the output of a child module of the
   block: a forward hook on that module applies drop path to its output.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import slots as slot_lib
from .droppath import BranchHook, DropPath, Gather  # BranchHook: its import path until pathsurgeon 0.3.0
from .errors import AlreadySurgeredError, PathSurgeonError
from .report import Branch, Fallback, LeftAlone

if TYPE_CHECKING:  # pragma: no cover
    from .config import DropPathConfig
    from .rates import LibraryRates

__all__ = [
    "RECORD_ATTRIBUTE",
    "BranchHook",
    "Change",
    "Record",
    "Transaction",
    "build_changes",
    "record_of",
    "refuse_existing_surgery",
    "silencing_changes",
    "surgered_submodules",
    "unrecorded_changes",
]

RECORD_ATTRIBUTE = "_pathsurgeon"


@dataclass(eq=False)
class Change:
    """One change to the model: :meth:`install` makes it, :meth:`undo` restores exactly what was there.

    Both are safe to call when the other did not finish, so a transaction can always undo. Hooks go in
    through torch's ``register_forward_hook`` / ``register_forward_pre_hook``, and out through the
    handles they return, kept here (a handle pickles and deep-copies along with the module's hooks).
    """

    block: str
    target: str  # the slot, or the hooked module
    drop: DropPath
    parent: nn.Module | None = None
    attr: str | None = None
    original: slot_lib.SlotContent | None = None
    hooked: nn.Module | None = None
    handle: RemovableHandle | None = None  # the BranchHook's on ``hooked``, while installed
    # modes 'skip' / 'batch' / 'fixed_count': each Gather feeding this drop path and the module it hooks
    # (several when one slot serves several branches: timm MLP-Mixer, CaiT), and their handles while installed
    gathers: list[tuple[nn.Module, Gather]] = field(default_factory=list)
    gather_handles: list[RemovableHandle] = field(default_factory=list)
    silenced: bool = False  # a library drop path held at rate 0 (see silencing_changes); not a branch
    norms: tuple[nn.Module, ...] = ()  # the BatchNorms on a gathered branch (see droppath.Gather)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled by pathsurgeon <= 0.3.0: its hooks named by their ids in the modules' hook dicts
        hook_id = state.pop("hook_id", None)
        if hook_id is not None and state.get("hooked") is not None:
            state["handle"] = _handle(state["hooked"]._forward_hooks, hook_id)
        if "gather_handles" not in state:
            ids = [(module, hook_id) for module, hook_id in state.get("gathers", ())
                   if hook_id in module._forward_pre_hooks]
            state["gathers"] = [(module, module._forward_pre_hooks[hook_id]) for module, hook_id in ids]
            state["gather_handles"] = [_handle(module._forward_pre_hooks, hook_id) for module, hook_id in ids]
        self.__dict__.update(state)

    @property
    def empty_ok(self) -> bool:
        """Whether the branch runs on an empty batch when no sample keeps it (see :class:`Gather`)."""
        return all(gather.empty_ok for _, gather in self.gathers)

    @empty_ok.setter
    def empty_ok(self, value: bool) -> None:
        for _, gather in self.gathers:
            gather.empty_ok = value

    def install(self) -> None:
        if self.parent is not None:
            # what the slot held, known by its DropPath too: a tree that outlives its record (PEFT's
            # merge_and_unload returns the model inside the PeftModel that held it) can still be stripped
            _SLOT_HELD[self.drop] = self.original
        if self.hooked is not None:
            if self.handle is None or self.handle.id not in self.hooked._forward_hooks:
                self.handle = self.hooked.register_forward_hook(BranchHook(self.drop))
        else:
            assert self.parent is not None and self.attr is not None  # a slot change records its slot
            slot_lib.write_slot(self.parent, self.attr, self.drop)
        self.install_gathers()

    def undo(self) -> None:
        self.remove_gathers()
        if self.hooked is not None:
            if self.handle is not None:
                self.handle.remove()
        else:
            # a slot change records its slot and what it held
            assert self.parent is not None and self.attr is not None and self.original is not None
            slot_lib.restore_slot(self.parent, self.attr, self.original)

    def install_gathers(self) -> None:
        self.remove_gathers()
        for module, gather in self.gathers:
            self.gather_handles.append(module.register_forward_pre_hook(gather))

    def remove_gathers(self) -> None:
        while self.gather_handles:
            self.gather_handles.pop().remove()
        self.drop.kept_rows = None


# what each inserted DropPath's slot held (see Change.install); a tree copied or unpickled without its
# record is stripped to an empty slot, as are those of pathsurgeon versions that did not keep it
_SLOT_HELD: weakref.WeakKeyDictionary[DropPath, slot_lib.SlotContent | None] = weakref.WeakKeyDictionary()


def _handle(hooks: dict[int, Any], hook_id: int) -> RemovableHandle:
    """A handle on the hook registered as ``hook_id`` in ``hooks``, as torch unpickles one (so that the
    ids torch hands out next never collide with it)."""
    handle = RemovableHandle.__new__(RemovableHandle)
    handle.__setstate__((hooks, hook_id))
    return handle


@dataclass
class Record:
    """Everything pathsurgeon changed on a model, kept on the model as ``model._pathsurgeon``.

    ``config``: the settings ``add`` was given; ``rate`` / ``schedule``: the ones in effect now (moved
    by ``set_rate``). ``blocks``: the blocks in execution order, as planned (the depth units the
    schedule counts). ``parts``: one ``parts.PartState`` per planned part, each holding its library's
    rates for ``schedule="auto"``, asked at most once.
    """

    config: DropPathConfig
    changes: list[Change]
    branches: list[Branch]
    blocks: list[str]
    method: str
    rate: float | None
    schedule: str | list[float]
    fallbacks: list[Fallback] = field(default_factory=list)
    rates_from: str = "linear over found units"
    parts: list[Any] = field(default_factory=list)  # parts.PartState, one per planned part: set_rate re-rates each
    inputs_given: bool = False  # add ran on the caller's example_inputs (save records it; load asks for them)
    # a weak reference to the module the record is kept on: copy.copy(model) shares the record (and every
    # submodule) with the original, and must not strip or re-rate it from there; a pickled or deep-copied
    # record is bound again to the module that holds it, the first time it is read there
    owner: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "owner": None}

    def bind(self, model: nn.Module) -> None:
        self.owner = weakref.ref(model)

    @property
    def library(self) -> LibraryRates | None:
        """The library's rates of a model that is one part, itself; None for a model of several parts.

        Read from the part, never copied (a record pickled by 0.3.0 may still carry a copy, unused).
        """
        return self.parts[0].library if self._one_part() else None

    @property
    def library_asked(self) -> bool:
        return bool(self._one_part() and self.parts[0].library_asked)

    def _one_part(self) -> bool:
        return [state.part.path for state in self.parts] == [""]

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def targets(self) -> list[dict[str, Any]]:
        """Exactly what was changed, slot by slot and hook by hook (what a saved checkpoint lists)."""
        return [
            {"target": c.target, "mechanism": "hook" if c.hooked is not None else "slot", "block": c.block,
             "silenced": c.silenced}
            for c in self.changes
        ]


class Transaction:
    """Changes to a model that are all undone, newest first, if the ``with`` block raises anything.

    ``do(apply, undo)`` registers ``undo`` *before* calling ``apply``, and every undo restores a saved
    state (it is safe to run when ``apply`` did not finish), so an exception or a KeyboardInterrupt at
    any point leaves the model as it was before the block. The undo itself cannot be interrupted:
    SIGINT / SIGTERM / SIGHUP arriving while it runs are delivered once it is done, and an undo that
    raises does not stop the others.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> Transaction:
        return self

    def do(self, apply: Callable[[], None], undo: Callable[[], None]) -> None:
        self._undo.append(undo)
        apply()

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            return
        failure: BaseException | None = None
        with _signals_deferred():  # a second Ctrl-C must not stop the rollback half-way
            while self._undo:
                try:
                    self._undo.pop()()
                except Exception as undo_error:  # noqa: BLE001 - the other undos still run; the first error is raised
                    failure = failure or undo_error
        if failure is not None:
            raise failure


_DEFERRED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP until the block is done, then deliver them to the handlers that were set.

    Only the main thread can set handlers; elsewhere the block runs as it is (signals go to the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    for name in _DEFERRED_SIGNALS:
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) is None:  # absent here, or a handler set outside Python
            continue
        previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)  # now, to the program's own handler (KeyboardInterrupt, exit, ...)


# --- the record on the model ---------------------------------------------------------------------------


def _holds_record(module: nn.Module) -> bool:
    """Whether ``module`` holds a record in effect: its own, or its original's while the original holds it
    too (a ``copy.copy``); not a copy's record whose original was stripped since (stale, nothing to act on)."""
    record = vars(module).get(RECORD_ATTRIBUTE)
    if record is None:
        return False
    owner = record.owner() if isinstance(record.owner, weakref.ref) else None
    return owner is None or owner is module or vars(owner).get(RECORD_ATTRIBUTE) is record


def record_of(model: nn.Module) -> Record | None:
    """The record ``add`` kept on ``model``; refused when it belongs to another module (a ``copy.copy``)."""
    record = vars(model).get(RECORD_ATTRIBUTE)
    if record is None or not _holds_record(model):
        return None  # none, or a copy.copy's stale one: its original was stripped
    owner = record.owner() if isinstance(record.owner, weakref.ref) else None
    if owner is None:  # unpickled, deep-copied, or its module is gone: this module holds it alone now
        record.bind(model)
    elif owner is not model:
        raise PathSurgeonError(
            f"this {type(model).__name__} holds the pathsurgeon record of another {type(owner).__name__}, "
            "with which it shares its submodules (copy.copy of a surgered model?): use copy.deepcopy for a "
            "model of its own, or call strip / set_rate on the original"
        )
    return record


def surgered_submodules(model: nn.Module, include_root: bool = False) -> list[str]:
    """Names of the modules in ``model``'s tree that hold a surgery record ('' is the model itself)."""
    return [
        name for name, module in model.named_modules()
        if (include_root or name) and _holds_record(module)
    ]


def refuse_existing_surgery(model: nn.Module) -> None:
    """One surgery per module tree: a second one would drop some branches twice."""
    record = record_of(model)
    if record is not None:
        raise AlreadySurgeredError(
            f"model already carries pathsurgeon DropPath on {len(record.branches)} branches; "
            "use pathsurgeon.set_rate(model, rate) to change rates, or pathsurgeon.strip(model) first"
        )
    inner = surgered_submodules(model)
    if inner:
        raise AlreadySurgeredError(
            f"submodule {inner[0]!r} of this model was already surgered by pathsurgeon.add; adding again would "
            "drop its branches twice: call pathsurgeon.strip(model) first, or set_rate on that submodule"
        )
    for name, module in model.named_modules():
        leftover = None
        if isinstance(module, DropPath) and module.inserted:
            leftover = "pathsurgeon's DropPath"
        elif any(isinstance(h, BranchHook) for h in module._forward_hooks.values()):
            leftover = "a pathsurgeon drop-path hook"
        elif any(isinstance(h, Gather) for h in module._forward_pre_hooks.values()):
            leftover = "a pathsurgeon gather hook"
        if leftover is not None:
            raise AlreadySurgeredError(
                f"{name or 'the model'} holds {leftover} that no surgery record in this model accounts for (taken "
                "out of a surgered model, e.g. by PEFT's merge_and_unload?); call pathsurgeon.strip(model) first"
            )


def unrecorded_changes(model: nn.Module) -> list[Change]:
    """pathsurgeon's modules and hooks in ``model``'s tree that no record in the tree accounts for.

    A record lives on the module ``add`` was given; a tree taken out of that module (PEFT's
    ``merge_and_unload()`` returns the base model inside the ``PeftModel``) carries the changes without
    it. Each one is rebuilt as a :class:`Change` from what it holds, so ``strip`` undoes it all the same.
    """
    recorded = {id(c.drop) for name in surgered_submodules(model, include_root=True)
                for c in vars(model.get_submodule(name))[RECORD_ATTRIBUTE].changes}  # each holds one
    found: list[Change] = []
    for name, module in model.named_modules():
        for attr, child in list(module._modules.items()):
            if isinstance(child, DropPath) and child.inserted and id(child) not in recorded:
                original = _SLOT_HELD.get(child)
                if original is None:  # not known here (see _SLOT_HELD): an empty slot is what it was
                    original = slot_lib.SlotContent(nn.Identity(), True)
                found.append(Change(name, f"{name}.{attr}".lstrip("."), child, parent=module, attr=attr,
                                    original=original))
        for hook_id, hook in list(module._forward_hooks.items()):
            if isinstance(hook, BranchHook) and id(hook.drop) not in recorded:
                handle = _handle(module._forward_hooks, hook_id)
                found.append(Change(name, name, hook.drop, hooked=module, handle=handle))
    by_drop = {id(change.drop): change for change in found}
    for module in model.modules():  # a Gather belongs to the change of the DropPath it feeds
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, Gather) and id(hook.drop) in by_drop:
                by_drop[id(hook.drop)].gathers.append((module, hook))
                by_drop[id(hook.drop)].gather_handles.append(_handle(module._forward_pre_hooks, hook_id))
    return found


# --- building changes (not applied: the caller's transaction applies them) -----------------------------


def build_changes(
    model: nn.Module, branches: list[Branch], norms: dict[str, tuple[str, ...]] | None = None
) -> list[Change]:
    """One change per slot or hooked module (one slot can serve several branches: timm CaiT, MLP-Mixer).

    ``norms``: target → the BatchNorms on its gathered branches (from :func:`~pathsurgeon.skipping.assign_entries`).
    """
    by_target: dict[str, list[Branch]] = {}
    for branch in branches:
        by_target.setdefault(branch.target, []).append(branch)
    norms = norms or {}
    return [
        _change(model, mine[0], [b.entry for b in mine if b.entry],
                tuple(model.get_submodule(n) for n in norms.get(mine[0].target, ())))
        for mine in by_target.values()
    ]


def _change(model: nn.Module, branch: Branch, entries: list[str], norms: tuple[nn.Module, ...] = ()) -> Change:
    if branch.mechanism == "slot":
        parent_name, _, attr = branch.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = slot_lib.read_slot(parent, attr)
        scale = getattr(original.value, "scale_by_keep", True)
        # a Hugging Face layer would hold HF's own DropPath here, which draws its mask its own way
        draw = "uniform_floor" if type(parent).__module__.startswith("transformers.") else "bernoulli"
        drop = _inserted(DropPath(branch.rate, scale_by_keep=scale, batch_axis=branch.batch_axis, mode=branch.mode,
                                  draw=draw), parent)
        change = Change(branch.block, branch.target, drop, parent=parent, attr=attr, original=original)
    else:
        hooked = model.get_submodule(branch.target)
        drop = _inserted(DropPath(branch.rate, batch_axis=branch.batch_axis, mode=branch.mode), hooked)
        change = Change(branch.block, branch.target, drop, hooked=hooked)  # hooks go in with Change.install
    if entries:
        change.norms = norms
    change.gathers = [(model.get_submodule(entry), Gather(drop, change.norms)) for entry in entries]
    return change


def _inserted(drop: DropPath, owner: nn.Module) -> DropPath:
    drop.inserted = True
    drop.train(owner.training)  # a new module defaults to training; follow the model's mode
    return drop


def silencing_changes(
    model: nn.Module, slot_calls: list[str], branches: list[Branch]
) -> list[Change]:
    """With hooked branches, the model's own drop paths that run get rate 0, so nothing drops twice.

    Only where a model has drop-path slots but none can be filled (HF CvT; see
    :func:`pathsurgeon.finder.select`). ``slot_calls``: the slots the model calls. ``strip`` puts the
    library's module back, ``set_rate`` keeps it at 0; :func:`silenced_left_alone` says why, for the report.
    """
    if not any(b.mechanism == "hook" for b in branches):
        return []
    changes: list[Change] = []
    for slot in dict.fromkeys(slot_calls):
        parent_name, _, attr = slot.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = slot_lib.read_slot(parent, attr)
        rate = slot_lib.existing_rate(original.value)
        if rate == 0.0:
            continue
        drop = _inserted(DropPath(0.0), parent)
        changes.append(Change(parent_name, slot, drop, parent=parent, attr=attr, original=original, silenced=True))
    return changes


def silenced_left_alone(changes: list[Change]) -> list[LeftAlone]:
    """What the report lists for each of :func:`silencing_changes`' slots: held at 0, and why."""
    return [
        LeftAlone(change.block, f"slot {change.target} (rate {slot_lib.existing_rate(change.original.value):.4g}) "
                                "is also called off the residual branch: held at rate 0 while the branches are "
                                "hooked")
        for change in changes if change.silenced and change.original is not None
    ]
