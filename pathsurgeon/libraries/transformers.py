"""Hugging Face transformers: ``type(model)(config)`` with the config's ``drop_path_rate`` set to ``r``.

The config is the model's own (deep-copied), so every architecture choice is kept. Models whose
config has no single ``drop_path_rate`` (none at all: ViT, DeiT, CLIP; a per-stage list: CvT) have
no library rate: there the report says so and pathsurgeon's recipe decides.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import nn

from . import Constructor, RebuildError

RATE_ARGUMENT = "drop_path_rate"


def candidates(model: nn.Module) -> list[Constructor]:
    cls = type(model)
    if not cls.__module__.startswith("transformers."):
        return []
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise RebuildError(f"{cls.__name__} has no Hugging Face config to rebuild it from")
    rate = getattr(config, RATE_ARGUMENT, None)
    if isinstance(rate, (list, tuple)):
        why = f"its config's {RATE_ARGUMENT} is a per-stage list, not one rate"
    elif not isinstance(rate, (int, float)) or isinstance(rate, bool):
        why = f"its config has no {RATE_ARGUMENT}"
    elif not _takes_a_float(config):
        why = f"its config's {RATE_ARGUMENT} takes no fraction (declared an int)"
    else:
        why = ""
    arguments: dict[str, Any] = {"config": config.to_dict()}
    return [Constructor("transformers", cls.__name__, arguments, None if why else RATE_ARGUMENT,
                        functools.partial(_build, cls, config), why_no_rate=why)]


def _takes_a_float(config) -> bool:
    try:
        setattr(copy.deepcopy(config), RATE_ARGUMENT, 0.5)
    except Exception:  # noqa: BLE001 - transformers 5 validates config fields (HF LeViT declares an int)
        return False
    return True


def _build(cls: type, config, rate: float | None) -> nn.Module:
    config = copy.deepcopy(config)
    if rate is not None:
        setattr(config, RATE_ARGUMENT, rate)
    return cls(config)
