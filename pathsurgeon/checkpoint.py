"""Getting models in and out: model specs (timm names, HF ids, local directories), weights files, and
pathsurgeon checkpoint directories (``model.safetensors`` + ``pathsurgeon.json``).

Loading is offline-first and safe: pretrained weights come from the local cache only, torch files are
read with ``weights_only=True``, and every write goes to a temporary sibling that is renamed into place,
so a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PathSurgeonError

__all__ = ["LoadedModel", "load", "load_model", "load_weights", "save", "write_json_atomic"]

MANIFEST = "pathsurgeon.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


class ModelSpecError(PathSurgeonError, ValueError):
    """A model spec that names no timm model, HF model or local checkpoint."""


@dataclass
class LoadedModel:
    """A model and what is needed to rebuild it (``source``) and re-apply its surgery (``surgery``)."""

    model: nn.Module
    source: dict[str, Any]
    pretrained: bool
    notes: list[str] = field(default_factory=list)
    surgery: dict[str, Any] | None = None


def load_model(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    require_pretrained: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> LoadedModel:
    """Build the model ``spec`` names: a pathsurgeon or HF directory, a timm name, or an HF hub id."""
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            loaded = _load_directory(path, say)
        elif (path / "config.json").is_file():
            loaded = _load_transformers(str(path), say)
        else:
            raise ModelSpecError(
                f"{spec} is a directory without {MANIFEST} or config.json; pass a directory written by "
                "pathsurgeon add --out or save_pretrained"
            )
    elif path.is_file():
        raise ModelSpecError(
            f"{spec} is a file; give the architecture with --model NAME and the file with --weights {spec}"
        )
    else:
        loaded = _load_by_name(spec, require_pretrained, say)
    if weights is not None:
        load_weights(loaded.model, weights)
        loaded.notes.append(f"weights loaded from {weights}")
        loaded.pretrained = True
    return loaded


def _load_by_name(name: str, require_pretrained: bool, say: Callable[[str], None]) -> LoadedModel:
    import timm

    if timm.is_model(name):
        say(f"loading timm model {name}")
        source = {"library": "timm", "name": name}
        cached = _cached_timm_weights(name)
        if cached is not None or os.environ.get("HF_HUB_OFFLINE") == "0":
            overlay = {"file": cached} if cached is not None else None
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
            return LoadedModel(model, source, pretrained=True, notes=[f"pretrained weights: {cached or 'hub'}"])
        if require_pretrained:
            raise ModelSpecError(
                f"no local pretrained weights for {name}; put them in the Hugging Face cache, pass --weights FILE, "
                "or drop --require-pretrained"
            )
        model = timm.create_model(name, pretrained=False)
        note = f"no local pretrained weights for {name}; continuing with random initialisation"
        return LoadedModel(model, source, pretrained=False, notes=[note])
    if "/" in name:
        return _load_transformers(name, say)
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


def _load_transformers(spec: str, say: Callable[[str], None]) -> LoadedModel:
    try:
        import transformers
    except ImportError as error:
        raise ModelSpecError(
            f"{spec} looks like a Hugging Face model but transformers is not installed; pip install transformers"
        ) from error
    local_only = os.environ.get("HF_HUB_OFFLINE") != "0"  # downloads only when the user opted in
    say(f"loading Hugging Face model {spec}" + (" (local files only)" if local_only else ""))
    try:
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=local_only)
        model_class = _transformers_class(config)
        model = model_class.from_pretrained(spec, local_files_only=local_only)
    except OSError as error:
        raise ModelSpecError(
            f"{spec} is not in the local Hugging Face cache nor a local directory; download it once with "
            "network (huggingface-cli download), or pass a directory written by save_pretrained"
        ) from error
    return LoadedModel(model, {"library": "transformers", "class": type(model).__name__}, pretrained=True)


def _transformers_class(config) -> type:
    import transformers

    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_weights(model: nn.Module, file: str | os.PathLike) -> None:
    """Load a safetensors file, or a torch file with ``weights_only=True``, into ``model`` (strict)."""
    file = Path(file)
    if not file.is_file():
        raise PathSurgeonError(f"weights file {file} does not exist; check the path given to --weights")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise PathSurgeonError(
                f"cannot read {file} as a torch checkpoint with weights_only=True ({type(error).__name__}); "
                "save it as a state_dict or safetensors file"
            ) from error
        for key in ("state_dict", "model", "module"):
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise PathSurgeonError(f"{file} holds {type(state).__name__}, not a state_dict; save model.state_dict()")
    result = model.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PathSurgeonError(
            f"{file} does not fit {type(model).__name__}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected (e.g. "
            f"{result.unexpected_keys[:2]}); check that --model names the checkpoint's architecture"
        )


# --- checkpoint directories ---------------------------------------------------------------------------


def save(model: nn.Module, directory: str | os.PathLike, source: dict[str, Any], surgery: dict | None) -> Path:
    """Write ``directory`` atomically: the weights (same keys as the model's state_dict) and the manifest."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PathSurgeonError(f"output {directory} already exists; choose another --out or remove it first")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if source.get("library") == "transformers":
            model.save_pretrained(staging, safe_serialization=True)
        else:
            state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        manifest = {"format": FORMAT_VERSION, "source": source, "surgery": surgery}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _load_directory(directory: Path, say: Callable[[str], None]) -> LoadedModel:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PathSurgeonError(
            f"cannot read {directory / MANIFEST} ({error}); rewrite it with pathsurgeon add --out"
        ) from error
    if manifest.get("format") != FORMAT_VERSION:
        raise PathSurgeonError(
            f"{directory} has manifest format {manifest.get('format')!r}, this pathsurgeon reads {FORMAT_VERSION}; "
            "upgrade pathsurgeon"
        )
    source = manifest.get("source") or {}
    library = source.get("library")
    if library == "timm":
        import timm

        say(f"rebuilding timm model {source['name']} from {directory}")
        model = timm.create_model(source["name"], pretrained=False, **source.get("kwargs", {}))
        load_weights(model, directory / WEIGHTS)
    elif library == "transformers":
        model = _load_transformers(str(directory), say).model
    else:
        raise PathSurgeonError(f"{directory / MANIFEST} names unknown library {library!r}; rewrite it with pathsurgeon")
    return LoadedModel(model, source, pretrained=True, surgery=manifest.get("surgery"))


def load(directory: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild the model saved in ``directory`` and re-apply its surgery, if it has one."""
    from .surgery import add

    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise PathSurgeonError(f"{directory} has no {MANIFEST}; pass a directory written by pathsurgeon add --out")
    loaded = _load_directory(directory, lambda _: None)
    if loaded.surgery:
        schedule = loaded.surgery.get("schedule", "auto")
        rate = None if isinstance(schedule, list) else loaded.surgery["rate"]
        add(loaded.model, rate, schedule=schedule, mode=loaded.surgery.get("mode", "sample"), verify=verify)
    return loaded.model


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
