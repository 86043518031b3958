"""Model specs: what ``--model`` names (a pathsurgeon or Hugging Face directory, a timm name, a hub id),
resolved into a built model with its weights, and what to tell the user about them.

A timm name gets its pretrained weights from the local cache (:mod:`pathsurgeon.hub`), or the hub where
downloads are allowed, else random initialisation (or a refusal, with ``require_pretrained``); a weights
file given with ``weights`` is read and checked (:mod:`pathsurgeon.weights`) before the model is built.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError, ModelSpecError, first_line
from .hf_models import load_transformers
from .hub import HF_CONFIG, cached_timm_weights, downloads_allowed, timm_pretrained_cfg
from .manifest import MANIFEST
from .rebuild import rebuild
from .runstate import serialised
from .untrusted import regular_file
from .weights import load_weights, weights_shapes


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
                    regular_file(path / name, name, "pass a directory written by pathsurgeon.save or save_pretrained")
                except CheckpointError as error:
                    raise ModelSpecError(str(error)) from None
        if (path / MANIFEST).is_file():
            model, manifest = rebuild(path, say, allow_missing_keys=allow_missing_keys)  # its weights; no surgery
            loaded = LoadedModel(model, pretrained=True, saved_surgery=manifest["surgery"])
        elif (path / HF_CONFIG).is_file():
            model, notes = load_transformers(str(path), say, allow_missing_keys=allow_missing_keys)
            loaded = LoadedModel(model, pretrained=True, notes=notes)
        else:
            raise ModelSpecError(
                f"{spec} is a directory without {MANIFEST} or {HF_CONFIG}; pass a directory written by "
                "pathsurgeon.save or save_pretrained"
            )
    elif path.exists():
        raise ModelSpecError(
            f"{spec} is a file; pass the architecture as the spec and the file as weights={spec!r}"
        )
    else:
        loaded = _load_by_name(spec, require_pretrained, say, allow_missing_keys)
    if weights is not None:
        load_weights(loaded.model, weights, allow_missing_keys=allow_missing_keys)
        loaded.notes.append(f"weights loaded from {weights}")
        loaded.pretrained = True
    return loaded


def _load_by_name(
    name: str, require_pretrained: bool, say: Callable[[str], None], allow_missing_keys: bool
) -> LoadedModel:
    import timm

    if timm.is_model(name):
        if "." in name and timm_pretrained_cfg(name) is None:
            tags = [n for n in timm.list_pretrained(name.split(".")[0] + ".*")]
            raise ModelSpecError(f"timm has no pretrained tag {name.split('.', 1)[1]!r} for {name.split('.')[0]}; "
                                 f"known: {', '.join(tags[:5]) or 'none'}")
        say(f"loading timm model {name}")
        cached = cached_timm_weights(name)
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
                    f"{first_line(error)}); delete them from the cache and download again, or pass weights=FILE"
                ) from error
            return LoadedModel(model, pretrained=True, notes=[f"pretrained weights: {cached or 'hub'}"])
        if require_pretrained:
            raise ModelSpecError(
                f"no local pretrained weights for {name}; put them in the Hugging Face cache, pass weights=FILE, "
                "or pass require_pretrained=False"
            )
        model = timm.create_model(name, pretrained=False)
        note = f"no local pretrained weights for {name}; continuing with random initialisation"
        return LoadedModel(model, pretrained=False, notes=[note])
    if "/" in name:
        model, notes = load_transformers(name, say, allow_missing_keys=allow_missing_keys)
        return LoadedModel(model, pretrained=True, notes=notes)
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for names"
    raise ModelSpecError(f"unknown model {name!r}: not a timm model, HF hub id or local directory; {hint}")
