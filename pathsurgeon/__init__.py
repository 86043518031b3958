"""pathsurgeon: per-sample stochastic depth for already-built timm, Hugging Face and torchvision models.

>>> import timm, pathsurgeon
>>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
>>> report = pathsurgeon.add(model, rate=0.1)   # in place; eval outputs verified bitwise equal
>>> pathsurgeon.strip(model)                    # the original object again
>>> report = pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.1, mode="skip"))  # dropped samples not computed
>>> scheduler = pathsurgeon.RateScheduler.warmup(model, 0.1, steps=100)  # rate over training
>>> pathsurgeon.save(model, "out/run1"); model = pathsurgeon.load("out/run1")
>>> pathsurgeon.export_onnx(model, "vit.onnx")  # strip first; any batch size, checked with onnxruntime

Names are imported on first use, so ``pathsurgeon --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._version import __version__ as __version__

# The package's logger, parent of every module's (``pathsurgeon.surgery``, ...): progress and decisions
# nobody asked to see. A library configures no handler of its own beyond this one, which keeps
# Python's last-resort handler from printing them; the application chooses what it shows.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# The public names, by the module that defines them: the one list of them.
_MODULES = {
    "surgery": ("add", "find", "is_surgered", "preview", "set_rate", "strip"),
    "config": ("DropPathConfig",),
    "report": ("Branch", "Fallback", "LeftAlone", "Preview", "Report"),
    "checkpoint": ("load", "save"),
    "schedulers": ("RateScheduler",),
    "published": ("PublishedRate", "published_rate", "published_rates"),
    "libraries": ("RebuildError", "constructor_arguments"),
    "droppath": ("DropPath", "drop_path"),
    "slots": ("register_drop_path_class",),
    "capture": ("register_leaf_module",),
    "export": ("OnnxReport", "export_onnx"),
    "errors": (
        "AlreadySurgeredError",
        "CaptureError",
        "CheckpointError",
        "ExampleInputsError",
        "InvalidModeError",
        "InvalidRateError",
        "InvalidScheduleError",
        "ManifestError",
        "ModelSpecError",
        "NoBranchesError",
        "NoPublishedRateError",
        "OutputPathError",
        "PathSurgeonError",
        "SavedBranchesMovedError",
        "ScriptingError",
        "UnsupportedVersionError",
        "UntrustedCodeError",
        "VerificationError",
        "WrappedModelError",
    ),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
_ALIASES = {"Skipped": "LeftAlone"}  # the 0.1 name
# Submodules reachable as attributes without importing them first (``pathsurgeon.export.export_onnx``).
_SUBMODULES = ("export",)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _ALIASES.get(name, name)
    if target in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[target]}", __name__), target)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it in globals() too
    raise AttributeError(f"module 'pathsurgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
