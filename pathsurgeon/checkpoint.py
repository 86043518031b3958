"""Getting models in and out: model specs (timm names, HF ids, local directories), weights files, and
pathsurgeon checkpoint directories (``model.safetensors`` + ``pathsurgeon.json``).

Everything read here is treated as untrusted:

- no foreign Python runs: a Hugging Face ``config.json`` with ``auto_map`` (the directory's own
  modeling code) is refused before transformers sees it, and every transformers call passes
  ``trust_remote_code=False``;
- no blind unpickling: safetensors, or ``torch.load(weights_only=True)``;
- ``pathsurgeon.json`` is validated against a schema (:mod:`pathsurgeon.manifest`) and only
  allow-listed plain architecture arguments reach a constructor;
- a checkpoint that does not fit the model (missing, unexpected or mis-shaped keys) is refused
  before the model is touched, unless missing keys are explicitly allowed.

Loading is offline-first: pretrained weights come from the local cache only unless ``HF_HUB_OFFLINE=0``.
Writes go through :mod:`pathsurgeon.files` (staged, renamed into place).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ._version import __version__
from .errors import (
    CaptureError,
    CheckpointError,
    ExampleInputsError,
    ManifestError,
    ModelSpecError,
    PathSurgeonError,
    SavedBranchesMovedError,
    UntrustedCodeError,
)
from .files import check_outputs, staged
from .manifest import FORMAT_VERSION, MANIFEST, read_manifest
from .runstate import serialised

__all__ = [
    "LoadedModel",
    "ModelSpecError",
    "describe",
    "load",
    "load_model",
    "load_weights",
    "save",
    "write_checkpoint",
]

WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
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


def downloads_allowed() -> bool:
    """Offline-first: the hub is only contacted when the user set ``HF_HUB_OFFLINE=0``."""
    return os.environ.get("HF_HUB_OFFLINE") == "0"


@dataclass
class LoadedModel:
    """A model the command line loaded, whether its weights are trained ones, and what to tell the user."""

    model: nn.Module
    pretrained: bool
    notes: list[str] = field(default_factory=list)
    saved_surgery: dict[str, Any] | None = None  # a pathsurgeon directory's surgery, which loading leaves off


@serialised
def load_model(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    require_pretrained: bool = False,
    allow_missing_keys: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> LoadedModel:
    """Build the model ``spec`` names: a pathsurgeon or HF directory, a timm name, or an HF hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("the model spec is empty; pass a timm model name, an HF hub id or a directory")
    if weights is not None:  # a 0-byte or truncated file is noticed before a large model is built
        weights_shapes(weights)
    path = Path(spec)
    try:
        path.exists()
    except OSError as error:  # a name too long for any filesystem: not a directory, nor a model name
        raise ModelSpecError(f"model spec {spec[:60]!r}... is not a usable path ({error.strerror or error}); pass "
                             "a timm model name, an HF hub id or a directory") from error
    if path.is_dir():
        for name in (MANIFEST, HF_CONFIG):  # a FIFO there is not "a directory without config.json"
            if (path / name).exists() and not (path / name).is_file():
                try:
                    _regular_file(path / name, name, "pass a directory written by pathsurgeon add --out or "
                                  "save_pretrained")
                except CheckpointError as error:
                    raise ModelSpecError(str(error)) from None
        if (path / MANIFEST).is_file():
            model, manifest = _rebuild(path, say, allow_missing_keys=allow_missing_keys)  # its weights; no surgery
            loaded = LoadedModel(model, pretrained=True, saved_surgery=manifest["surgery"])
        elif (path / HF_CONFIG).is_file():
            loaded = _load_transformers(str(path), say, allow_missing_keys=allow_missing_keys)
        else:
            raise ModelSpecError(
                f"{spec} is a directory without {MANIFEST} or {HF_CONFIG}; pass a directory written by "
                "pathsurgeon add --out or save_pretrained"
            )
    elif path.exists():
        raise ModelSpecError(
            f"{spec} is a file; give the architecture with --model NAME and the file with --weights {spec}"
        )
    else:
        loaded = _load_by_name(spec, require_pretrained, say, allow_missing_keys)
    if weights is not None:
        load_weights(loaded.model, weights, allow_missing_keys=allow_missing_keys)
        loaded.notes.append(f"weights loaded from {weights}")
        loaded.pretrained = True
    return loaded


