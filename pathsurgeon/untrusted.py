"""Hardening against untrusted files: everything pathsurgeon reads may have been crafted.

Refused before transformers, timm or torch sees a byte of it:

- anything but a regular file where a file is read (a FIFO would block the read forever), and a config
  bigger or deeper than any real one (:func:`regular_file`, :data:`MAX_CONFIG_BYTES`, :data:`MAX_CONFIG_DEPTH`);
- a Hugging Face ``config.json`` that would run the directory's own Python (``auto_map``), or a
  ``timm_wrapper`` config whose arguments reach ``timm.create_model`` unchecked (:func:`read_hf_config`);
- a PEFT ``adapter_config.json`` transformers would inject unasked (:func:`refuse_adapter`);
- a shard index pointing outside its directory (:func:`weight_files_of_directory`);
- a torch zip declaring more bytes than could be real (:func:`check_declared_sizes`);
- a config or manifest asking for tensors the weights do not hold (:func:`check_config_against_weights`,
  :func:`check_build_against_weights`: on the meta device, nothing allocated).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .errors import (
    CheckpointError,
    ManifestError,
    ModelSpecError,
    PathSurgeonError,
    UntrustedCodeError,
    first_line,
)

MAX_CONFIG_BYTES = 16 * 1024 * 1024  # as for pathsurgeon.json: the biggest real configs are well under 1 MiB
MAX_CONFIG_DEPTH = 64  # real configs nest a handful of levels (a backbone_config inside a vision_config)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ADAPTER_CONFIG = "adapter_config.json"  # transformers applies a PEFT adapter found next to the model
# a torch zip is written uncompressed (each record's declared size is its size on disk); a deflated record
# may unpack to at most this much more than the file holds, wherever the model is not known yet
MAX_UNPACKED_EXTRA = 256 * 1024 * 1024
# with the model known: every value as float64, four times over (a training checkpoint's optimizer
# moments and EMA copy), plus room for the pickle
BYTES_PER_VALUE = 4 * 8
UNPACKED_SLACK = 64 * 1024 * 1024


def regular_file(path: Path, what: str, fix: str, max_bytes: int | None = None) -> int:
    """The size of ``path``, which must be a regular file (a FIFO would block the read forever)."""
    import stat

    try:
        info = os.stat(path)
    except FileNotFoundError as error:
        raise CheckpointError(f"{what} {path} does not exist; {fix}") from error
    except OSError as error:
        raise CheckpointError(f"cannot read {what} {path} ({error.strerror or error}); {fix}") from error
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{what} {path} is a directory; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file (a FIFO, device or socket); {fix}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise CheckpointError(f"{what} {path} is larger than {max_bytes // 2**20} MiB, which no real one is; {fix}")
    return info.st_size


def check_declared_sizes(file: Path, model: nn.Module | None = None) -> None:
    """Refuse a torch zip whose records declare more bytes than could be real, before torch allocates them.

    torch allocates each record at the size the zip declares and only then inflates it: a few MB of deflated
    zeros can declare gigabytes. Without a model the records may unpack to at most ``MAX_UNPACKED_EXTRA``
    more than the file holds (torch writes them uncompressed); with one, to at most ``BYTES_PER_VALUE``
    per value of its state_dict (plus ``UNPACKED_SLACK``).
    """
    import zipfile

    try:
        if not zipfile.is_zipfile(file):
            return  # a legacy torch file is not compressed: its size on disk is what it costs
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load reports a broken zip in its own words
    declared = sum(record.file_size for record in records)
    largest = max(records, key=lambda record: record.file_size, default=None)
    if model is None:
        limit = os.stat(file).st_size + MAX_UNPACKED_EXTRA
        bound = f"the {os.stat(file).st_size:,} bytes it holds plus {MAX_UNPACKED_EXTRA >> 20} MiB"
    else:
        values = sum(tensor.numel() for tensor in model.state_dict().values())
        limit = values * BYTES_PER_VALUE + UNPACKED_SLACK
        bound = f"{limit:,} bytes, what {type(model).__name__}'s {values:,} values could need"
    if largest is not None and declared > limit:
        raise CheckpointError(
            f"{file} is a zip whose records declare {declared:,} bytes unpacked ({largest.filename}: "
            f"{largest.file_size:,}), over {bound}; it is crafted or damaged: save the state_dict again with "
            "torch.save or as safetensors"
        )


def read_hf_config(config_file: Path) -> dict[str, Any]:
    """Read ``config.json`` ourselves; refuse it if loading it would import the directory's own code.

    Also refused here, before transformers parses it: anything but a regular file (a FIFO blocks the
    read), more than 16 MiB, nesting deeper than 64 levels, and a ``timm_wrapper`` config whose
    ``model_args`` go beyond the plain arguments a manifest may carry (they reach ``timm.create_model``)
    or whose ``architecture`` names a source (``local-dir:``, ``hf-hub:``) with model_args of its own.
    """
    fix = "pass a directory written by save_pretrained"
    try:
        regular_file(config_file, "config", fix, MAX_CONFIG_BYTES)
    except CheckpointError as error:
        raise ModelSpecError(str(error)) from None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = first_line(error)
        raise ModelSpecError(f"cannot read {config_file} ({reason}); it is not a Hugging Face config") from error
    if not isinstance(config, dict):
        raise ModelSpecError(f"{config_file} holds {type(config).__name__}, not a Hugging Face config object")
    found = _find_key(config, "auto_map")
    if found is not None:
        raise UntrustedCodeError(
            f"{config_file} has {found}: loading it would run the Python files shipped with the model, which "
            "pathsurgeon never does; use a model whose architecture is built into transformers"
        )
    _check_timm_wrapper_arguments(config, config_file)
    return config


def _walk(tree: Any) -> list[tuple[str, Any]]:
    """Every (dotted path, value) of a JSON tree, breadth first, without recursion (a crafted file may nest
    thousands of levels); deeper than :data:`MAX_CONFIG_DEPTH` is refused."""
    found: list[tuple[str, Any]] = []
    level: list[tuple[str, Any]] = [("", tree)]
    for _ in range(MAX_CONFIG_DEPTH + 1):
        deeper: list[tuple[str, Any]] = []
        for path, value in level:
            found.append((path, value))
            if isinstance(value, dict):
                deeper += [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
            elif isinstance(value, list):
                deeper += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        if not deeper:
            return found
        level = deeper
    raise ModelSpecError(f"config.json nests deeper than {MAX_CONFIG_DEPTH} levels, which no Hugging Face config "
                         "does; it is not a Hugging Face config")


def _find_key(tree: Any, key: str) -> str | None:
    """The dotted path of the first ``key`` anywhere in a JSON tree (sub-configs carry their own)."""
    for path, _ in _walk(tree):
        if path == key or path.endswith(f".{key}"):
            return path
    return None


def _check_timm_wrapper_arguments(config: dict[str, Any], config_file: Path) -> None:
    """HF's TimmWrapper hands ``architecture`` and ``model_args`` to ``timm.create_model``: the manifest's
    allow-list applies, and the architecture must be a timm name, not a source with a config of its own."""
    import jsonschema

    from .manifest import CONSTRUCTOR_ARGUMENTS, STRICT_VALIDATOR

    allowed = CONSTRUCTOR_ARGUMENTS["timm"]
    schema = {"type": ["object", "null"], "additionalProperties": False, "properties": allowed}
    for path, value in _walk(config):
        architecture = value.get("architecture") if isinstance(value, dict) else None
        if isinstance(architecture, str) and ":" in architecture:
            # timm.create_model("local-dir:/x" or "hf-hub:owner/name") reads that source's config.json and
            # hands its model_args (and pretrained_cfg) to the constructor, past every check made here
            where = f"{path}.architecture" if path else "architecture"
            raise ManifestError(
                f"{config_file}: {where} is {architecture[:100]!r}, a source timm would read its own config "
                "and model_args from, unchecked; name a timm model (e.g. resnet50) in a timm_wrapper config"
            )
        if not isinstance(value, dict) or "model_args" not in value:
            continue
        error = jsonschema.exceptions.best_match(STRICT_VALIDATOR(schema).iter_errors(value["model_args"]))
        if error is not None:
            where = f"{path}.model_args" if path else "model_args"
            raise ManifestError(
                f"{config_file}: {where} may only hold {', '.join(allowed)} with plain values ({error.message[:120]}); "
                "they reach timm.create_model, so a path or another argument is refused"
            )


def weight_files_of_directory(directory: Path) -> list[Path] | None:
    """The files holding a Hugging Face directory's weights (None: no weights file to read).

    A sharded checkpoint's shards must be inside the directory (in the Hugging Face cache: inside the
    repository's folder, where the snapshot's links point); every shard is checked before one is read.
    """
    for name in WEIGHT_FILES:
        if os.path.lexists(directory / name):
            return [directory / name]
    for name in WEIGHT_INDEXES:
        index = directory / name
        if not os.path.lexists(index):
            continue
        fix = "rewrite the directory with save_pretrained"
        regular_file(index, "weights index", fix, MAX_CONFIG_BYTES)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as error:
            raise CheckpointError(f"cannot read {index} ({first_line(error)}); {fix}") from error
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files; {fix}")
        root = directory.parent.parent if directory.parent.name == "snapshots" else directory
        shards: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            relative = Path(shard)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise CheckpointError(f"{index} points a shard at {shard!r}, outside the directory; {fix}")
            resolved = (directory / relative).resolve()
            if resolved != root.resolve() and root.resolve() not in resolved.parents:
                raise CheckpointError(f"{index}: shard {shard} leads outside {root} (to {resolved}); {fix}")
            shards.append(directory / relative)
        return shards
    return None


def refuse_adapter(directory: Path, spec: str) -> None:
    """transformers injects a PEFT adapter (LoRA) found next to the model into it, unasked: refused."""
    if os.path.lexists(directory / ADAPTER_CONFIG):
        raise ModelSpecError(
            f"{spec} holds {ADAPTER_CONFIG} next to the model: transformers would inject that PEFT adapter "
            "(LoRA) into it unasked; move the adapter files out, or merge it first (merge_and_unload, then "
            "save_pretrained)"
        )


def check_config_against_weights(
    raw_config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], spec: str
) -> None:
    """Cheap bounds before anything is built: a depth the weights cannot hold, more labels than any tensor has."""
    import re

    tensors = len(shapes)
    largest = max((max(shape) for shape in shapes.values() if shape), default=0)
    fix = "check config.json against the weights file"
    for path, value in _walk(raw_config):
        name = path.rsplit(".", 1)[-1].split("[")[0]
        if name in ("id2label", "label2id") and isinstance(value, dict) and len(value) > max(largest, 100_000):
            raise CheckpointError(f"{spec}: config.json's {path} lists {len(value):,} labels; {fix}")
        numbers = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers) or not numbers:
            continue
        if re.search(r"layers|depth", name) and sum(numbers) > max(tensors, 64):
            raise CheckpointError(f"{spec}: config.json's {path} asks for {sum(numbers):,} layers but the weights "
                                  f"hold only {tensors} tensors; {fix}")
        if name == "num_labels" and value > max(largest, 100_000):
            raise CheckpointError(f"{spec}: config.json's {path} asks for {value:,} labels but no weight has more "
                                  f"than {largest:,} rows; {fix}")


def check_build_against_weights(
    build: Callable[[], nn.Module], shapes: Mapping[str, tuple[int, ...]], what: str, fix: str,
    error_class: type[PathSurgeonError] = CheckpointError,
) -> None:
    """Build the model on the meta device (no memory) and refuse it when its tensors are not the weights'.

    The weights fix every shape, so a config or manifest that asks for more (an image size whose
    position embedding has 4096² rows, 5 million labels) is refused here, before anything is allocated.
    """
    from .libraries import meta_build

    try:
        model = meta_build(build)
    except PathSurgeonError:
        raise
    except Exception as error:  # noqa: BLE001 - a constructor refusing its arguments
        raise error_class(f"{what} cannot be built ({type(error).__name__}: {first_line(error)}); {fix}") from error
    for key, tensor in model.state_dict().items():
        shape = shapes.get(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise error_class(f"{what} makes {key} of shape {list(tensor.shape)} but the weights hold "
                              f"{list(shape)}; {fix}")
    weights = sum(math.prod(shape) for shape in shapes.values())
    built = sum(math.prod(t.shape) for t in model.state_dict().values())
    if built > 2 * weights + 2**20:  # missing keys may be allowed, but not a model many times the weights
        raise error_class(f"{what} has {built:,} values but the weights only {weights:,}; {fix}")
