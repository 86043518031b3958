"""Verify: eval-mode outputs of the model, and how far two sets of outputs are apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from .capture import private_rng, training_flags_kept
from .inputs import ExampleInputs

__all__ = ["eval_outputs", "max_abs_diff", "tensor_leaves"]

def eval_outputs(model: nn.Module, inputs: ExampleInputs) -> list[torch.Tensor]:
    """The tensors ``model`` returns in eval mode, detached, in a fixed order, from a fixed RNG state."""
    with training_flags_kept(model, training=False), torch.no_grad(), private_rng(model):
        output = inputs.call(model)
    return [t.detach().clone() for t in tensor_leaves(output)]


def tensor_leaves(output: Any) -> list[torch.Tensor]:
    """The tensors in a model output (tensor, tuple, dict, Hugging Face ModelOutput), in a fixed order."""
    if isinstance(output, Mapping):
        output = dict(output)  # Hugging Face ModelOutput and other mappings: their values, in order
    return [leaf for leaf in _pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def max_abs_diff(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Largest absolute difference; 0.0 when bitwise equal, inf when the structure changed."""
    if len(before) != len(after):
        return float("inf")
    worst = 0.0
    for a, b in zip(before, after, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if not a.is_floating_point() and not a.is_complex():
            if not torch.equal(a, b):
                worst = max(worst, float((a.double() - b.double()).abs().max()))
            continue
        same = (a == b) | (a.isnan() & b.isnan())
        if not bool(same.all()):
            difference = (a.double() - b.double()).abs()
            difference = torch.where(same, torch.zeros_like(difference), difference)
            worst = max(worst, float(difference.nan_to_num(nan=float("inf")).max()))
    return worst
