"""The data files in ``recipes/`` (library facts and per-family rules), read once each."""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from typing import Any

__all__ = ["table"]


@functools.cache
def table(name: str) -> dict[str, Any]:
    """``recipes/<name>.toml`` as a dict ({} when there is no such file)."""
    try:
        text = resources.files("pathsurgeon.recipes").joinpath(f"{name}.toml").read_text()
    except FileNotFoundError:
        return {}
    return tomllib.loads(text)
