"""pathsurgeon: per-sample stochastic depth for already-built timm, Hugging Face and torchvision models.

>>> import timm, pathsurgeon
>>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
>>> report = pathsurgeon.add(model, rate=0.1)   # in place; eval outputs verified bitwise equal
>>> pathsurgeon.strip(model)                    # the original object again
>>> report = pathsurgeon.add(model, rate=0.1, mode="skip")  # dropped samples are not computed
>>> scheduler = pathsurgeon.RateScheduler.warmup(model, 0.1, steps=100)  # rate over training

Names are imported on first use, so ``pathsurgeon --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "add": "surgery",
    "find": "surgery",
    "preview": "surgery",
    "set_rate": "surgery",
    "strip": "surgery",
    "is_surgered": "surgery",
    "Branch": "surgery",
    "Report": "surgery",
    "Skipped": "surgery",
    "Fallback": "surgery",
    "load": "checkpoint",
    "RateScheduler": "schedulers",
    "published_rate": "published",
    "published_rates": "published",
    "PublishedRate": "published",
    "constructor_arguments": "libraries",
    "RebuildError": "libraries",
    "DropPath": "droppath",
    "drop_path": "droppath",
    "register_drop_path_class": "slots",
    "register_leaf_module": "capture",
    "PathSurgeonError": "errors",
    "AlreadySurgeredError": "errors",
    "CaptureError": "errors",
    "UntrustedCodeError": "errors",
    "OutputPathError": "errors",
    "ModelSpecError": "errors",
    "ManifestError": "errors",
    "CheckpointError": "errors",
    "InvalidModeError": "errors",
    "InvalidRateError": "errors",
    "InvalidScheduleError": "errors",
    "NoBranchesError": "errors",
    "VerificationError": "errors",
    "WrappedModelError": "errors",
    "NoPublishedRateError": "errors",
}

__all__ = [
    "AlreadySurgeredError",
    "Branch",
    "CaptureError",
    "CheckpointError",
    "DropPath",
    "Fallback",
    "InvalidModeError",
    "InvalidRateError",
    "InvalidScheduleError",
    "ManifestError",
    "ModelSpecError",
    "NoBranchesError",
    "OutputPathError",
    "NoPublishedRateError",
    "PathSurgeonError",
    "PublishedRate",
    "RateScheduler",
    "RebuildError",
    "Report",
    "Skipped",
    "UntrustedCodeError",
    "VerificationError",
    "WrappedModelError",
    "add",
    "constructor_arguments",
    "drop_path",
    "find",
    "is_surgered",
    "load",
    "preview",
    "published_rate",
    "published_rates",
    "register_drop_path_class",
    "register_leaf_module",
    "set_rate",
    "strip",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pathsurgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .capture import register_leaf_module
    from .checkpoint import load
    from .droppath import DropPath, drop_path
    from .errors import (
        AlreadySurgeredError,
        CaptureError,
        CheckpointError,
        InvalidModeError,
        InvalidRateError,
        InvalidScheduleError,
        ManifestError,
        ModelSpecError,
        NoBranchesError,
        NoPublishedRateError,
        OutputPathError,
        PathSurgeonError,
        UntrustedCodeError,
        VerificationError,
        WrappedModelError,
    )
    from .libraries import RebuildError, constructor_arguments
    from .published import PublishedRate, published_rate, published_rates
    from .schedulers import RateScheduler
    from .slots import register_drop_path_class
    from .surgery import Branch, Fallback, Report, Skipped, add, find, is_surgered, preview, set_rate, strip
