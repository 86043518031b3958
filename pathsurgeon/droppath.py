"""Stochastic depth: the function that does the math, and the module that holds its settings and mode.

The mask is drawn exactly as ``timm.layers.drop_path`` draws it (same shape for batch axis 0, same
``bernoulli_`` call, same in-place rescale), so a model surgered by pathsurgeon consumes the random
number generator in the same order as the model timm would have built with ``drop_path_rate=r``, and
gives the same training-mode outputs under the same seed.

Modes of :class:`DropPath` (how a dropped branch is handled while training; all are the identity in eval):

- ``"sample"``: timm's semantics, one draw per sample; the branch is computed for every sample and the
  dropped ones are multiplied by zero.
- ``"skip"``: one draw per sample, but the branch only runs on the kept samples. The draw is made at
  the start of the branch by a :class:`Gather` pre-hook on the branch's first module, which passes on
  the kept rows only; the DropPath at the end of the branch scatters the scaled rows back into a
  full-size tensor (zeros for dropped samples) for the block's own residual add.
- ``"batch"``: one draw per branch per mini-batch (Huang et al. 2016); with a Gather on the branch a
  dropped branch runs on an empty batch, i.e. does no arithmetic.

Rates change during training (:class:`~pathsurgeon.RateScheduler`), so no compiled graph may depend on
a rate's value: under ``torch.compile`` the mask comes from the custom op ``pathsurgeon::drop_path_mask``,
which reads the rate from a tensor at run time and draws it with timm's very call, and the scales of
modes skip and batch are tensors too. A new rate is then a new input value, never a recompilation.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "DRAWS",
    "MODES",
    "DropPath",
    "Gather",
    "brief",
    "drop_path",
    "drop_path_mask",
    "real_number",
    "validate_mode",
    "validate_rate",
]

MODES = ("sample", "skip", "batch")
# How the per-sample keep mask is drawn. "bernoulli": timm's and torchvision's ``bernoulli_(keep)``.
# "uniform_floor": Hugging Face's ``floor(rand + keep)`` (one copy in every HF model file), used for the
# slots of HF models so that their training outputs stay the library's under one seed.
DRAWS = ("bernoulli", "uniform_floor")


def real_number(value: object) -> float | None:
    """``value`` as a Python float if it is a real number of any type, else None.

    Python and numpy ints and floats (anything registered as :class:`numbers.Real`) and 0-d real tensors
    count; booleans, complex numbers and tensors with more than one element do not.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    return None


