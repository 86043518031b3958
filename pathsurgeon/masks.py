"""The one mask function, and the ops compiled code calls: how every drop path draws and applies its mask.

:func:`keep_mask` draws every random keep decision of pathsurgeon's drop paths (eager, torch.fx,
TorchScript, the custom ops below, the Gathers), as the library the model came from draws it: timm's and
torchvision's ``bernoulli_(keep)``, Hugging Face's ``floor(rand + keep)`` (``draw``, see :data:`DRAWS`),
DINOv2's ``randperm(B)[:k]`` (mode 'fixed_count'). So under one seed a surgered model consumes the random
numbers the library's own model would, and gives the same training outputs.

Rates change during training (:class:`~pathsurgeon.RateScheduler`), so no compiled graph may depend on
a rate's value: under ``torch.compile`` the draws run in the custom ops ``pathsurgeon::drop_path_mask``
and ``pathsurgeon::fixed_count_rows``, which read the rate from a tensor at run time. A new rate is then
a new input value, never a recompilation.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import fx

from .choices import Mode

__all__ = ["DRAWS", "Handover", "KeptRows", "batch_kept", "draw_rows", "drop_path", "drop_path_mask", "fixed_count",
           "fixed_count_mask", "fixed_count_rows", "keep_mask", "mask_shape", "scaled",
           "traced_drop_path"]

# "bernoulli": timm's and torchvision's draw; "uniform_floor": Hugging Face's (one copy in every HF model file)
DRAWS = ("bernoulli", "uniform_floor")


def keep_mask(like: torch.Tensor, shape: list[int], keep: float, draw: str = "bernoulli",
              dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Which samples keep the branch: the one place a drop path draws random numbers (eager, torch.fx,
    TorchScript, the custom ops, the Gathers). A 0/1 tensor of ``shape`` (``like``'s dtype and device
    unless given; ``new_empty`` on ``like``, so that torch.fx records the draw); with ``draw="randperm"``
    the indices of the kept rows, DINOv2's ``randperm(B)[:max(int(B * keep), 1)]`` with ``B = shape[0]``."""
    if draw == "randperm":
        batch = shape[0]
        return torch.randperm(batch, device=like.device if device is None else device)[: max(int(batch * keep), 1)]
    mask = like.new_empty(shape, dtype=dtype, device=device)
    if draw == "uniform_floor":
        return torch.floor(mask.uniform_() + keep)  # torch.rand is empty().uniform_()
    return mask.bernoulli_(keep)


def scaled(x: torch.Tensor, mask: torch.Tensor, keep: float, scale_by_keep: bool, draw: str) -> torch.Tensor:
    """``x`` times a 0/1 ``mask``, kept samples rescaled as the draw's library does (Hugging Face always
    divides its input). Out of place: torchvision's feature extraction drops in-place results nobody reads."""
    if draw == "uniform_floor":
        return x.div(keep) * mask
    if keep > 0.0 and scale_by_keep:
        mask = mask.div(keep)
    return x * mask


def mask_shape(x: torch.Tensor, batch_axis: int) -> tuple[int, ...]:
    """``(1, ..., B, ..., 1)``, by tuple arithmetic as timm builds it: under torch.fx ``x.ndim`` is a Proxy."""
    return (1,) * batch_axis + (x.shape[batch_axis],) + (1,) * (x.ndim - batch_axis - 1)


def drop_path(x: torch.Tensor, rate: float = 0.0, training: bool = False, scale_by_keep: bool = True,
              batch_axis: int = 0, draw: str = "bernoulli") -> torch.Tensor:
    """Zero the whole of ``x`` for a random subset of samples along ``batch_axis``; scale the kept ones by
    ``1 / (1 - rate)``. Identity (the very same tensor) when ``rate == 0`` or when not training.

    >>> x = torch.ones(4, 3)
    >>> drop_path(x, 0.5, training=False) is x
    True
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = cast(list[int], mask_shape(x, batch_axis))  # a tuple, or under torch.fx a Proxy
    return scaled(x, keep_mask(x, shape, keep, draw), keep, scale_by_keep, draw)


# A random op: the tag keeps compilers from recomputing it in backward (which would redraw the mask). Each
# op states its schema: torch < 2.7 cannot infer one from this module's string annotations.
_RANDOM_OP: dict[str, Any] = (
    {"tags": (torch.Tag.nondeterministic_seeded,)} if "tags" in inspect.signature(torch.library.custom_op).parameters
    else {})


@torch.library.custom_op("pathsurgeon::drop_path_mask", mutates_args=(), **_RANDOM_OP, schema=(
    "(Tensor rate, SymInt[] shape, ScalarType dtype, Device device, bool scale_by_keep, "
    'str draw="bernoulli") -> Tensor'))
def drop_path_mask(rate: torch.Tensor, shape: list[int], dtype: torch.dtype, device: torch.device,
                   scale_by_keep: bool, draw: str = "bernoulli") -> torch.Tensor:
    """The mask :func:`drop_path` multiplies by, the rate read from a 0-d CPU tensor when it runs: what a
    compiled DropPath calls, opaque to torch.compile (no recompilation when the rate changes). Rate 0
    gives ones and draws nothing, as the libraries' drop paths skip their draw."""
    value = float(rate)
    if value == 0.0:
        return torch.ones(shape, dtype=dtype, device=device)
    keep = 1.0 - value
    mask = keep_mask(rate, shape, keep, draw, dtype, device)
    return mask.div(keep) if draw == "uniform_floor" or (keep > 0.0 and scale_by_keep) else mask  # as scaled()


@drop_path_mask.register_fake
def _(rate, shape, dtype, device, scale_by_keep, draw="bernoulli"):
    return torch.empty(shape, dtype=dtype, device=device)


