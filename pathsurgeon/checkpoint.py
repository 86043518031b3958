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

import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import (
    CheckpointError,
    ManifestError,
    ModelSpecError,
    PathSurgeonError,
    SavedBranchesMovedError,
    UntrustedCodeError,
)
from .files import check_outputs, staged
from .manifest import FORMAT_VERSION, MANIFEST, read_manifest

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


def downloads_allowed() -> bool:
    """Offline-first: the hub is only contacted when the user set ``HF_HUB_OFFLINE=0``."""
    return os.environ.get("HF_HUB_OFFLINE") == "0"


@dataclass
class LoadedModel:
    """A model the command line loaded, whether its weights are trained ones, and what to tell the user."""

    model: nn.Module
    pretrained: bool
    notes: list[str] = field(default_factory=list)


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
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            model, _ = _rebuild(path, say, allow_missing_keys=allow_missing_keys)  # its weights; no surgery
            loaded = LoadedModel(model, pretrained=True)
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
        say(f"loading timm model {name}")
        cached = _cached_timm_weights(name)
        if cached is not None or downloads_allowed():
            overlay = {"file": cached} if cached is not None else None
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
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
    """Read ``config.json`` ourselves; refuse it if loading it would import the directory's own code."""
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
    return config


def _find_key(tree: Any, key: str, path: str = "") -> str | None:
    """The dotted path of the first ``key`` anywhere in a JSON tree (sub-configs carry their own)."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            here = f"{path}.{name}" if path else name
            if name == key:
                return here
            found = _find_key(value, key, here)
            if found is not None:
                return found
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found = _find_key(value, key, f"{path}[{index}]")
            if found is not None:
                return found
    return None


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
    local_only = not downloads_allowed()
    say(f"loading Hugging Face model {spec}" + (" (local files only)" if local_only else ""))
    try:
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ModelSpecError(f"cannot read the Hugging Face config of {spec} ({_first_line(error)}); "
                             "check its config.json (model_type must be one transformers knows)") from error
    model_class = _transformers_class(raw_config, class_name, spec)
    try:
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


def _transformers_class(config: dict[str, Any], class_name: str | None, spec: str) -> type:
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
    state = read_weights(file)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if unexpected or (missing and not allow_missing_keys):
        raise CheckpointError(
            f"{file} does not fit {type(model).__name__}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); check that --model names the checkpoint's "
            "architecture"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {list(value.shape)} but {type(model).__name__} expects "
                f"{list(expected[key].shape)}; check that --model (and num_classes) match the checkpoint"
            )
    model.load_state_dict(state, strict=not missing)


def read_weights(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors or torch file (``weights_only=True``), every value a tensor."""
    file = Path(file)
    if file.is_dir():
        raise CheckpointError(f"weights file {file} is a directory; pass the file inside it (e.g. {file / WEIGHTS})")
    if not file.is_file():
        raise CheckpointError(f"weights file {file} does not exist; check the path given to --weights")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as error:  # SafetensorError, OSError: truncated, empty or not safetensors
            raise CheckpointError(
                f"cannot read {file} as safetensors ({_first_line(error)}); the file is truncated or not a "
                "safetensors file"
            ) from error
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"cannot read {file} as a torch checkpoint with weights_only=True ({type(error).__name__}); "
                "save it as a state_dict or safetensors file"
            ) from error
        for key in ("state_dict", "model", "module"):
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} holds {type(state).__name__}, not a state_dict; save model.state_dict()")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: entry {bad[0]!r} is not a tensor; save model.state_dict()")
    return dict(state)


# --- checkpoint directories: pathsurgeon.save / pathsurgeon.load ---------------------------------------


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
    check_outputs({"directory": (directory, "dir")})
    source, surgery = describe(model)  # refused before anything is written
    with staged([(directory, "dir")]) as (staging,):
        write_checkpoint(model, staging, source, surgery)
    return directory


def describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The manifest's ``source`` (how to rebuild ``model``) and ``surgery`` (None when not surgered)."""
    from .changes import record_of, surgered_submodules
    from .libraries import RebuildError, identify_constructor
    from .manifest import CONSTRUCTOR_ARGUMENTS

    inner = surgered_submodules(model)
    if inner:
        raise PathSurgeonError(
            f"the surgery is on the submodule {inner[0]!r}, not on the model given; save model.{inner[0]}, or "
            "strip and add on the whole model"
        )
    try:
        constructor = identify_constructor(model)
    except RebuildError as error:
        raise RebuildError(
            f"cannot save {type(model).__name__}: {error}; pathsurgeon.save keeps models that timm, torchvision "
            "or transformers can rebuild (for another model, save model.state_dict(): its keys are unchanged)"
        ) from error
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
    return source, surgery


def write_checkpoint(model: nn.Module, directory: Path, source: dict[str, Any], surgery: dict | None) -> None:
    """Write the weights (same keys as the model's state_dict) and the manifest into ``directory``."""
    from safetensors.torch import save_file

    if source["library"] == "transformers":
        model.save_pretrained(directory, safe_serialization=True)
    else:
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    manifest = {"format": FORMAT_VERSION, "source": source, "surgery": surgery}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load(
    directory: str | os.PathLike, *, surgery: bool = True, verify: bool | float = True, allow_missing_keys: bool = False
) -> nn.Module:
    """Rebuild the model saved in ``directory`` (by :func:`save` or ``pathsurgeon add --out``).

    With ``surgery=True`` its surgery is re-applied — the same config, then the rates that were in
    effect — and the changed slots and modules must be exactly the saved ones: if this pathsurgeon
    finds the branches elsewhere, the model is left stripped and :class:`SavedBranchesMovedError`
    says so (a finder change can never silently move a saved model's drop paths). ``surgery=False``
    gives the model as its library builds it, with the saved weights.
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
    add(model, config)
    found = [(t["target"], t["mechanism"]) for t in record_of(model).targets if not t["silenced"]]
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
    if not (directory / MANIFEST).is_file():
        raise ModelSpecError(f"{directory} has no {MANIFEST}; pass a directory written by pathsurgeon.save or "
                             "pathsurgeon add --out")
    manifest = read_manifest(directory)
    source = manifest["source"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in source.get("kwargs", {}).items()}
    if source["library"] == "timm":
        import timm

        name = source["name"]
        if not timm.is_model(name) or ("." in name and timm.models.get_pretrained_cfg(name) is None):
            raise ManifestError(f"{directory / MANIFEST} names timm model {name!r}, which timm "
                                f"{timm.__version__} does not know; upgrade timm or fix the name")
        say(f"rebuilding timm model {name} from {directory}")
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, directory / WEIGHTS, allow_missing_keys=allow_missing_keys)
    elif source["library"] == "torchvision":
        import torchvision

        name = source["name"]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ManifestError(f"{directory / MANIFEST} names torchvision builder {name!r}, which torchvision "
                                f"{torchvision.__version__} does not have; upgrade torchvision or fix the name")
        say(f"rebuilding torchvision model {name} from {directory}")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        load_weights(model, directory / WEIGHTS, allow_missing_keys=allow_missing_keys)
    else:
        model = _load_transformers(
            str(directory), say, class_name=source["class"], allow_missing_keys=allow_missing_keys
        ).model
    return model, manifest


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__

