"""The releases pathsurgeon needs, and one check for a capability that needs a newer one than the floors.

The floors (what ``pip install pathsurgeon`` accepts) are in pyproject.toml and ``.ci/floors.txt``; CI
runs the test suite on them. A capability that needs more is refused with one line naming the release,
never with an import-time crash or a traceback from deep inside torch:

>>> require("torch", (2, 0), "this example")   # passes on every supported torch
"""

from __future__ import annotations

import importlib.metadata
import re

from .errors import UnsupportedVersionError

__all__ = ["ONNX_EXPORT_TORCH", "installed", "require"]

# torch.onnx.export(dynamo=True) with dynamic_shapes and the ONNX IR model this module edits: torch 2.4
# has none of it; 2.6 exports some models and fails others inside the exporter (a ResNet's batch norm).
ONNX_EXPORT_TORCH = (2, 9)


def installed(distribution: str) -> tuple[int, ...] | None:
    """The release of an installed distribution as numbers (``(2, 4, 1)`` for ``2.4.1+cu121``), or None."""
    try:
        text = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else None


def require(distribution: str, minimum: tuple[int, ...], capability: str) -> None:
    """Raise :class:`UnsupportedVersionError` unless ``distribution`` is at least ``minimum``."""
    have = installed(distribution)
    if have is not None and have >= minimum:
        return
    wanted = ".".join(map(str, minimum))
    found = "not installed" if have is None else f"{distribution} {'.'.join(map(str, have))} is installed"
    raise UnsupportedVersionError(
        f"{capability} needs {distribution} >= {wanted} ({found}): pip install '{distribution}>={wanted}'"
    )
