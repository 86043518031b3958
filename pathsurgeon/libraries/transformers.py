"""Hugging Face transformers: ``type(model)(config)`` with the config's ``drop_path_rate`` set to ``r``.

The config is the model's own (deep-copied), so every architecture choice is kept. Models whose
config has no single ``drop_path_rate`` (none at all: ViT, DeiT, CLIP; a per-stage list: CvT) have
no library rate: there the report says so and pathsurgeon's recipe decides.
"""

from __future__ import annotations

import copy
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
    takes_rate = isinstance(rate, (int, float)) and not isinstance(rate, bool)
    arguments: dict[str, Any] = {"config": config.to_dict()}
    return [Constructor("transformers", cls.__name__, arguments, RATE_ARGUMENT if takes_rate else None,
                        lambda r: _build(cls, config, r))]


def _build(cls: type, config, rate: float | None) -> nn.Module:
    config = copy.deepcopy(config)
    if rate is not None:
        setattr(config, RATE_ARGUMENT, rate)
    return cls(config)
