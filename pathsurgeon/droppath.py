"""Per-sample stochastic depth: the function that does the math, and the module that holds its settings.

The mask is drawn exactly as ``timm.layers.drop_path`` draws it (same shape for batch axis 0, same
``bernoulli_`` call, same in-place rescale), so a model surgered by pathsurgeon consumes the random
number generator in the same order as the model timm would have built with ``drop_path_rate=r``, and
gives the same training-mode outputs under the same seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DropPath", "drop_path", "validate_rate"]


def validate_rate(rate: object, *, what: str = "rate") -> float:
    """Return ``rate`` as a float in [0, 1), or raise :class:`~pathsurgeon.errors.InvalidRateError`."""
    from .errors import InvalidRateError

    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise InvalidRateError(
            f"{what} must be a number in [0, 1), got {type(rate).__name__} {rate!r}; pass e.g. rate=0.1"
        )
    value = float(rate)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise InvalidRateError(
            f"{what} must be in [0, 1) (the probability of dropping a sample's branch), got {value!r}; "
            "pass e.g. rate=0.1"
        )
    return value


def drop_path(
    x: torch.Tensor,
    rate: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    batch_axis: int = 0,
) -> torch.Tensor:
    """Zero the whole of ``x`` for a random subset of samples; scale the kept ones by ``1 / (1 - rate)``.

    One Bernoulli draw per sample along ``batch_axis``; every other axis is broadcast. Identity (the
    very same tensor) when ``rate == 0`` or when not training.

    >>> x = torch.ones(4, 3)
    >>> drop_path(x, 0.5, training=False) is x
    True
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = [1] * x.ndim
    shape[batch_axis] = x.shape[batch_axis]
    mask = x.new_empty(shape).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch (the module pathsurgeon inserts).

    It has no parameters and no buffers, so inserting it never changes a model's ``state_dict``.
    ``drop_prob`` is an alias of ``rate`` so that code written for ``timm.layers.DropPath`` keeps working.
    """

    def __init__(self, rate: float = 0.0, scale_by_keep: bool = True, batch_axis: int = 0) -> None:
        super().__init__()
        self.rate = validate_rate(rate)
        self.scale_by_keep = bool(scale_by_keep)
        self.batch_axis = int(batch_axis)

    @property
    def drop_prob(self) -> float:
        return self.rate

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self.rate = validate_rate(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training, self.scale_by_keep, self.batch_axis)

    def extra_repr(self) -> str:
        text = f"rate={self.rate:.4g}"
        if not self.scale_by_keep:
            text += ", scale_by_keep=False"
        if self.batch_axis != 0:
            text += f", batch_axis={self.batch_axis}"
        return text
