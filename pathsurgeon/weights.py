"""Weights I/O: reading a weights file's shapes without its values, reading a state_dict, loading it into a model.

No blind unpickling: safetensors, or ``torch.load(weights_only=True)``; a torch zip declaring more than
could be real is refused before torch allocates it (:func:`pathsurgeon.untrusted.check_declared_sizes`).
A file that does not fit the model (missing, unexpected or mis-shaped keys, tensors that would lose
values) is refused before the model is touched, unless missing keys are explicitly allowed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, first_line
from .untrusted import check_declared_sizes, regular_file, weight_files_of_directory

WEIGHTS = "model.safetensors"  # the weights file of a pathsurgeon directory (and of save_pretrained's)


def check_weights_file(file: str | os.PathLike) -> None:
    """Refuse a weights path that is missing, a directory, or not a regular file (a FIFO would block)."""
    file = Path(file)
    try:
        if file.is_dir():
            raise CheckpointError(f"weights file {file} is a directory; pass the file inside it (e.g. "
                                  f"{file / WEIGHTS})")
    except OSError as error:
        raise CheckpointError(f"cannot read weights file {file} ({error.strerror or error}); fix the path") from error
    regular_file(file, "weights file", "check the path")


def weights_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weights file, read without loading the values (safetensors' header, or
    a torch zip file mapped to the meta device); what the weights fix before anything is built."""
    file = Path(file)
    fix = "pass a .safetensors file or a torch state_dict"
    if regular_file(file, "weights file", fix) == 0:
        raise CheckpointError(f"weights file {file} is empty (0 bytes); the file is truncated or not a weights file")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        check_declared_sizes(file)
        state = _torch_load(file, map_location="meta", mmap=True)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated file, a pickle weights_only refuses, not a zip
        if "meta" in str(error).lower():  # sparse, quantized: tensors whose shape cannot be read on their own
            raise CheckpointError(f"{file} holds tensors that are not plain dense ones (sparse or quantized?: "
                                  f"{first_line(error)[:80]}); save the model's state_dict() as it is trained "
                                  "(plain float tensors)") from error
        raise CheckpointError(f"cannot read {file} ({first_line(error)}); the file is truncated or not a "
                              "safetensors file or torch state_dict saved with weights_only=True") from error
    state = _unwrapped_state_dict(state, file)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def weights_shapes_of_directory(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor shape the weights of a Hugging Face directory hold, all shards together (None: no
    weights file to read); the shards are checked to lie inside the directory before one is read."""
    files = weight_files_of_directory(directory)
    if files is None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(weights_shapes(file))
    return shapes


def _torch_load(file: Path, **options: Any) -> Any:
    """``torch.load(weights_only=True)`` without torch's warnings (TypedStorage deprecation, sparse
    invariants), which would print lines of their own around pathsurgeon's one-line refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(file, weights_only=True, **options)


def _unwrapped_state_dict(state: Any, file: Path) -> Mapping:
    """The state_dict inside a training checkpoint (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"module": ...}``) or the object itself; refused unless it is a mapping."""
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} holds {type(state).__name__}, not a state_dict; save model.state_dict()")
    return state


def read_weights(file: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors or torch file (``weights_only=True``), every value a tensor; a torch
    zip declaring more than ``model`` (or, without one, the file) could hold is refused before it is read."""
    file = Path(file)
    check_weights_file(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Mapping[Any, Any] = load_file(str(file))
        except Exception as error:  # SafetensorError, OSError: truncated, empty or not safetensors
            raise CheckpointError(
                f"cannot read {file} as safetensors ({first_line(error)}); the file is truncated or not a "
                "safetensors file"
            ) from error
    else:
        check_declared_sizes(file, model)
        try:
            state = _torch_load(file, map_location="cpu")
        except Exception as error:
            raise CheckpointError(
                f"cannot read {file} as a torch checkpoint with weights_only=True ({type(error).__name__}); "
                "save it as a state_dict or safetensors file"
            ) from error
        state = _unwrapped_state_dict(state, file)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: entry {bad[0]!r} is not a tensor; save model.state_dict()")
    return dict(state)


def load_weights(model: nn.Module, file: str | os.PathLike, *, allow_missing_keys: bool = False) -> None:
    """Load a safetensors file, or a torch file with ``weights_only=True``, into ``model``.

    Every key, shape and value is checked before the model is touched: a file that does not fit raises
    :class:`CheckpointError` and leaves the model as it was.
    """
    state = read_weights(file, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if unexpected or (missing and not allow_missing_keys):
        raise CheckpointError(
            f"{file} does not fit {type(model).__name__}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); check that the model is the checkpoint's "
            "architecture"
        )
    for key, value in state.items():  # every tensor is checked before the first one is copied
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {list(value.shape)} but {type(model).__name__} expects "
                f"{list(expected[key].shape)}; check that the model (and its num_classes) match the checkpoint"
            )
        problem = _unusable_tensor(value, expected[key])
        if problem is not None:
            raise CheckpointError(f"{file}: {key} {problem}; save the model's state_dict() as it is trained "
                                  "(plain float tensors)")
    model.load_state_dict(state, strict=not missing)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unusable_tensor(value: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why ``value`` cannot be copied into ``expected`` without losing or inventing numbers (None: it can)."""
    if value.is_meta:
        return "is on the meta device (it holds no values)"
    if value.layout != torch.strided or value.is_sparse:
        return f"is a {value.layout} tensor, not a dense one"
    if getattr(value, "is_nested", False):
        return "is a nested tensor"
    if value.is_quantized:
        return f"is quantized ({value.dtype})"
    if value.dtype == expected.dtype:
        return None
    if expected.dtype in _FLOATS and value.dtype not in _FLOATS:
        return f"is {value.dtype}, which cannot hold the model's {expected.dtype} values"
    kinds = [(t.is_floating_point, t.is_complex, t == torch.bool) for t in (expected.dtype, value.dtype)]
    if kinds[0] != kinds[1]:
        return f"is {value.dtype} where the model keeps {expected.dtype}"
    return None