def _load_by_name(name: str, require_pretrained: bool, say: Callable[[str], None], allow_missing_keys: bool):
    import timm

    if timm.is_model(name):
        if "." in name and _timm_pretrained_cfg(name) is None:
            tags = [n for n in timm.list_pretrained(name.split(".")[0] + ".*")]
            raise ModelSpecError(f"timm has no pretrained tag {name.split('.', 1)[1]!r} for {name.split('.')[0]}; "
                                 f"known: {', '.join(tags[:5]) or 'none'}")
        say(f"loading timm model {name}")
        cached = _cached_timm_weights(name)
        if cached is not None or downloads_allowed():
            overlay = {"file": cached} if cached is not None else None
            if cached is not None:  # a 0-byte, truncated or pickled file is refused before the model is built
                weights_shapes(cached)
            try:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
            except Exception as error:  # noqa: BLE001 - keys that do not fit, a file timm cannot read
                where = cached or "the hub"
                raise CheckpointError(
                    f"the pretrained weights of {name} from {where} cannot be loaded ({type(error).__name__}: "
                    f"{_first_line(error)}); delete them from the cache and download again, or pass --weights FILE"
                ) from error
            return LoadedModel(model, pretrained=True, notes=[f"pretrained weights: {cached or 'hub'}"])
        if require_pretrained:
            raise ModelSpecError(
                f"no local pretrained weights for {name}; put them in the Hugging Face cache, pass --weights FILE, "
                "or drop --require-pretrained"
            )
        model = timm.create_model(name, pretrained=False)
        note = f"no local pretrained weights for {name}; continuing with random initialisation"
        return LoadedModel(model, pretrained=False, notes=[note])
    if "/" in name:
        return _load_transformers(name, say, allow_missing_keys=allow_missing_keys)
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for names"
    raise ModelSpecError(f"unknown model {name!r}: not a timm model, HF hub id or local directory; {hint}")


def _timm_pretrained_cfg(name: str):
    """timm's pretrained config for ``name``, None for an unknown tag (timm raises RuntimeError there)."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return None


def _cached_timm_weights(name: str) -> str | None:
    """The pretrained weights file of a timm model in the local Hugging Face cache, if it is there.

    Looked up without touching the network, whatever HF_HUB_OFFLINE says; HF_HUB_CACHE is read now,
    not at import time.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # no pretrained cfg for this name
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id.split("@")[0]
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        path = try_to_load_from_cache(repo, filename, cache_dir=os.environ.get("HF_HUB_CACHE"))
        if isinstance(path, str):
            return path
    return None


# --- what a spec reads, and reading files that may be anything -------------------------------------


def spec_reads(spec: str | None) -> list[Path]:
    """The files and folders loading ``spec`` reads, for the output-path checks.

    A local path is itself. A hub id, or a timm name with pretrained weights on the hub, reads its
    repository's folder in the Hugging Face cache (snapshots and the blobs their links point to), and
    a timm name with a download URL its file in torch's hub cache; the check resolves links, so an
    output named by the blob's path or by a link to it is refused too.
    """
    if not spec or not str(spec).strip():
        return []
    try:
        if Path(spec).exists():
            return [Path(spec)]
    except OSError:  # a name too long to be a path
        return []
    reads: list[Path] = []
    repos: list[str] = []
    import timm

    if timm.is_model(spec):
        try:
            cfg = timm.models.get_pretrained_cfg(spec)
        except Exception:  # noqa: BLE001 - no pretrained cfg for this name
            cfg = None
        if cfg is not None and cfg.hf_hub_id:
            repos.append(cfg.hf_hub_id.split("@")[0])
        if cfg is not None and isinstance(cfg.url, str) and cfg.url:
            reads.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0]))
        cached = _cached_timm_weights(spec)
        if cached is not None:
            reads.append(Path(cached))
    elif "/" in spec:
        repos.append(spec)
    if repos:
        from huggingface_hub import constants

        cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
        reads += [cache / ("models--" + repo.replace("/", "--")) for repo in repos]
    return [path for path in reads if os.path.lexists(path)]


def _regular_file(path: Path, what: str, fix: str, max_bytes: int | None = None) -> int:
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


