"""What a surgered model carries and runs while it trains: :class:`DropPath` and its hooks, nothing else.

Modes (the identity in eval): 'sample', timm's; 'skip' / 'batch' / 'fixed_count' (DINOv2's), where a
:class:`Gather` pre-hook on the branch's first module draws the kept rows (per sample, once per batch as
torchvision's ``StochasticDepth(mode="batch")``, or exactly ``max(int(B * (1 - rate)), 1)`` of them),
passes on only those, and the DropPath scatters them back. Every mask is drawn by
:func:`pathsurgeon.masks.keep_mask`; which branches may gather is decided at add time (:mod:`.skipping`).
"""

from __future__ import annotations

import weakref
from typing import Any, cast

import torch
from torch import fx, nn

from .config import MODES, validate_mode, validate_rate
from .errors import ScriptingError
from .masks import (
    DRAWS,
    Handover,
    KeptRows,
    batch_kept,
    draw_rows,
    drop_path,
    drop_path_mask,
    fixed_count,
    fixed_count_mask,
    fixed_count_rows,
    keep_mask,
    mask_shape,
    scaled,
    traced_drop_path,
)

# the mask functions too: their import path until pathsurgeon 0.3.0
__all__ = ["DRAWS", "MODES", "BranchHook", "DropPath", "Gather", "KeptRows", "draw_rows", "drop_path",
           "drop_path_mask", "fixed_count", "fixed_count_mask", "fixed_count_rows", "keep_mask", "mask_shape",
           "traced_drop_path"]

# DropPaths pickled by pathsurgeon <= 0.3.0 whose branch cannot run on an empty batch (see Gather.empty_ok)
_REFUSED_EMPTY: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (the module pathsurgeon inserts). No parameters, no buffers:
    inserting it never changes a ``state_dict``. ``drop_prob`` aliases ``rate``, as in timm's DropPath."""

    def __init__(self, rate: float = 0.0, scale_by_keep: bool = True, batch_axis: int = 0, mode: str = "sample",
                 draw: str = "bernoulli") -> None:
        super().__init__()
        # the rate twice: a float for eager code, a 0-d float64 CPU tensor compiled code reads at run time
        # (no buffer: out of state_dict, off the device, out of DDP's broadcast)
        self._rate_tensor = torch.zeros((), dtype=torch.float64)
        self.rate = rate
        self.scale_by_keep = bool(scale_by_keep)
        self.batch_axis = int(batch_axis)
        self.mode = validate_mode(mode)
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
        self.draw = draw
        self.inserted = False  # put in by pathsurgeon.add (a user's own DropPath layers are False)
        self.kept_rows: Handover | None = None  # left by its Gather for the coming call only; never pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "kept_rows": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled by pathsurgeon <= 0.3.0: the state its add-time checks kept here is dropped
        if state.pop("empty_ok", True) is False:
            _REFUSED_EMPTY.add(self)
        for old in ("forced_keep", "replaced"):
            state.pop(old, None)
        super().__setstate__({**state, "kept_rows": None})

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = validate_rate(value)
        self._rate_tensor.fill_(self._rate)

    @property
    def drop_prob(self) -> float:
        return self.rate

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self.rate = value

    # TorchScript compiles forward and what it calls, never these properties (a property that fails to
    # compile stays half-defined on the class for every later torch.jit.script in the process)
    __jit_unused_properties__ = ["rate", "drop_prob"]
    __jit_ignored_attributes__ = ["rate", "drop_prob", "kept_rows"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scripted_forward(x) if torch.jit.is_scripting() else self._python_forward(x)

    @torch.jit.unused
    def _python_forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            # one call_module node whatever the tracer's leaf rules, so the traced module calls this very
            # DropPath (training and eval alike, set_rate followed); outside the traced tree: written in
            tracer = cast(fx.Tracer, x.tracer)
            try:
                return tracer.create_proxy("call_module", tracer.path_of_module(self), (x,), {})
            except NameError:
                return traced_drop_path(self, x, self.training)
        return self.apply_to(x, self.training)

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript runs no Python hooks (nor scripts a model with Gathers): every row computed, the eager draws."""
        if not self.training or self._rate == 0.0:
            return x
        keep = 1.0 - self._rate
        if self.mode == "batch":
            return x * (batch_kept(x, keep).double() * (1.0 / keep if self.scale_by_keep else 1.0))
        if self.mode == "fixed_count":
            return x * fixed_count_mask(x, self._rate, self.batch_axis)
        shape = [1] * x.dim()
        shape[self.batch_axis] = x.size(self.batch_axis)
        return scaled(x, keep_mask(x, shape, keep, self.draw), keep, self.scale_by_keep, self.draw)

    def apply_to(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Drop path on the branch output ``x``; ``training`` is the flag of the module it belongs to."""
        if self.kept_rows is not None:  # a Gather ran the branch on the rows it kept: scatter them back
            rows, self.kept_rows = self.kept_rows, None
            return rows.apply(x, self.batch_axis)
        if self.mode == "batch" and training:  # no Gather: the whole batch computed, kept or zeroed
            return x * self._batch_factor(x)
        if self.mode == "fixed_count" and training:  # no Gather: every row computed, the same draw
            rows, scale = fixed_count_rows(self._rate_tensor, x.shape[self.batch_axis], x.device)
            mask = x.new_zeros(x.shape[self.batch_axis]).index_fill(0, rows, 1.0) * scale
            return x * mask.view(mask_shape(x, self.batch_axis))
        if not training:
            return x
        if torch.compiler.is_compiling():  # the same draw, but the graph must not depend on the rate
            shape = list(mask_shape(x, self.batch_axis))
            return x * drop_path_mask(self._rate_tensor, shape, x.dtype, x.device, self.scale_by_keep, self.draw)
        return drop_path(x, self.rate, training, self.scale_by_keep, self.batch_axis, self.draw)

    def scale(self) -> float:
        """What kept samples are multiplied by: ``1 / (1 - rate)``, or 1 without ``scale_by_keep``."""
        return 1.0 / (1.0 - self.rate) if self.scale_by_keep else 1.0

    def scale_tensor(self) -> torch.Tensor:
        return torch.tensor(self.scale(), dtype=torch.float64)  # 0-d CPU: multiplies any device, any dtype

    @torch.compiler.disable  # a random decision on the host: under torch.compile, a graph break here
    def _batch_factor(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.rate == 0.0 or bool(batch_kept(x, 1.0 - self.rate))
        return self.scale_tensor() if kept else torch.zeros((), dtype=torch.float64)

    def extra_repr(self) -> str:
        text = f"rate={self.rate:.4g}"
        for name, default in (("mode", "sample"), ("scale_by_keep", True), ("batch_axis", 0), ("draw", "bernoulli")):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)!r}"
        return text