def brief(value: object) -> str:
    """A one-line description of a value for an error message (a tensor by its shape, not its contents)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value).splitlines()[0] if repr(value) else ""
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def validate_rate(rate: object, *, what: str = "rate") -> float:
    """Return ``rate`` as a float in [0, 1), or raise :class:`~pathsurgeon.errors.InvalidRateError`.

    Any real number type is accepted (``0.1``, ``numpy.float32(0.1)``, ``torch.tensor(0.1)``).
    """
    from .errors import InvalidRateError

    value = real_number(rate)
    if value is None:
        raise InvalidRateError(f"{what} must be a number in [0, 1), got {brief(rate)}; pass e.g. rate=0.1")
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise InvalidRateError(
            f"{what} must be in [0, 1) (the probability of dropping a sample's branch), got {value!r}; "
            "pass e.g. rate=0.1"
        )
    return value


def validate_mode(mode: object) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, or raise :class:`~pathsurgeon.errors.InvalidModeError`."""
    from .errors import InvalidModeError

    if not isinstance(mode, str) or mode not in MODES:
        raise InvalidModeError(
            f"mode must be one of {', '.join(repr(m) for m in MODES)}, "
            f"got {repr(mode) if isinstance(mode, str) else brief(mode)}; "
            "pass mode='sample' (timm's per-sample drop path) or mode='skip' (same, without computing dropped samples)"
        )
    return mode


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
        mask = torch.floor(torch.rand(_mask_shape(x, batch_axis), dtype=x.dtype, device=x.device) + keep)
        return x.div(keep) * mask
    mask = x.new_empty(_mask_shape(x, batch_axis)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


# A random op: the tag keeps compilers from recomputing it in backward (which would redraw the mask).
# torch.library.custom_op takes tags= in recent torch; without it the op is still off the partitioner's
# list of ops it may recompute, as every custom op is.
_RANDOM_OP = (
    {"tags": (torch.Tag.nondeterministic_seeded,)}
    if "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


@torch.library.custom_op("pathsurgeon::drop_path_mask", mutates_args=(), **_RANDOM_OP)
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


def _mask_shape(x: torch.Tensor, batch_axis: int) -> list[int]:
    """``(1, ..., B, ..., 1)``: one value per sample along ``batch_axis``, broadcast over the rest."""
    shape = [1] * x.ndim
    shape[batch_axis] = x.shape[batch_axis]
    return shape


class _Plan(NamedTuple):
    """The drop decision for one call of a branch: kept rows (None: all of them), scale, full batch size.

    ``scale`` is a 0-d tensor, not a float, so that a compiled graph does not specialise on it.
    """

    index: torch.Tensor | None
    scale: torch.Tensor
    batch: int


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (the module pathsurgeon inserts).

    It has no parameters and no buffers, so inserting it never changes a model's ``state_dict``.
    ``drop_prob`` is an alias of ``rate`` so that code written for ``timm.layers.DropPath`` keeps working.
    ``mode``: see the module docstring. In ``"skip"`` and ``"batch"`` mode it scatters the rows a
    :class:`Gather` kept; without one (nothing gathered this call) it falls back to computing the
    branch in full: per-sample masking in ``"skip"`` mode, one draw for the whole batch in ``"batch"``.
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
        self._plan: _Plan | None = None  # set by a Gather at the start of the branch, used once
        self._forced_keep: torch.Tensor | None = None  # a fixed 0/1 keep mask, for checks (active in eval too)
        # False for branches that cannot run on an empty batch (a reshape with -1): when no sample is
        # kept, the branch runs on one sample and is multiplied by zero.
        self.empty_ok = True
        # True for the modules pathsurgeon.add puts into a model (a user's own DropPath layers are False):
        # one found outside any surgery record is a leftover copy, and adding again would drop twice
        self.inserted = False

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_to(x, self.training)

    def apply_to(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Drop path on the branch output ``x``; ``training`` is the flag of the module it belongs to."""
        if self.mode == "sample" and self._forced_keep is None:  # the hot path: timm's code, nothing else
            return self._sample(x, training)
        plan, self._plan = self._plan, None
        if plan is not None:
            return self._scatter(x, plan)
        if self._forced_keep is not None:
            keep = self._forced_keep.to(device=x.device, dtype=x.dtype)
            return x * keep.view(_mask_shape(x, self.batch_axis)) * self._scale()
        if self.mode == "batch" and training:
            return x * self._batch_scale()
        return self._sample(x, training)

    def _sample(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if not training:
            return x
        if torch.compiler.is_compiling():  # the same draw, but the graph must not depend on the rate
            shape = _mask_shape(x, self.batch_axis)
            mask = drop_path_mask(self._rate_tensor, shape, x.dtype, x.device, self.scale_by_keep, self.draw)
            return x * mask
        return drop_path(x, self.rate, training, self.scale_by_keep, self.batch_axis, self.draw)

    @torch.compiler.disable  # a data-dependent decision: under torch.compile, a graph break here
    def plan(
        self, batch: int, device: torch.device, training: bool, dtype: torch.dtype = torch.float32
    ) -> _Plan | None:
        """Draw the kept rows for the next call of the branch (None: inactive, compute every row as is)."""
        if self._forced_keep is not None:
            keep_mask = self._forced_keep.to(device=device, dtype=torch.bool)
        elif not training or self.rate == 0.0 or self.mode == "sample":
            return None
        elif self.mode == "batch":
            if self._batch_kept():
                return _Plan(None, self._scale_tensor(), batch)
            return self._none_kept(batch, device)
        else:
            # the draw timm's drop_path makes (same count, dtype and generator), so that under one seed
            # the kept samples are those mode 'sample' keeps when the branch itself draws no numbers
            keep_mask = self._draw_keep(batch, device, dtype)
        index = keep_mask.nonzero().flatten()
        if index.numel() == 0:
            return self._none_kept(batch, device)
        return _Plan(None if index.numel() == batch else index, self._scale_tensor(), batch)

    @torch.compiler.disable  # a random decision on the host: under torch.compile, a graph break here
    def _batch_scale(self) -> torch.Tensor:
        """Mode 'batch' without a Gather: the factor for the whole batch, 0 (dropped) or the scale."""
        if self.rate == 0.0:
            return torch.ones((), dtype=torch.float64)
        return self._scale_tensor() if self._batch_kept() else torch.zeros((), dtype=torch.float64)

    def _draw_keep(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        keep = 1.0 - self.rate
        if self.draw == "uniform_floor":
            return torch.floor(torch.rand(batch, device=device, dtype=dtype) + keep).bool()
        return torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep).bool()

    def _batch_kept(self) -> bool:
        """One draw for the whole batch, as torchvision's ``StochasticDepth(mode="batch")`` makes it.

        On the CPU generator, whatever the model's device, so that deciding to skip needs no device sync.
        """
        return bool(torch.empty(1).bernoulli_(1.0 - self.rate))

    def _none_kept(self, batch: int, device: torch.device) -> _Plan:
        zero = torch.zeros((), dtype=torch.float64)
        if self.empty_ok:
            return _Plan(torch.empty(0, dtype=torch.long, device=device), zero, batch)
        return _Plan(torch.zeros(1, dtype=torch.long, device=device), zero, batch)

    def _scatter(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if plan.index is None:
            return x * plan.scale
        full = list(x.shape)
        full[self.batch_axis] = plan.batch
        return x.new_zeros(full).index_copy(self.batch_axis, plan.index, x * plan.scale)

    def _scale(self) -> float:
        return 1.0 / (1.0 - self.rate) if self.scale_by_keep else 1.0

    def _scale_tensor(self) -> torch.Tensor:
        # a 0-d CPU tensor multiplies a tensor on any device, in that tensor's dtype
        return torch.tensor(self._scale(), dtype=torch.float64)

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


class Gather:
    """Forward pre-hook on a branch's first module: draws the plan of its DropPath, keeps only those rows.

    The hooked module's first positional argument must be the branch's only input with a batch axis;
    :func:`pathsurgeon.add` checks that on the model before it hands out a Gather.
    """

    def __init__(self, drop: DropPath) -> None:
        self.drop = drop

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        drop = self.drop
        if not args or not isinstance(args[0], torch.Tensor):
            drop._plan = None
            return None
        x = args[0]
        plan = drop.plan(x.shape[drop.batch_axis], x.device, module.training, x.dtype)
        drop._plan = plan
        if plan is None or plan.index is None:
            return None
        return (x.index_select(drop.batch_axis, plan.index), *args[1:])