def fixed_count(batch: int, rate: float) -> int:
    """How many of ``batch`` samples keep the branch in mode 'fixed_count': DINOv2's ``max(int(b * (1 - r)), 1)``."""
    return max(int(batch * (1.0 - rate)), 1)


@torch.library.custom_op("pathsurgeon::fixed_count_rows", mutates_args=(), **_RANDOM_OP,
                         schema="(Tensor rate, SymInt batch, Device device) -> (Tensor, Tensor)")
def fixed_count_rows(rate: torch.Tensor, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode 'fixed_count': the kept rows and their scale ``B / k`` (0-d float64 CPU), the rate read from a
    0-d CPU tensor when it runs. To torch.compile the row count is an unbacked size in [1, batch]: neither
    a draw nor a rate recompiles, and nothing waits for the device. Rate 0 keeps every row, draws nothing."""
    value = float(rate)
    if value == 0.0:
        return torch.arange(batch, device=device), torch.ones((), dtype=torch.float64)
    rows = keep_mask(rate, [batch], 1.0 - value, "randperm", device=device)
    return rows, torch.tensor(batch / rows.numel(), dtype=torch.float64)


@fixed_count_rows.register_fake
def _(rate, batch, device):
    count = torch.library.get_ctx().new_dynamic_size(min=1, max=max(batch, 1))
    return torch.empty(count, dtype=torch.long, device=device), torch.empty((), dtype=torch.float64)


def fixed_count_mask(x: torch.Tensor, rate: float, batch_axis: int) -> torch.Tensor:
    """Mode 'fixed_count' as a mask on a branch computed in full (TorchScript, torch.fx, no Gather):
    ``B / k`` at the kept rows, 0 elsewhere; the same draw as a Gather's."""
    batch = x.size(batch_axis)
    rows = keep_mask(x, [batch], 1.0 - rate, "randperm")
    mask = torch.zeros([batch], dtype=x.dtype, device=x.device).index_fill(0, rows, 1.0) * (batch / rows.size(0))
    shape = [1] * x.dim()
    shape[batch_axis] = batch
    return mask.view(shape)


def batch_kept(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Mode 'batch': one draw for the batch, on the CPU generator whatever the device (no device sync)."""
    return keep_mask(x, [1], keep, "bernoulli", torch.float32, torch.device("cpu")).reshape(())


class KeptRows(NamedTuple):
    """The rows a :class:`~pathsurgeon.droppath.Gather` kept for one call (None: all), their scale (a 0-d
    tensor, so that a compiled graph does not specialise on it), the full batch size, and the BatchNorms of
    a branch that ran on no row, whose count of batches is taken back (a dropped branch leaves them alone)."""

    index: torch.Tensor | None  # type: ignore[assignment]  # a field named as tuple.index, which it hides
    scale: torch.Tensor
    batch: int
    uncounted: tuple = ()

    def apply(self, x: torch.Tensor, batch_axis: int) -> torch.Tensor:
        """The branch output on the kept rows, scaled, back at its rows of a full-size zero tensor."""
        if self.index is None:
            return x * self.scale
        with torch.no_grad():  # torch counts even an empty batch: num_batches_tracked += 1
            for norm in self.uncounted:
                norm.num_batches_tracked.sub_(1)
        full = list(x.shape)
        full[batch_axis] = self.batch
        # in place on fresh zeros; an empty index still connects the branch (zero gradients, as in 'sample')
        return x.new_zeros(full).index_copy_(batch_axis, self.index, x * self.scale)


class Handover(Protocol):
    """The drop decision a pre-hook leaves for its DropPath's coming call (a :class:`KeptRows`)."""

    def apply(self, x: torch.Tensor, batch_axis: int) -> torch.Tensor: ...


@torch.compiler.disable  # a data-dependent decision: under torch.compile, a graph break here
def draw_rows(
    x: torch.Tensor, rate: float, training: bool, mode: str, batch_axis: int, draw: str
) -> torch.Tensor | None:
    """Modes 'skip' and 'batch': which samples of branch input ``x`` keep the branch in its coming call, one
    per sample or (mode 'batch') 0-d for all; None: inactive. Mode 'skip' draws what mode 'sample' draws
    (count, dtype, generator): under one seed the same samples keep the branch if it draws no numbers."""
    if not training or rate == 0.0 or mode == "sample":
        return None
    if mode == "batch":
        return batch_kept(x, 1.0 - rate)
    return keep_mask(x, [x.shape[batch_axis]], 1.0 - rate, draw)


class DropSettings(Protocol):
    """What :func:`traced_drop_path` reads of a :class:`~pathsurgeon.droppath.DropPath`."""

    rate: float
    mode: Mode
    batch_axis: int
    scale_by_keep: bool
    draw: str

    def scale(self) -> float: ...


torch.fx.wrap("fixed_count_mask")  # one leaf call in a torch.fx graph: its count is Python arithmetic on B


def traced_drop_path(drop: DropSettings, x: fx.Proxy, training: bool) -> fx.Proxy:
    """``drop`` written into a torch.fx graph being traced (a hook's DropPath, outside the traced tree):
    the eager draws, every sample computed; the rate and training flag fixed in the graph, as timm's."""
    if not training or drop.rate == 0.0:
        return x
    t = cast(torch.Tensor, x)  # a Proxy records the Tensor code below; each result is a Proxy again
    if drop.mode == "batch":
        return cast(fx.Proxy, t * (batch_kept(t, 1.0 - drop.rate).double() * drop.scale()))
    if drop.mode == "fixed_count":
        return cast(fx.Proxy, t * fixed_count_mask(t, drop.rate, drop.batch_axis))
    return cast(fx.Proxy, drop_path(t, drop.rate, True, drop.scale_by_keep, drop.batch_axis, drop.draw))
