"""pathsurgeon: per-sample stochastic depth for already-built timm, Hugging Face and torchvision models.

>>> import timm, pathsurgeon
>>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
>>> report = pathsurgeon.add(model, rate=0.1)   # in place; eval outputs verified bitwise equal
>>> pathsurgeon.strip(model)                    # the original object again
"""

from .capture import register_leaf_module
from .droppath import DropPath, drop_path
from .errors import (
    AlreadySurgeredError,
    CaptureError,
    InvalidRateError,
    InvalidScheduleError,
    NoBranchesError,
    PathSurgeonError,
    VerificationError,
)
from .slots import register_drop_path_class
from .surgery import Branch, Report, Skipped, add, find, is_surgered, set_rate, strip

__version__ = "0.1.0"

__all__ = [
    "AlreadySurgeredError",
    "Branch",
    "CaptureError",
    "DropPath",
    "InvalidRateError",
    "InvalidScheduleError",
    "NoBranchesError",
    "PathSurgeonError",
    "Report",
    "Skipped",
    "VerificationError",
    "add",
    "drop_path",
    "find",
    "is_surgered",
    "register_drop_path_class",
    "register_leaf_module",
    "set_rate",
    "strip",
]
