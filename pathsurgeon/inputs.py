"""Example inputs: what the user gave, or a small random batch built from the model's own config."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ExampleInputsError, PathSurgeonError
from .tables import table

__all__ = ["ExampleInputs", "example_inputs", "made_up_inputs_failed"]

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

    def first_samples(self, count: int) -> ExampleInputs:
        """The same inputs cut to their first ``count`` samples (every tensor with the batch's length)."""
        return self.samples(0, count)

    def samples(self, start: int, stop: int) -> ExampleInputs:
        """The same inputs cut to samples ``start:stop`` (every tensor with the batch's length)."""
        batch = self.batch_size
        if batch is None or (start == 0 and batch <= stop):
            return self

        def cut(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                return value[start:stop]
            return value

        return ExampleInputs(tuple(cut(v) for v in self.args), {k: cut(v) for k, v in self.kwargs.items()})


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
    special = _token_inputs(model) or patch_inputs(model)
    if special is not None:
        return special
    shape, keyword = input_shape(model)
    if shape is None:
        raise PathSurgeonError(
            f"cannot tell what input {type(model).__name__} takes (no timm pretrained_cfg, no image size or "
            "channel count in its config, no convolution to read channels from); "
            "pass example_inputs=torch.randn(2, C, H, W) or a dict of keyword arguments"
        )
    check_made_up_shape(model, shape)
    device, dtype = placement(model)
    generator = torch.Generator().manual_seed(_SEED)
    batch = torch.randn((EXAMPLE_BATCH, *shape), generator=generator).to(device=device, dtype=dtype)
    if keyword is None:
        return ExampleInputs((batch,), {})
    return ExampleInputs((), {keyword: batch})


def check_made_up_shape(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Refuse to make up an input no image has (a size <= 0) or one whose forward could exhaust memory.

    The size comes from what the model states (timm's ``input_size``, a config's ``image_size``), which
    no weight checks where no weight depends on it: bounded at ``max_made_up_values`` per image.
    """
    name = type(model).__name__
    text = "x".join(str(v) for v in shape)
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape):
        raise ExampleInputsError(
            f"{name} states an input size of {text}, which no image has; fix the image_size / img_size it was "
            "configured with, or pass example_inputs= a batch it takes"
        )
    if math.prod(shape) > MAX_MADE_UP_VALUES:
        raise ExampleInputsError(
            f"{name} states an input size of {text}, over the {MAX_MADE_UP_VALUES:,} values per image pathsurgeon "
            "makes up (3x2048x2048: a forward at that size can cost many GB); pass example_inputs= a batch of the "
            "size you train at, or fix the configured image size"
        )


def made_up_inputs_failed(model: nn.Module, inputs: ExampleInputs, error: BaseException) -> ExampleInputsError:
    """The error for a model that fails on the inputs :func:`example_inputs` made for it: pass your own."""
    shapes = ", ".join(
        f"{key}{tuple(value.shape)}" for key, value in
        [*(("", a) for a in inputs.args), *((f"{k}=", v) for k, v in inputs.kwargs.items())]
        if isinstance(value, torch.Tensor)
    )
    lines = str(error).strip().splitlines()
    return ExampleInputsError(
        f"{type(model).__name__} does not run on the random inputs pathsurgeon made from its config ({shapes}: "
        f"{type(error).__name__}: {lines[0][:160] if lines else ''}); pass example_inputs= a batch it takes, "
        f"e.g. example_inputs={_input_form(model, inputs)}"
    )


def _input_form(model: nn.Module, inputs: ExampleInputs) -> str:
    """How to pass a batch: positionally for a model that takes one image, else the keywords its
    forward takes (the made-up ones, and the token ids a text tower or decoder reads)."""
    if not inputs.kwargs:
        return "torch.randn(2, C, H, W)"
    try:
        parameters = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    shown = [f"'{k}': torch.randn(2, C, H, W)" if torch.is_floating_point(v) else f"'{k}': torch.randint(...)"
             for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)]
    shown += [f"'{name}': torch.randint(...)" for name in parameters
              if name.endswith("input_ids") and name not in inputs.kwargs]
    return "{" + ", ".join(shown) + "}"


_FACTS = table("inputs")
DEFAULT_IMAGE_SIZE = int(_FACTS["default_image_size"])
# The most values one made-up image may hold (channels x height x width): 3 x 2048 x 2048. A size a model
# states is checked by no weight where no weight depends on it (ConvNeXt, CoaT, EfficientFormer:
# image_size 16384 asks for a 6 GB input batch and a forward far larger); the models pathsurgeon knows
# state at most 1024 pixels a side (SAM, LW-DETR). Beyond it, the user passes inputs of their own size.
MAX_MADE_UP_VALUES = 3 * 2048 * 2048


def _first(owner: object, names: list[str]) -> object:
    for name in names:
        value = getattr(owner, name, None)
        if value is not None:
            return value
    return None


def input_shape(model: nn.Module) -> tuple[tuple[int, ...] | None, str | None]:
    """(C, H, W) of one image and the keyword it is passed as (None: positionally).

    In order (the attribute names are in ``recipes/inputs.toml``): what timm states of a model it built
    (:func:`_timm_input_shape`); the ``image_size`` / ``num_channels`` a Hugging Face model's configs
    state (:func:`_hf_image_configs`: its ``vision_config``, the config, its ``backbone_config``); an
    ``image_size`` / ``img_size`` the model or its patch embedding keeps (torchvision ViT); else 224 × 224
    with the channel count of the first convolution or the config (3 when only a size is known).
    """
    keyword = _FACTS["hf_pixel_keyword"] if _FACTS["hf_pixel_keyword"] in forward_parameters(model) else None
    timm_shape = _timm_input_shape(model)
    if timm_shape is not None:
        return timm_shape, keyword
    configs = _hf_image_configs(model)
    channels = _first_stated(configs, _FACTS["hf_channels"])
    size = size_pair(_first_stated(configs, _FACTS["hf_image_size"]))
    if size is None:
        size = _own_image_size(model)
    if not isinstance(channels, int):
        channels = _first_convolution_channels(model)
    if channels is None and size is not None:
        channels = 3  # it states an image size but nothing about channels (HF Perceiver's Fourier features)
    if channels is None:
        return None, None
    height, width = size if size is not None else (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    return (channels, height, width), keyword


def _hf_image_configs(model: nn.Module) -> list[object]:
    """The Hugging Face configs that may state ``model``'s image size and channels, in the order they
    are read: a composite's vision config, the config itself, its backbone's config (none: not HF's)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    nested = [_first(config, _FACTS[key]) for key in ("hf_nested_configs", "hf_backbone_configs")]
    return [c for c in (nested[0], config, nested[1]) if c is not None]


def _first_stated(configs: list[object], names: list[str]) -> object:
    """The first of ``names`` stated (not None) by the first config that states one."""
    return next((value for value in (_first(c, names) for c in configs) if value is not None), None)


def _timm_input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) as timm states it for a model it built (``pretrained_cfg``, the ``img_size`` and
    ``in_chans`` it was built with: :func:`pathsurgeon.libraries.timm.stated_input_size`), never the
    first convolution's channels (TResNet's stem reads 48 after a space-to-depth); None when not timm's."""
    if not isinstance(_first(model, _FACTS["timm_configs"]), dict):
        return None
    from .libraries.timm import stated_input_size

    return stated_input_size(model)


def size_pair(size: object) -> tuple[int, int] | None:
    """(height, width) from an image size stated as one int or a pair (None: neither)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) >= 2 and all(isinstance(v, int) for v in size[:2]):
        return (int(size[0]), int(size[1]))
    return None


def _own_image_size(model: nn.Module) -> tuple[int, int] | None:
    """An input size the model keeps itself: torchvision ViT's ``image_size``, a patch embedding's."""
    for owner in (model, _first(model, _FACTS["patch_embeddings"])):
        size = size_pair(_first(owner, _FACTS["own_image_size"]))
        if size is not None:
            return size
    return None


def _first_convolution_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where made-up inputs go: the device of the model's parameters, their dtype if floating point."""
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return device, dtype


def forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


TOKENS = 64  # enough positions to run every layer; far fewer than a whole image's


def _token_inputs(model: nn.Module) -> ExampleInputs | None:
    """Models that read an image as token ids (HF ImageGPT: colour-cluster ids): random ids."""
    parameters = forward_parameters(model)
    config = getattr(model, "config", None)
    vocabulary = getattr(config, "vocab_size", None)
    if "pixel_values" in parameters or "input_ids" not in parameters or not isinstance(vocabulary, int):
        return None
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or TOKENS
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(_SEED)
    ids = torch.randint(0, vocabulary, (EXAMPLE_BATCH, min(int(positions), TOKENS)), generator=generator)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device)}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False  # a returned key/value cache is no output to compare, nor to trace
    return ExampleInputs((), kwargs)


def patch_inputs(model: nn.Module) -> ExampleInputs | None:
    """Models that take images already cut into patches, with their grid (HF SigLIP2's NaFlex)."""
    if "spatial_shapes" not in forward_parameters(model):
        return None
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    patches, patch, channels = (getattr(vision, k, None) for k in ("num_patches", "patch_size", "num_channels"))
    if not (isinstance(patches, int) and isinstance(patch, int) and isinstance(channels, int)):
        return None
    side = math.isqrt(max(patches, 0))
    check_made_up_shape(model, (side * side, channels * patch * patch))
    device, dtype = placement(model)
    generator = torch.Generator().manual_seed(_SEED)
    pixels = torch.randn((EXAMPLE_BATCH, side * side, channels * patch * patch), generator=generator)
    return ExampleInputs((), {
        "pixel_values": pixels.to(device=device, dtype=dtype),
        "pixel_attention_mask": torch.ones(EXAMPLE_BATCH, side * side, dtype=torch.long, device=device),
        "spatial_shapes": torch.tensor([[side, side]] * EXAMPLE_BATCH, device=device),
    })