def check_weights_file(file: str | os.PathLike) -> None:
    """Refuse a ``--weights`` path that is missing, a directory, or not a regular file (a FIFO would block)."""
    file = Path(file)
    try:
        if file.is_dir():
            raise CheckpointError(f"weights file {file} is a directory; pass the file inside it (e.g. "
                                  f"{file / WEIGHTS})")
    except OSError as error:
        raise CheckpointError(f"cannot read weights file {file} ({error.strerror or error}); fix the path") from error
    _regular_file(file, "weights file", "check the path given to --weights")


def weights_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weights file, read without loading the values (safetensors' header, or
    a torch zip file mapped to the meta device); what the weights fix before anything is built."""
    file = Path(file)
    fix = "pass a .safetensors file or a torch state_dict"
    if _regular_file(file, "weights file", fix) == 0:
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
                                  f"{_first_line(error)[:80]}); save the model's state_dict() as it is trained "
                                  "(plain float tensors)") from error
        raise CheckpointError(f"cannot read {file} ({_first_line(error)}); the file is truncated or not a "
                              "safetensors file or torch state_dict saved with weights_only=True") from error
    state = _unwrapped_state_dict(state, file)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _torch_load(file: Path, **options: Any) -> Any:
    """``torch.load(weights_only=True)`` without torch's warnings (TypedStorage deprecation, sparse
    invariants), which would print lines of their own around pathsurgeon's one-line refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(file, weights_only=True, **options)


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


