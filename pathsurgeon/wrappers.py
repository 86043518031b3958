"""Models inside data-parallel or compile wrappers: pathsurgeon works on the model itself, before wrapping.

The order is add → wrap (DDP / FSDP) → train → gather the full state dict → strip → export. A wrapper
object (DistributedDataParallel, DataParallel, FSDP1, torch.compile's OptimizedModule) is refused with
the attribute that holds the model: its ``forward`` is not the model's, and the surgery record must live
on the model the user keeps training. A model that FSDP2's ``fully_shard`` already sharded is refused by
:func:`~pathsurgeon.add` (capture and the eval check would run collectives on sharded parameters); it
keeps its class lineage and its record, so ``set_rate`` and ``strip`` work on it after training.

Wrapper classes are looked up in ``sys.modules`` only: a program that never imported FSDP or dynamo
cannot hold one of their wrappers, and checking must not import them.
"""

from __future__ import annotations

import sys

from torch import nn

from .errors import PathSurgeonError, WrappedModelError

__all__ = ["check_model", "check_not_sharded", "check_not_wrapped"]


def _wrappers() -> list[tuple[type, str]]:
    """(wrapper class, attribute holding the model) for every wrapper whose module is loaded."""
    found: list[tuple[type, str]] = [(nn.parallel.DistributedDataParallel, "module"), (nn.DataParallel, "module")]
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and hasattr(fsdp, "FullyShardedDataParallel"):
        found.append((fsdp.FullyShardedDataParallel, "module"))
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and hasattr(dynamo, "OptimizedModule"):
        found.append((dynamo.OptimizedModule, "_orig_mod"))
    return found


def check_model(model: object) -> None:
    """Raise a one-line :class:`~pathsurgeon.errors.PathSurgeonError` unless ``model`` is a model itself."""
    if not isinstance(model, nn.Module):
        raise PathSurgeonError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself"
        )
    check_not_wrapped(model)


def check_not_wrapped(model: nn.Module) -> None:
    """Raise :class:`~pathsurgeon.errors.WrappedModelError` naming the fix if ``model`` is a wrapper object."""
    for wrapper, attribute in _wrappers():
        if isinstance(model, wrapper):
            raise WrappedModelError(
                f"got a {wrapper.__name__} wrapper, not the model; pass the model inside it "
                f"(model.{attribute}), or better call pathsurgeon before wrapping: add → wrap → train → strip"
            )


def _fsdp2_module_class() -> type | None:
    for name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "FSDPModule"):
            return module.FSDPModule
    return None


def check_not_sharded(model: nn.Module) -> None:
    """Raise :class:`~pathsurgeon.errors.WrappedModelError` if FSDP2's ``fully_shard`` sharded ``model``."""
    sharded = _fsdp2_module_class()
    if sharded is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, sharded):
            where = f"its module {name!r} is" if name else "it is"
            raise WrappedModelError(
                f"model is already sharded ({where} an FSDP module); call pathsurgeon.add before fully_shard: "
                "add → fully_shard → train → strip"
            )
