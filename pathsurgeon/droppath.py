"""Stochastic depth: the function that does the math, and the module that holds its settings.

The mask is drawn exactly as ``timm.layers.drop_path`` draws it (same shape for batch axis 0, same
``bernoulli_`` call, same in-place rescale), so a model surgered by pathsurgeon consumes the random
number generator in the same order as the model timm would have built with ``drop_path_rate=r``, and
gives the same training-mode outputs under the same seed. In a Hugging Face model's slots the mask is
drawn as Hugging Face draws it (``draw="uniform_floor"``), for the same reason.

Modes of :class:`DropPath` (how a dropped branch is handled while training; all are the identity in
eval): ``"sample"``, timm's semantics (every sample computed, dropped ones multiplied by zero), and
``"skip"`` / ``"batch"``, where the branch only runs on the samples that keep it — the machinery for
those lives in :mod:`pathsurgeon.skipping` — and ``"fixed_count"``, DINOv2's efficient stochastic depth
(``drop_add_residual_stochastic_depth``): exactly ``k = max(int(B * (1 - rate)), 1)`` samples keep the
branch, drawn by ``randperm(B)[:k]``, and are scaled by ``B / k`` (:func:`fixed_count_rows`). The count is
fixed per batch rather than Bernoulli-distributed, which is what makes its shapes independent of the
draw: no host synchronisation, and under ``torch.compile`` one graph for every step and every rate.

Rates change during training (:class:`~pathsurgeon.RateScheduler`), so no compiled graph may depend on
a rate's value: under ``torch.compile`` the mask comes from the custom op ``pathsurgeon::drop_path_mask``,
which reads the rate from a tensor at run time and draws it with the library's very call. A new rate is
then a new input value, never a recompilation.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from .config import MODES, validate_mode, validate_rate

__all__ = [
    "DRAWS",
    "MODES",
    "DropPath",
    "KeptRows",
    "drop_path",
    "drop_path_mask",
    "fixed_count",
    "fixed_count_mask",
    "fixed_count_rows",
    "mask_shape",
    "traced_drop_path",
]

# How the per-sample keep mask is drawn. "bernoulli": timm's and torchvision's ``bernoulli_(keep)``.
# "uniform_floor": Hugging Face's ``floor(rand + keep)`` (one copy in every HF model file), used for the
# slots of HF models so that their training outputs stay the library's under one seed.
DRAWS = ("bernoulli", "uniform_floor")


def drop_path(
    x: torch.Tensor,
    rate: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    batch_axis: int = 0,
    draw: str = "bernoulli",
) -> torch.Tensor:
    """Zero the whole of ``x`` for a random subset of samples; scale the kept ones by ``1 / (1 - rate)``.

    One Bernoulli draw per sample along ``batch_axis``; every other axis is broadcast. Identity (the
    very same tensor) when ``rate == 0`` or when not training. ``draw``: see :data:`DRAWS` (with
    "uniform_floor", Hugging Face's code: kept samples are always rescaled).

    >>> x = torch.ones(4, 3)
    >>> drop_path(x, 0.5, training=False) is x
    True
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    if draw == "uniform_floor":
        mask = torch.floor(torch.rand(mask_shape(x, batch_axis), dtype=x.dtype, device=x.device) + keep)
        return x.div(keep) * mask
    mask = x.new_empty(mask_shape(x, batch_axis)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


# A random op: the tag keeps compilers from recomputing it in backward (which would redraw the mask).
# torch.library.custom_op takes tags= in recent torch; without it the op is still off the partitioner's
# list of ops it may recompute, as every custom op is. Each op states its schema: torch < 2.7 cannot
# infer one from the string annotations this module's ``from __future__ import annotations`` leaves.
_RANDOM_OP: dict[str, Any] = (
    {"tags": (torch.Tag.nondeterministic_seeded,)}
    if "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


@torch.library.custom_op(
    "pathsurgeon::drop_path_mask",
    mutates_args=(),
    schema='(Tensor rate, SymInt[] shape, ScalarType dtype, Device device, bool scale_by_keep, str draw="bernoulli")'
    " -> Tensor",
    **_RANDOM_OP,
)
def drop_path_mask(
    rate: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
    device: torch.device,
    scale_by_keep: bool,
    draw: str = "bernoulli",
) -> torch.Tensor:
    """The mask :func:`drop_path` multiplies by, with the rate read from a 0-d CPU tensor when it runs.

    What a compiled :class:`DropPath` calls. Opaque to torch.compile, so the graph does not depend on
    the rate (no recompilation when it changes) and the draw is the library's own (``draw``, see
    :data:`DRAWS`) on the default generator, compiled or not. Rate 0 gives ones and draws nothing, as
    the libraries' drop paths skip their draw.
    """
    value = float(rate)
    if value == 0.0:
        return torch.ones(shape, dtype=dtype, device=device)
    keep = 1.0 - value
    if draw == "uniform_floor":  # Hugging Face: always rescaled
        return torch.floor(torch.rand(shape, dtype=dtype, device=device) + keep).div_(keep)
    mask = torch.empty(shape, dtype=dtype, device=device).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return mask


@drop_path_mask.register_fake
def _(rate, shape, dtype, device, scale_by_keep, draw="bernoulli"):
    return torch.empty(shape, dtype=dtype, device=device)


def fixed_count(batch: int, rate: float) -> int:
    """How many of ``batch`` samples keep the branch in mode 'fixed_count': DINOv2's
    ``max(int(b * (1 - sample_drop_ratio)), 1)``."""
    return max(int(batch * (1.0 - rate)), 1)


@torch.library.custom_op(
    "pathsurgeon::fixed_count_rows",
    mutates_args=(),
    schema="(Tensor rate, SymInt batch, Device device) -> (Tensor, Tensor)",
    **_RANDOM_OP,
)
def fixed_count_rows(rate: torch.Tensor, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that keep the branch in mode 'fixed_count', and their scale ``B / k`` (a 0-d float64 CPU
    tensor), with the rate read from a 0-d CPU tensor when it runs.

    DINOv2's draw: ``torch.randperm(b, device=x.device)[:k]`` on the default generator. The row count is
    a size torch.compile treats as unknown (an unbacked size between 1 and ``batch``), so neither a
    new draw nor a new rate recompiles; it is known on the host as soon as the op returns (computed
    from the rate), so nothing waits for the device. Rate 0 keeps every row in order and draws nothing.
    """
    value = float(rate)
    if value == 0.0:
        return torch.arange(batch, device=device), torch.ones((), dtype=torch.float64)
    count = fixed_count(batch, value)
    rows = torch.randperm(batch, device=device)[:count]
    return rows, torch.tensor(batch / count, dtype=torch.float64)


@fixed_count_rows.register_fake
def _(rate, batch, device):
    count = torch.library.get_ctx().new_dynamic_size(min=1, max=max(batch, 1))
    return torch.empty(count, dtype=torch.long, device=device), torch.empty((), dtype=torch.float64)


def fixed_count_mask(x: torch.Tensor, rate: float, batch_axis: int) -> torch.Tensor:
    """Mode 'fixed_count' as a mask on a branch computed in full, for TorchScript and torch.fx graphs:
    ``B / k`` at DINOv2's ``k`` rows (``randperm(B)[:k]``, the same draw as eager), 0 elsewhere."""
    batch = x.size(batch_axis)
    count = max(int(batch * (1.0 - rate)), 1)
    rows = torch.randperm(batch, device=x.device)[:count]
    mask = torch.zeros([batch], dtype=x.dtype, device=x.device).index_fill(0, rows, 1.0) * (batch / count)
    shape = [1] * x.dim()
    shape[batch_axis] = batch
    return mask.view(shape)


# traced as one call: its count is plain Python arithmetic on the batch size
torch.fx.wrap("fixed_count_mask")


def mask_shape(x: torch.Tensor, batch_axis: int) -> tuple[int, ...]:
    """``(1, ..., B, ..., 1)``: one value per sample along ``batch_axis``, broadcast over the rest.

    Built by tuple arithmetic, as timm builds its ``(B,) + (1,) * (ndim - 1)``, never by item assignment:
    under torch.fx ``x.ndim`` is a Proxy, and the arithmetic is then recorded in the graph.
    """
    return (1,) * batch_axis + (x.shape[batch_axis],) + (1,) * (x.ndim - batch_axis - 1)


def traced_drop_path(drop: DropPath, x: torch.fx.Proxy, training: bool) -> torch.fx.Proxy:
    """``drop``'s drop path written into a torch.fx graph being traced (for a DropPath the traced module
    cannot call, a hook's): the same draws as eager. Modes 'sample' and 'skip': the per-sample mask
    (every sample computed); mode 'batch': one draw for the batch on the CPU generator, as eager draws
    it. Like timm's, the rate and the training flag at tracing time are fixed in the graph."""
    if not training or drop.rate == 0.0:
        return x
    # torch.fx attaches a Proxy's tensor operators at import time, and its stubs declare none of them:
    # the body is typed as the Tensor code it records, each result is a Proxy again.
    t = cast(torch.Tensor, x)
    keep = 1.0 - drop.rate
    if drop.mode == "batch":
        kept = t.new_empty((1,), dtype=torch.float32, device=torch.device("cpu")).bernoulli_(keep)
        return cast(torch.fx.Proxy, t * (kept.reshape(()).double() * drop.scale()))
    if drop.mode == "fixed_count":  # a leaf of the graph: the count depends on the batch size
        return cast(torch.fx.Proxy, t * fixed_count_mask(t, drop.rate, drop.batch_axis))
    # drop_path's draws, written so that every result is used: torchvision's feature extraction removes
    # nodes whose result nobody reads, an in-place ``mask.div_(keep)`` among them (timm's own drop_path
    # loses its rescale that way); ``torch.rand(shape, ...)`` is ``empty(shape).uniform_()``
    if drop.draw == "uniform_floor":
        mask = torch.floor(t.new_empty(mask_shape(t, drop.batch_axis)).uniform_() + keep)
        return cast(torch.fx.Proxy, t.div(keep) * mask)
    mask = t.new_empty(mask_shape(t, drop.batch_axis)).bernoulli_(keep)
    if keep > 0.0 and drop.scale_by_keep:
        mask = mask.div(keep)
    return cast(torch.fx.Proxy, t * mask)


class KeptRows(NamedTuple):
    """The drop decision for one call of a branch (modes 'skip' and 'batch'): kept rows (None: all of
    them), scale, full batch size. Drawn by :func:`pathsurgeon.skipping.draw_rows`.

    ``scale`` is a 0-d tensor, not a float, so that a compiled graph does not specialise on it.
    """

    index: torch.Tensor | None  # type: ignore[assignment]  # a field named as tuple.index, which it hides
    scale: torch.Tensor
    batch: int
    # BatchNorms of a branch that ran on no row in training: their count of batches seen is taken back
    # after the call, so that a dropped branch leaves every BatchNorm buffer as it was (mode 'batch')
    uncounted: tuple = ()


def _take_back_batch_count(norms: tuple) -> None:
    """Undo the ``num_batches_tracked += 1`` a BatchNorm makes even on an empty batch (its running mean
    and variance already stay as they were: torch computes nothing for an empty input)."""
    with torch.no_grad():
        for norm in norms:
            norm.num_batches_tracked.sub_(1)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (the module pathsurgeon inserts).

    It has no parameters and no buffers, so inserting it never changes a model's ``state_dict``.
    ``drop_prob`` is an alias of ``rate`` so that code written for ``timm.layers.DropPath`` keeps working.
    ``mode``: 'sample', 'skip' or 'batch' (see the module docstring); ``draw``: see :data:`DRAWS`.
    """

    def __init__(
        self,
        rate: float = 0.0,
        scale_by_keep: bool = True,
        batch_axis: int = 0,
        mode: str = "sample",
        draw: str = "bernoulli",
    ) -> None:
        super().__init__()
        # The rate twice: a float for eager code (timm's drop_path takes one) and a 0-d float64 CPU tensor
        # that compiled code reads at run time. Not a buffer: it must stay out of state_dict, off the
        # device (reading it never waits for an accelerator) and out of DDP's buffer broadcast.
        self._rate_tensor = torch.zeros((), dtype=torch.float64)
        self.rate = rate
        self.scale_by_keep = bool(scale_by_keep)
        self.batch_axis = int(batch_axis)
        self.mode = validate_mode(mode)
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
        self.draw = draw
        # True for the modules pathsurgeon.add puts into a model (a user's own DropPath layers are False):
        # one found outside any surgery record is a leftover copy, and adding again would drop twice
        self.inserted = False
        # Modes 'skip' and 'batch' (state that pathsurgeon.skipping reads and writes): the rows a Gather
        # kept for the coming call; a fixed 0/1 keep mask forced on for add's checks (active in eval too);
        # whether the branch runs on an empty batch when no sample is kept (False: a reshape with -1 in
        # it, so it runs on one sample multiplied by zero).
        self.kept_rows: KeptRows | None = None
        self.forced_keep: torch.Tensor | None = None
        self.empty_ok = True

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

    # TorchScript compiles forward and what it calls (see _scripted_forward), never these properties: their
    # setters validate in plain Python, and a property that fails to compile stays half-defined on the class
    # ("Can't redefine method: __drop_prob_getter") for every later torch.jit.script in the process.
    __jit_unused_properties__ = ["rate", "drop_prob"]
    __jit_ignored_attributes__ = ["rate", "drop_prob"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        else:
            return self._python_forward(x)

    @torch.jit.unused
    def _python_forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return self._traced_call(x)
        return self.apply_to(x, self.training)

    def _traced_call(self, x: torch.fx.Proxy) -> torch.fx.Proxy:
        """Under torch.fx symbolic tracing: one ``call_module`` node for this module, whatever the tracer's
        leaf rules, so the traced module calls this very DropPath at run time. It then drops in training
        and not in eval (a graph traced in eval mode keeps the drop for training), follows ``set_rate``,
        scatters the rows its Gather kept in modes 'skip' and 'batch', and draws its masks exactly as the
        untouched model does. A DropPath outside the traced tree (a hook's) is written into the graph."""
        tracer = cast(torch.fx.Tracer, x.tracer)  # typed as TracerBase; symbolic tracing's is a Tracer
        try:
            path = tracer.path_of_module(self)
        except NameError:
            return traced_drop_path(self, x, self.training)
        return tracer.create_proxy("call_module", path, (x,), {})

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under TorchScript: the eager semantics without Gather hooks (a TorchScript module runs none;
        pathsurgeon refuses to script a model that has them): mode 'skip' computes every sample and masks
        it with the same draw, mode 'batch' draws once for the batch on the CPU generator."""
        if not self.training or self._rate == 0.0:
            return x
        keep = 1.0 - self._rate
        if self.mode == "batch":
            kept = torch.empty(1).bernoulli_(keep).reshape(()).double()
            scale = 1.0 / keep if self.scale_by_keep else 1.0
            return x * (kept * scale)
        if self.mode == "fixed_count":
            return x * fixed_count_mask(x, self._rate, self.batch_axis)
        shape = [1] * x.dim()
        shape[self.batch_axis] = x.size(self.batch_axis)
        if self.draw == "uniform_floor":
            mask = torch.floor(torch.rand(shape, dtype=x.dtype, device=x.device) + keep)
            return x.div(keep) * mask
        mask = x.new_empty(shape).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def apply_to(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Drop path on the branch output ``x``; ``training`` is the flag of the module it belongs to."""
        if self.mode == "sample" and self.forced_keep is None:  # the hot path: timm's code, nothing else
            return self.sample(x, training)
        # modes 'skip' and 'batch': the branch ran on the rows a Gather kept; scatter them back
        rows, self.kept_rows = self.kept_rows, None
        if rows is not None:
            if rows.index is None:
                return x * rows.scale
            full = list(x.shape)
            full[self.batch_axis] = rows.batch
            if rows.uncounted:
                _take_back_batch_count(rows.uncounted)
            # in place on fresh zeros: no copy of the full-size tensor; an empty index (no row kept) still
            # connects the branch to the graph, so its parameters get zero gradients, as in mode 'sample'
            return x.new_zeros(full).index_copy_(self.batch_axis, rows.index, x * rows.scale)
        if self.forced_keep is not None:
            keep = self.forced_keep.to(device=x.device, dtype=x.dtype)
            return x * keep.view(mask_shape(x, self.batch_axis)) * self.scale()
        if self.mode == "batch" and training:  # nothing gathered: the whole batch, computed, kept or zeroed
            return x * self._batch_factor()
        if self.mode == "fixed_count" and training:  # nothing gathered: every row computed, the same draw
            return x * self.fixed_count_mask(x)
        return self.sample(x, training)

    def fixed_count_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Mode 'fixed_count' on a branch computed in full: ``B / k`` at the kept rows, 0 elsewhere."""
        batch = x.shape[self.batch_axis]
        rows, scale = fixed_count_rows(self._rate_tensor, batch, x.device)
        mask = x.new_zeros(batch).index_fill(0, rows, 1.0) * scale
        return mask.view(mask_shape(x, self.batch_axis))

    def sample(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Per-sample drop path on the whole branch output (mode 'sample', and the others' fallback)."""
        if not training:
            return x
        if torch.compiler.is_compiling():  # the same draw, but the graph must not depend on the rate
            shape = mask_shape(x, self.batch_axis)
            mask = drop_path_mask(self._rate_tensor, list(shape), x.dtype, x.device, self.scale_by_keep, self.draw)
            return x * mask
        return drop_path(x, self.rate, training, self.scale_by_keep, self.batch_axis, self.draw)

    def scale(self) -> float:
        """What kept samples are multiplied by: ``1 / (1 - rate)``, or 1 without ``scale_by_keep``."""
        return 1.0 / (1.0 - self.rate) if self.scale_by_keep else 1.0

    def scale_tensor(self) -> torch.Tensor:
        # a 0-d CPU tensor multiplies a tensor on any device, in that tensor's dtype
        return torch.tensor(self.scale(), dtype=torch.float64)

    def batch_kept(self) -> bool:
        """One draw for the whole batch (mode 'batch'), as torchvision's ``StochasticDepth(mode="batch")``
        makes it; on the CPU generator, whatever the model's device, so deciding needs no device sync."""
        return bool(torch.empty(1).bernoulli_(1.0 - self.rate))

    @torch.compiler.disable  # a random decision on the host: under torch.compile, a graph break here
    def _batch_factor(self) -> torch.Tensor:
        """Mode 'batch' without a Gather: the factor for the whole batch, 0 (dropped) or the scale."""
        if self.rate == 0.0:
            return torch.ones((), dtype=torch.float64)
        return self.scale_tensor() if self.batch_kept() else torch.zeros((), dtype=torch.float64)

    def fixed_rows(self, batch: int, device: torch.device, training: bool) -> KeptRows | None:
        """Mode 'fixed_count': the kept rows of the coming call (None: every row, nothing drawn)."""
        if not training or (not torch.compiler.is_compiling() and self.rate == 0.0):  # no guard on the rate
            return None
        rows, scale = fixed_count_rows(self._rate_tensor, batch, device)
        return KeptRows(rows, scale, batch)

    def extra_repr(self) -> str:
        text = f"rate={self.rate:.4g}"
        if self.mode != "sample":
            text += f", mode={self.mode!r}"
        if not self.scale_by_keep:
            text += ", scale_by_keep=False"
        if self.batch_axis != 0:
            text += f", batch_axis={self.batch_axis}"
        if self.draw != "bernoulli":
            text += f", draw={self.draw!r}"
        return text