def _check_build_against_weights(
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
        raise error_class(f"{what} cannot be built ({type(error).__name__}: {_first_line(error)}); {fix}") from error
    for key, tensor in model.state_dict().items():
        shape = shapes.get(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise error_class(f"{what} makes {key} of shape {list(tensor.shape)} but the weights hold "
                              f"{list(shape)}; {fix}")
    weights = sum(math.prod(shape) for shape in shapes.values())
    built = sum(math.prod(t.shape) for t in model.state_dict().values())
    if built > 2 * weights + 2**20:  # missing keys may be allowed, but not a model many times the weights
        raise error_class(f"{what} has {built:,} values but the weights only {weights:,}; {fix}")


# --- Hugging Face ----------------------------------------------------------------------------------


def _hf_config_file(spec: str) -> Path:
    """The ``config.json`` of a local directory or of a hub id (from the cache, or downloaded if allowed)."""
    local = Path(spec)
    if local.is_dir():
        return local / HF_CONFIG
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        if downloads_allowed():
            return Path(hf_hub_download(spec, HF_CONFIG))
        cached = try_to_load_from_cache(spec, HF_CONFIG, cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception as error:  # an invalid repo id, a network failure, ...
        raise ModelSpecError(f"{spec} is not a usable Hugging Face hub id ({_first_line(error)}); "
                             "pass a timm name, a hub id like owner/name, or a local directory") from error
    if not isinstance(cached, str):
        raise ModelSpecError(
            f"{spec} is not in the local Hugging Face cache nor a local directory; download it once with "
            "network (hf download), or pass a directory written by save_pretrained"
        )
    return Path(cached)


def _refuse_remote_code(config_file: Path) -> dict[str, Any]:
    """Read ``config.json`` ourselves; refuse it if loading it would import the directory's own code.

    Also refused here, before transformers parses it: anything but a regular file (a FIFO blocks the
    read), more than 16 MiB, nesting deeper than 64 levels, and a ``timm_wrapper`` config whose
    ``model_args`` go beyond the plain arguments a manifest may carry (they reach ``timm.create_model``)
    or whose ``architecture`` names a source (``local-dir:``, ``hf-hub:``) with model_args of its own.
    """
    fix = "pass a directory written by save_pretrained"
    try:
        _regular_file(config_file, "config", fix, MAX_CONFIG_BYTES)
    except CheckpointError as error:
        raise ModelSpecError(str(error)) from None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = _first_line(error)
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


def _weight_shapes_of_directory(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor shape the weights of a Hugging Face directory hold (None: no weights file to read).

    A sharded checkpoint's shards must be regular files inside the directory (in the Hugging Face
    cache: inside the repository's folder, where the snapshot's links point).
    """
    for name in WEIGHT_FILES:
        if os.path.lexists(directory / name):
            return weights_shapes(directory / name)
    for name in WEIGHT_INDEXES:
        index = directory / name
        if not os.path.lexists(index):
            continue
        fix = "rewrite the directory with save_pretrained"
        _regular_file(index, "weights index", fix, MAX_CONFIG_BYTES)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as error:
            raise CheckpointError(f"cannot read {index} ({_first_line(error)}); {fix}") from error
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files; {fix}")
        root = directory.parent.parent if directory.parent.name == "snapshots" else directory
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in dict.fromkeys(weight_map.values()):
            relative = Path(shard)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise CheckpointError(f"{index} points a shard at {shard!r}, outside the directory; {fix}")
            resolved = (directory / relative).resolve()
            if resolved != root.resolve() and root.resolve() not in resolved.parents:
                raise CheckpointError(f"{index}: shard {shard} leads outside {root} (to {resolved}); {fix}")
            shapes.update(weights_shapes(directory / relative))
        return shapes
    return None


def _check_config_against_weights(
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


def _load_transformers(
    spec: str, say: Callable[[str], None], *, class_name: str | None = None, allow_missing_keys: bool = False
) -> LoadedModel:
    try:
        import transformers
    except ImportError as error:
        raise ModelSpecError(
            f"{spec} looks like a Hugging Face model but transformers is not installed; pip install transformers"
        ) from error
    config_file = _hf_config_file(spec)
    raw_config = _refuse_remote_code(config_file)
    if os.path.lexists(config_file.parent / ADAPTER_CONFIG):
        raise ModelSpecError(
            f"{spec} holds {ADAPTER_CONFIG} next to the model: transformers would inject that PEFT adapter "
            "(LoRA) into it unasked; move the adapter files out, or merge it first (merge_and_unload, then "
            "save_pretrained)"
        )
    shapes = _weight_shapes_of_directory(config_file.parent)
    if shapes is not None:
        _check_config_against_weights(raw_config, shapes, spec)
    local_only = not downloads_allowed()
    say(f"loading Hugging Face model {spec}" + (" (local files only)" if local_only else ""))
    try:
        with _transformers_quiet():
            config = transformers.AutoConfig.from_pretrained(spec, local_files_only=local_only,
                                                             trust_remote_code=False)
    except (ImportError, RecursionError, MemoryError) as error:
        raise ModelSpecError(f"cannot read the Hugging Face config of {spec} ({_first_line(error)}); "
                             "check its config.json") from error
    except Exception as error:  # noqa: BLE001 - transformers validates fields with its own exception types
        raise ModelSpecError(f"cannot read the Hugging Face config of {spec} ({_first_line(error)}); "
                             "check its config.json (model_type must be one transformers knows)") from error
    model_class = _transformers_class(raw_config, class_name, spec)
    if shapes is not None:  # the weights fix every shape: a config asking for more is refused before building
        _check_build_against_weights(lambda: model_class(config), _without_prefix_variants(shapes, model_class),
                                     f"{spec}'s config.json", "check config.json against the weights file")
    try:
        with _transformers_quiet():
            model, info = model_class.from_pretrained(
                spec, config=config, local_files_only=local_only, trust_remote_code=False, output_loading_info=True
            )
    except OSError as error:
        raise ModelSpecError(f"cannot load the weights of {spec} ({_first_line(error)}); "
                             "the directory needs model.safetensors or pytorch_model.bin") from error
    except Exception as error:  # mis-shaped tensors, a pickle weights_only refuses, a truncated file
        raise CheckpointError(f"the weights of {spec} do not fit {model_class.__name__} ({_first_line(error)}); "
                              "check config.json against the weights file") from error
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    if (unexpected or mismatched or (missing and not allow_missing_keys)):
        raise CheckpointError(
            f"the weights of {spec} do not fit {model_class.__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(mismatched)} of "
            "another shape; check config.json's architectures (or pass --allow-missing-keys to keep missing "
            "weights randomly initialised)"
        )
    notes = [f"{len(missing)} weights missing from {spec}, randomly initialised: {missing[:3]}"] if missing else []
    return LoadedModel(model, pretrained=True, notes=notes)


def _without_prefix_variants(shapes: Mapping[str, tuple[int, ...]], model_class: type) -> dict[str, tuple[int, ...]]:
    """Weight names as the model names them: transformers loads a base model's weights (``embeddings.x``)
    into a head model (``vit.embeddings.x``) and back, adding or dropping ``base_model_prefix``."""
    prefix = getattr(model_class, "base_model_prefix", "") or ""
    names = dict(shapes)
    if prefix:
        for key, shape in shapes.items():
            names.setdefault(f"{prefix}.{key}", shape)
            if key.startswith(prefix + "."):
                names.setdefault(key[len(prefix) + 1:], shape)
    return names


@contextlib.contextmanager
def _transformers_quiet():
    """transformers prints a multi-line load report (and warnings) for a checkpoint that does not fit; our one
    error line says what matters."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%|███|" is a second line on every load
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _transformers_class(config: dict[str, Any], class_name: str | None, spec: str) -> type[Any]:
    """The model class: one that ``architectures`` lists (the manifest may pick which), else AutoModel."""
    import transformers

    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelSpecError(f"{spec}: config.json's architectures must be a list of class names")
    if class_name is not None and class_name not in architectures:
        raise ManifestError(
            f"{spec}: {MANIFEST} names class {class_name!r}, which config.json's architectures "
            f"{architectures} does not list; rewrite the directory with pathsurgeon add --out"
        )
    names = [class_name] if class_name is not None else architectures
    if not names:
        return transformers.AutoModel
    for name in names:
        cls = getattr(transformers, name, None) if not name.startswith("_") else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise ModelSpecError(
        f"{spec}: {names[0]!r} is not a model class of transformers {transformers.__version__}; "
        "upgrade transformers or fix config.json's architectures"
    )


# --- weights files ---------------------------------------------------------------------------------


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
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); check that --model names the checkpoint's "
            "architecture"
        )
    for key, value in state.items():  # every tensor is checked before the first one is copied
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {list(value.shape)} but {type(model).__name__} expects "
                f"{list(expected[key].shape)}; check that --model (and num_classes) match the checkpoint"
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
                f"cannot read {file} as safetensors ({_first_line(error)}); the file is truncated or not a "
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


# --- checkpoint directories: pathsurgeon.save / pathsurgeon.load ---------------------------------------


@serialised
def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``directory``: its weights (the original ``state_dict`` keys) and a manifest.

    The manifest (``pathsurgeon.json``) records how to rebuild the architecture — the timm name or
    torchvision builder with plain arguments (``num_classes``, ``img_size``, ``in_chans``, ...), or the
    transformers class (the weights and ``config.json`` are then written by ``save_pretrained``) — and,
    for a surgered model, its :class:`~pathsurgeon.DropPathConfig`, the rates in effect and exactly
    which slots and modules were changed. A model its library cannot rebuild is refused here (with a
    :class:`~pathsurgeon.RebuildError`), not discovered at :func:`load`. The directory must not exist
    or be empty; it is written through a staging directory, so a failure leaves nothing.
    """
    directory = Path(directory)
    seen = check_outputs({"directory": (directory, "dir")})
    source, surgery = describe(model)  # refused before anything is written
    with staged([(directory, "dir")], seen=seen) as (staging,):
        write_checkpoint(model, staging, source, surgery)
    return directory


def describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The manifest's ``source`` (how to rebuild ``model``) and ``surgery`` (None when not surgered)."""
    from .changes import record_of, surgered_submodules
    from .libraries import RebuildError, identify_constructor
    from .manifest import CONSTRUCTOR_ARGUMENTS
    from .parts import surgered_part_by_part

    inner = surgered_submodules(model)
    by_parts = surgered_part_by_part(model, inner)  # a detector add could not capture whole
    if inner and not by_parts:
        raise PathSurgeonError(
            f"the surgery is on the submodule {inner[0]!r}, not on the model given; save model.{inner[0]}, or "
            "strip and add on the whole model"
        )
    try:
        constructor = identify_constructor(model)
    except RebuildError as error:
        again = "; rebuild it and call pathsurgeon.add again after loading" if by_parts else ""
        raise RebuildError(
            f"cannot save {type(model).__name__}: {error}; pathsurgeon.save keeps models that timm, torchvision "
            f"or transformers can rebuild (for another model, save model.state_dict(): its keys are unchanged{again})"
        ) from error
    if by_parts:
        raise PathSurgeonError(
            f"cannot save {type(model).__name__}: add surgered its parts {', '.join(inner)} one by one, which a "
            "manifest cannot describe; save model.state_dict() (its keys are unchanged) and add again after loading"
        )
    if constructor.library == "transformers":
        source: dict[str, Any] = {"library": "transformers", "class": constructor.name}
    else:
        allowed = CONSTRUCTOR_ARGUMENTS[constructor.library]
        unknown = sorted(set(constructor.arguments) - set(allowed))
        if unknown:
            raise RebuildError(f"cannot save {type(model).__name__}: it needs the constructor argument {unknown[0]}, "
                               "which a manifest may not carry; save model.state_dict() instead")
        source = {"library": constructor.library, "name": constructor.name}
        if constructor.arguments:
            source["kwargs"] = dict(constructor.arguments)
    record = record_of(model)
    if record is None:
        return source, None
    surgery = {
        "config": record.config.to_dict(),
        "rate": record.rate,
        "schedule": record.schedule,
        "targets": record.targets,
        "branches": [b.to_dict() for b in record.branches],
    }
    if record.inputs_given:
        surgery["inputs"] = "given"
    return source, surgery


def write_checkpoint(model: nn.Module, directory: Path, source: dict[str, Any], surgery: dict | None) -> None:
    """Write the weights (same keys as the model's state_dict) and the manifest into ``directory``."""
    from safetensors.torch import save_file

    if source["library"] == "transformers":
        # a transformers PreTrainedModel; nn.Module.__getattr__ types the attribute as Tensor | Module
        with _transformers_quiet():  # "Writing model shards: 100%|███|" would be a line of its own on stderr
            cast(Any, model).save_pretrained(directory, safe_serialization=True)
    else:
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    manifest = {"format": FORMAT_VERSION, "pathsurgeon": __version__, "source": source, "surgery": surgery}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@serialised
def load(
    directory: str | os.PathLike, *, surgery: bool = True, verify: bool | float = True,
    allow_missing_keys: bool = False, example_inputs: Any = None,
) -> nn.Module:
    """Rebuild the model saved in ``directory`` (by :func:`save` or ``pathsurgeon add --out``).

    With ``surgery=True`` its surgery is re-applied — the same config, then the rates that were in
    effect — and the changed slots and modules must be exactly the saved ones: if this pathsurgeon
    finds the branches elsewhere, the model is left stripped and :class:`SavedBranchesMovedError`
    says so (a finder change can never silently move a saved model's drop paths). ``surgery=False``
    gives the model as its library builds it, with the saved weights. ``example_inputs``: what the
    surgery is re-added on, as for :func:`~pathsurgeon.add`; a model whose ``add`` needed them (the
    manifest records ``"inputs": "given"``) needs them here too where made-up inputs do not run it.
    """
    from .changes import record_of
    from .config import DropPathConfig
    from .surgery import add, set_rate, strip

    directory = Path(directory)
    model, manifest = _rebuild(directory, lambda _: None, allow_missing_keys=allow_missing_keys)
    entry = manifest["surgery"]
    if not surgery or entry is None:
        return model
    if manifest["format"] == 1:
        schedule = entry["schedule"]
        config = DropPathConfig(None if isinstance(schedule, list) else entry["rate"], schedule, entry["mode"])
        saved = list(dict.fromkeys((b["target"], b["mechanism"]) for b in entry["branches"]))
        current = (config.rate, config.schedule_argument)
    else:
        config = DropPathConfig.from_dict(entry["config"])
        saved = [(t["target"], t["mechanism"]) for t in entry["targets"] if not t["silenced"]]
        current = (entry["rate"], entry["schedule"])
    if verify is not True:
        config = config.replace(verify=verify)
    try:
        add(model, config, example_inputs=example_inputs)
    except (ExampleInputsError, CaptureError) as error:
        if example_inputs is not None or entry.get("inputs") != "given":
            raise
        raise ExampleInputsError(
            f"{directory}: its surgery was added on the caller's example_inputs, and the inputs pathsurgeon makes up "
            f"do not run {type(model).__name__} ({_first_line(error.__cause__ or error)}); "
            "pass pathsurgeon.load(directory, example_inputs=...) with a batch the model takes"
        ) from error
    record = record_of(model)
    assert record is not None  # add() just put it there
    found = [(t["target"], t["mechanism"]) for t in record.targets if not t["silenced"]]
    if found != saved:
        strip(model)
        first = next((f"{s[1]} {s[0]}" for s in saved if s not in found), None) or next(
            f"{f[1]} {f[0]}" for f in found if f not in saved)
        raise SavedBranchesMovedError(
            f"{directory}: this pathsurgeon changes {len(found)} slots/modules where the checkpoint saved {len(saved)} "
            f"(first difference: {first}); load(..., surgery=False) and add again, or use the pathsurgeon that saved it"
        )
    if current != (config.rate, config.schedule_argument):  # set_rate moved the rates after add
        set_rate(model, current[0], schedule=current[1])
    return model


def _rebuild(
    directory: Path, say: Callable[[str], None], *, allow_missing_keys: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a pathsurgeon directory with its weights, without surgery; and the checked manifest."""
    if not (directory / MANIFEST).exists():  # one that is there but no regular file: read_manifest says so
        raise ModelSpecError(f"{directory} has no {MANIFEST}; pass a directory written by pathsurgeon.save or "
                             "pathsurgeon add --out")
    manifest = read_manifest(directory)
    source = manifest["source"]
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in source.get("kwargs", {}).items()}
    where = directory / MANIFEST
    if source["library"] == "timm":
        import timm

        name = source["name"]
        if not timm.is_model(name) or ("." in name and _timm_pretrained_cfg(name) is None):
            raise ManifestError(f"{where} names timm model {name!r}, which timm "
                                f"{timm.__version__} does not know; upgrade timm or fix the name")
        build = lambda: timm.create_model(name, pretrained=False, **kwargs)  # noqa: E731
    elif source["library"] == "torchvision":
        import torchvision

        name = source["name"]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ManifestError(f"{where} names torchvision builder {name!r}, which torchvision "
                                f"{torchvision.__version__} does not have; upgrade torchvision or fix the name")
        build = lambda: torchvision.models.get_model(name, weights=None, **kwargs)  # noqa: E731
    if source["library"] in ("timm", "torchvision"):
        # the weights file first (a 0-byte file is noticed before a large model is built), then the
        # architecture on the meta device against the weights' shapes: nothing is allocated for a manifest
        # whose arguments the weights do not fit (img_size 65536) or the constructor refuses (global_pool 'zzz')
        shapes = weights_shapes(directory / WEIGHTS)
        _check_build_against_weights(
            build, shapes, f"{where}'s {source['library']} model {name} with {source.get('kwargs', {})}",
            "rewrite the directory with pathsurgeon add --out", error_class=ManifestError,
        )
        _check_meta_forward(build, source, name, where)
        say(f"rebuilding {source['library']} model {name} from {directory}")
        try:
            model = build()
        except Exception as error:  # noqa: BLE001 - the meta build passed; this is the same constructor
            raise ManifestError(f"{where}: {name} cannot be built with {source.get('kwargs', {})} "
                                f"({type(error).__name__}: {_first_line(error)}); rewrite the directory with "
                                "pathsurgeon add --out") from error
        load_weights(model, directory / WEIGHTS, allow_missing_keys=allow_missing_keys)
    else:
        model = _load_transformers(
            str(directory), say, class_name=source["class"], allow_missing_keys=allow_missing_keys
        ).model
    return model, manifest


def _check_meta_forward(build: Callable[[], nn.Module], source: dict[str, Any], name: str, where: Path) -> None:
    """A manifest's arguments may build a model whose own forward fails (timm ResNet with ``global_pool: ""``
    feeds unpooled maps to its classifier). A forward on the meta device costs nothing: refuse the
    arguments when it fails and the same model without them runs."""
    from .libraries import meta_build

    kwargs = source.get("kwargs", {})
    if not kwargs:
        return

    def forward_error(make: Callable[[], nn.Module]) -> str | None:
        try:
            model = meta_build(make).eval()
            if source["library"] == "timm":
                default = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
                size = kwargs.get("img_size", default[1:])
                size = [size, size] if isinstance(size, int) else list(size)
                shape = (1, kwargs.get("in_chans", default[0]), *size)
            else:
                size = kwargs.get("image_size", 224)
                shape = (1, 3, size, size)
            with torch.no_grad():
                model(torch.empty(shape, device="meta"))
        except Exception as error:  # noqa: BLE001 - any failure of the model's own forward
            return f"{type(error).__name__}: {_first_line(error)}"
        return None

    error = forward_error(build)
    if error is None:
        return
    import timm
    import torchvision

    plain = (lambda: timm.create_model(name, pretrained=False)) if source["library"] == "timm" else (
        lambda: torchvision.models.get_model(name, weights=None))
    if forward_error(plain) is None:
        raise ManifestError(f"{where}: {name} built with {kwargs} cannot run its own forward ({error}); rewrite "
                            "the directory with pathsurgeon add --out")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


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