class BranchHook:
    """Forward hook applying drop path to a module's output, with the module's training flag; of a tuple
    (Hugging Face attention: output, weights), to its first element."""

    def __init__(self, drop: DropPath) -> None:
        self.drop = drop

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) and output else output
        dropped: Any
        if isinstance(first, fx.Proxy):  # torch.fx traces through the hooked module: the drop goes in the graph
            dropped = traced_drop_path(self.drop, first, module.training)
        elif isinstance(first, torch.Tensor):
            dropped = self.drop.apply_to(first, module.training)
        else:
            return output
        return (dropped, *output[1:]) if first is not output else dropped

    @property
    def __name__(self) -> str:  # torch.jit.script compiles hooks from their source, by name: say why it cannot
        raise ScriptingError("torch.jit.script cannot compile pathsurgeon's drop-path forward hooks (they hold a "
                             "Python DropPath): script the model after pathsurgeon.strip(model)")


class Gather:
    """Forward pre-hook on a branch's first module (modes 'skip', 'batch', 'fixed_count'): draws its
    DropPath's kept rows and passes on only those. The module's first positional argument is the branch's
    only input with a batch axis (add checks that). ``norms``: the BatchNorms on the branch (see
    :class:`KeptRows`); ``empty_ok``: whether the branch runs on an empty batch when no sample keeps it
    (False, found by add's checks, e.g. a reshape with -1 in it: one sample runs, multiplied by zero)."""

    def __init__(self, drop: DropPath, norms: tuple[nn.Module, ...] = (), empty_ok: bool = True) -> None:
        self.drop = drop
        self.norms = norms
        self.empty_ok = empty_ok

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "empty_ok" not in state:  # pickled by pathsurgeon <= 0.3.0, which kept it on the DropPath
            self.empty_ok = self.drop not in _REFUSED_EMPTY

    @property
    def __name__(self) -> str:  # see BranchHook.__name__
        raise ScriptingError(f"torch.jit.script cannot compile the Python pre-hooks of mode {self.drop.mode!r}: "
                             "add with mode='sample', or script the model after pathsurgeon.strip(model)")

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        rows = self.draw(args[0], module.training) if args and isinstance(args[0], torch.Tensor) else None
        self.drop.kept_rows = rows
        if rows is None or rows.index is None:
            return None
        return (args[0].index_select(self.drop.batch_axis, rows.index), *args[1:])

    def draw(self, x: torch.Tensor, training: bool) -> KeptRows | None:
        """The rows that keep the branch in the coming call (None: compute every row)."""
        drop = self.drop
        batch = x.shape[drop.batch_axis]
        if drop.mode != "fixed_count":
            return self._drawn(x, training)
        if not training or (not torch.compiler.is_compiling() and drop.rate == 0.0):  # no guard on the rate
            return None
        rows, scale = fixed_count_rows(drop._rate_tensor, batch, x.device)  # no graph break: see fixed_count_rows
        return KeptRows(rows, scale, batch)

    @torch.compiler.disable  # a data-dependent decision on the host: one graph break, no guard on the rate
    def _drawn(self, x: torch.Tensor, training: bool) -> KeptRows | None:
        drop = self.drop
        keep = draw_rows(x, drop.rate, training, drop.mode, drop.batch_axis, drop.draw)
        return self.kept(keep, x.shape[drop.batch_axis], x.device)

    def kept(self, keep: torch.Tensor | None, batch: int, device: torch.device) -> KeptRows | None:
        """The rows of a 0/1 ``keep``: one per sample, or 0-d for the whole batch (None: every row computed)."""
        if keep is None:
            return None
        if keep.dim() == 0:  # mode 'batch': decided on the host, no device sync
            index = None if bool(keep) else torch.empty(0, dtype=torch.long, device=device)
        else:
            index = keep.to(device).nonzero().flatten()
        if index is None or 0 < index.numel() == batch:
            return KeptRows(None, self.drop.scale_tensor(), batch)
        if index.numel() > 0:
            return KeptRows(index, self.drop.scale_tensor(), batch)
        zero = torch.zeros((), dtype=torch.float64)
        if not self.empty_ok:  # one sample runs, multiplied by zero
            return KeptRows(torch.zeros(1, dtype=torch.long, device=device), zero, batch)
        counting = [n for n in self.norms if n.training and n.track_running_stats]
        return KeptRows(index, zero, batch, tuple(n for n in counting if n.num_batches_tracked is not None))
