"""Verify: eval-mode outputs of the model, how far two sets of outputs are apart, and who moved them.

:func:`observe` runs the untouched model once in eval mode: its outputs are the reference the
surgered model must reproduce, and the same forward records what planning needs (the output shape
of every module a hook may go on, the inputs of every block a skip-mode check re-runs). Every
forward starts from one fixed RNG state on a fork of the generators
(:func:`~pathsurgeon.runstate.private_rng`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree

from .errors import VerificationError
from .inputs import ExampleInputs
from .runstate import private_rng, training_flags_kept

__all__ = ["Observation", "eval_outputs", "max_abs_diff", "observe", "tensor_leaves", "verification_error"]


@dataclass
class Observation:
    """One eval forward of the untouched model: its outputs and what planning needs."""

    outputs: list[torch.Tensor]
    output_shapes: dict[str, torch.Size] = field(default_factory=dict)  # first tensor output, per module
    block_inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # first call, per block
    batch: int | None = None


def observe(
    model: nn.Module, inputs: ExampleInputs, *, shapes_of: Iterable[str] = (), inputs_of: Iterable[str] = ()
) -> Observation:
    """Run ``model`` in eval mode on ``inputs``, recording the output shapes of the modules ``shapes_of``
    and the (cloned) call arguments of the modules ``inputs_of``; the hooks are gone when it returns."""
    observation = Observation(outputs=[], batch=inputs.batch_size)

    def shape(name: str, module, args, output) -> None:
        if isinstance(output, torch.Tensor) and name not in observation.output_shapes:
            observation.output_shapes[name] = output.shape

    def arguments(name: str, module, args, kwargs) -> None:
        if name not in observation.block_inputs:
            observation.block_inputs[name] = _pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs)
            )

    handles = [model.get_submodule(n).register_forward_hook(functools.partial(shape, n)) for n in set(shapes_of)]
    handles += [
        model.get_submodule(n).register_forward_pre_hook(functools.partial(arguments, n), with_kwargs=True)
        for n in set(inputs_of)
    ]
    try:
        observation.outputs = eval_outputs(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return observation

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


class Undoable(Protocol):
    """What blame needs of a change (see :class:`pathsurgeon.changes.Change`)."""

    block: str

    def install(self) -> None: ...

    def undo(self) -> None: ...


def verification_error(
    model: nn.Module,
    changes: Sequence[Undoable],
    reference: list[torch.Tensor],
    inputs: ExampleInputs,
    tolerance: float,
    difference: float,
) -> VerificationError:
    """Why the eval outputs moved: the model is random from call to call, or a change moved them.

    Leaves every change undone (the caller's transaction would undo them anyway).
    """
    for change in reversed(changes):
        change.undo()
    if not max_abs_diff(reference, eval_outputs(model, inputs)) <= tolerance:
        return VerificationError(
            f"{type(model).__name__} gives different eval outputs on the same inputs and seed from one call to "
            "the next (randomness outside torch's generators?); pass example_inputs that fix it or verify=False"
        )
    culprit = "?"
    try:
        for change in changes:  # re-apply one by one until the outputs move; name that block
            change.install()
            if not max_abs_diff(reference, eval_outputs(model, inputs)) <= tolerance:
                culprit = change.block
                break
    finally:
        for change in reversed(changes):
            change.undo()
    return VerificationError(
        f"eval outputs changed after adding DropPath (max |Δ| = {difference:g}), first at block "
        f"{culprit!r}; the model was rolled back; report this model, or pass verify=False to skip"
    )
