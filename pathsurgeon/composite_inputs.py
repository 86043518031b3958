"""Example inputs for composites, made from their configs: every tower and prompt path runs.

A whole-model image batch (:func:`pathsurgeon.inputs.example_inputs`) leaves the text tower of a CLIP
and the prompt path of a SAM unrun, or fails outright. Here: image and text for two-tower models
(open_clip's ``CLIP``, Hugging Face models whose forward takes both ``pixel_values`` and
``input_ids``), image and one point prompt for SAM-style models, image and decoder token ids for
captioning models (VisionEncoderDecoder: the image at its encoder's size), a list of images for a
torchvision detector (at its transform's ``min_size``). None where the model is none
of these (the image batch is then made as for any model).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from .inputs import (
    EXAMPLE_BATCH,
    ExampleInputs,
    forward_parameters,
    input_shape,
    patch_inputs,
    placement,
    size_pair,
)

__all__ = ["composite_inputs", "detection_image_size"]

_SEED = 0
TEXT_TOKENS = 16  # enough positions to run every text layer; fewer than any text tower's context


def composite_inputs(model: nn.Module) -> ExampleInputs | None:
    """Inputs that run every part of a two-tower or prompted composite (None: not one of those)."""
    for make in (_open_clip_inputs, _hf_image_text_inputs, _hf_prompted_inputs, _hf_captioning_inputs,
                 _detection_inputs):
        made = make(model)
        if made is not None:
            return made
    return None


def _images(model: nn.Module, channels: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    device, dtype = placement(model)
    return torch.randn((EXAMPLE_BATCH, channels, *size), generator=generator).to(device=device, dtype=dtype)


def _tokens(model: nn.Module, vocabulary: int, length: int, generator: torch.Generator) -> torch.Tensor:
    device, _ = placement(model)
    return torch.randint(0, vocabulary, (EXAMPLE_BATCH, length), generator=generator).to(device)


def _open_clip_inputs(model: nn.Module) -> ExampleInputs | None:
    """open_clip ``CLIP`` / ``CustomTextCLIP``: ``forward(image, text)``, sizes kept on the model."""
    if not type(model).__module__.startswith("open_clip.") or not {"image", "text"} <= forward_parameters(model):
        return None
    visual = getattr(model, "visual", None)
    size = size_pair(getattr(visual, "image_size", None))
    context = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", None)
    vocabulary = getattr(model, "vocab_size", None) or getattr(getattr(model, "text", None), "vocab_size", None)
    if size is None or not isinstance(context, int) or not isinstance(vocabulary, int):
        return None
    generator = torch.Generator().manual_seed(_SEED)
    return ExampleInputs((_images(model, 3, size, generator), _tokens(model, vocabulary, context, generator)), {})


def _hf_image_text_inputs(model: nn.Module) -> ExampleInputs | None:
    """Hugging Face two-tower models (CLIP, SigLIP, Grounding DINO, ...): ``pixel_values`` of the size
    their configs state (:func:`pathsurgeon.inputs.input_shape`) and ``input_ids`` from the ``text_config``."""
    parameters = forward_parameters(model)
    if not {"pixel_values", "input_ids"} <= parameters:
        return None
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    vocabulary = getattr(text, "vocab_size", None)
    if not isinstance(vocabulary, int):
        return None
    generator = torch.Generator().manual_seed(_SEED)
    if "spatial_shapes" in parameters:  # SigLIP2's NaFlex: images already cut into patches, with their grid
        images = patch_inputs(model)
        if images is None:
            return None
        pixels = images.kwargs
    else:  # the image size made-up images have (a Grounding DINO states it on its backbone_config)
        shape, _ = input_shape(model)
        if shape is None or len(shape) != 3:
            return None
        channels, *size = shape
        size_2d = cast(tuple[int, int], tuple(size))  # len(shape) == 3 just above
        pixels = {"pixel_values": _images(model, channels, size_2d, generator)}
    positions = getattr(text, "max_position_embeddings", None) or TEXT_TOKENS
    tokens = _tokens(model, vocabulary, min(int(positions), TEXT_TOKENS), generator)
    return ExampleInputs((), {**pixels, "input_ids": tokens})


def _hf_prompted_inputs(model: nn.Module) -> ExampleInputs | None:
    """Hugging Face SAM-style models: the image and one point prompt per image, so that the prompt
    encoder and mask decoder run as they do in use (without a prompt SAM takes another path)."""
    if not {"pixel_values", "input_points", "input_labels"} <= forward_parameters(model):
        return None
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    # SAM keeps the image size on its vision config, SAM 2 and EdgeTAM on their prompt encoder's
    size = next(filter(None, (size_pair(getattr(c, "image_size", None)) for c in
                              (vision, config, getattr(config, "prompt_encoder_config", None)))), None)
    channels = getattr(vision, "num_channels", 3)
    if size is None or not isinstance(channels, int):
        return None
    generator = torch.Generator().manual_seed(_SEED)
    device, dtype = placement(model)
    points = torch.rand((EXAMPLE_BATCH, 1, 1, 2), generator=generator) * torch.tensor(size[::-1], dtype=torch.float32)
    return ExampleInputs((), {
        "pixel_values": _images(model, channels, size, generator),
        "input_points": points.to(device=device, dtype=dtype),
        "input_labels": torch.ones((EXAMPLE_BATCH, 1, 1), dtype=torch.long, device=device),
    })


def _hf_captioning_inputs(model: nn.Module) -> ExampleInputs | None:
    """Hugging Face captioning models (``VisionEncoderDecoderModel``): ``pixel_values`` of the size the
    encoder's config states (a 32-pixel ViT takes 32, not 224), ``decoder_input_ids`` from the decoder's
    vocabulary, and ``use_cache=False`` (a returned key/value cache is no output to compare, nor to trace)."""
    parameters = forward_parameters(model)
    encoder, decoder = getattr(model, "encoder", None), getattr(getattr(model, "config", None), "decoder", None)
    vocabulary = getattr(decoder, "vocab_size", None)
    if not {"pixel_values", "decoder_input_ids"} <= parameters or not isinstance(encoder, nn.Module):
        return None
    shape, _ = input_shape(encoder)
    if shape is None or len(shape) != 3 or not isinstance(vocabulary, int):
        return None
    channels, height, width = shape
    generator = torch.Generator().manual_seed(_SEED)
    positions = getattr(decoder, "max_position_embeddings", None) or getattr(decoder, "n_positions", None)
    length = min(int(positions or TEXT_TOKENS), TEXT_TOKENS)
    kwargs: dict[str, torch.Tensor | bool] = {
        "pixel_values": _images(model, channels, (height, width), generator),
        "decoder_input_ids": _tokens(model, vocabulary, length, generator),
    }
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    return ExampleInputs((), kwargs)


def detection_image_size(model: nn.Module, *, padded: bool = False) -> int | None:
    """The side of the images a torchvision detector's transform (``GeneralizedRCNNTransform``) makes:
    its ``min_size`` (at most ``max_size``), ``padded`` up to ``size_divisible`` as its backbone sees them;
    None where ``model`` has no such transform."""
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:
        return None
    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        return None
    side = min(max(int(s) for s in transform.min_size), int(transform.max_size))
    divisor = int(transform.size_divisible)
    return -(-side // divisor) * divisor if padded else side


def _detection_inputs(model: nn.Module) -> ExampleInputs | None:
    """A list of images, as a torchvision detector's forward takes them (eval mode: no targets)."""
    side = detection_image_size(model)
    if side is None:
        return None
    images = _images(model, 3, (side, side), torch.Generator().manual_seed(_SEED))
    return ExampleInputs((list(images),), {})
