"""Example inputs: what the user gave, or a small random batch built from the model's own config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PathSurgeonError

__all__ = ["ExampleInputs", "example_inputs"]

EXAMPLE_BATCH = 2
_SEED = 0


@dataclass
class ExampleInputs:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def batch_size(self) -> int | None:
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return value.shape[0]
        return None

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def example_inputs(model: nn.Module, given: object = None) -> ExampleInputs:
    """Normalise user-given inputs, or make a random image batch of the size the model expects.

    ``given`` may be a tensor, a tuple of positional arguments, a dict of keyword arguments, or an
    :class:`ExampleInputs`. Random inputs come from a private generator, so the global RNG is untouched.
    """
    if isinstance(given, ExampleInputs):
        return given
    if isinstance(given, torch.Tensor):
        return ExampleInputs((given,), {})
    if isinstance(given, (tuple, list)):
        return ExampleInputs(tuple(given), {})
    if isinstance(given, dict):
        return ExampleInputs((), dict(given))
    if given is not None:
        raise PathSurgeonError(
            f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
            f"got {type(given).__name__}; pass e.g. example_inputs=torch.randn(2, 3, 224, 224)"
        )
    shape, keyword = _input_shape(model)
    if shape is None:
        raise PathSurgeonError(
            f"cannot tell what input {type(model).__name__} takes (no timm pretrained_cfg, no HF config "
            "image_size); pass example_inputs=torch.randn(2, 3, H, W) or a dict of keyword arguments"
        )
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(_SEED)
    batch = torch.randn((EXAMPLE_BATCH, *shape), generator=generator).to(device=device, dtype=dtype)
    if keyword is None:
        return ExampleInputs((batch,), {})
    return ExampleInputs((), {keyword: batch})


def _input_shape(model: nn.Module) -> tuple[tuple[int, ...] | None, str | None]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        channels, height, width = (int(v) for v in cfg["input_size"])
        # a timm model built with img_size=... keeps the pretrained cfg's size; its patch embed knows better
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            height, width = (int(v) for v in size)
        return (channels, height, width), None
    config = getattr(model, "config", None)
    if config is not None:
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", None)
        channels = getattr(vision, "num_channels", 3)
        if size is not None:
            height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
            return (int(channels), int(height), int(width)), "pixel_values"
    return None, None
