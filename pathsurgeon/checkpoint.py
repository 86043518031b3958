"""The pathsurgeon checkpoint format: :func:`save` and :func:`load` (the public API), :func:`describe` and
:func:`write_checkpoint` (what ``save`` and the command line write).

A checkpoint is a directory holding the model's weights (``model.safetensors``, the original
``state_dict`` keys; or ``save_pretrained``'s files for a transformers model) and ``pathsurgeon.json``:
how to rebuild the architecture and, for a surgered model, its surgery. Reading one back is
:mod:`pathsurgeon.rebuild` (no foreign code runs, every file is treated as untrusted:
:mod:`pathsurgeon.untrusted`); :func:`load` then re-applies the surgery and checks it lands on the saved
branches. Writes go through :mod:`pathsurgeon.files` (staged, renamed into place).

The loading room, one job per module, each importing only from the ones listed after it: this module,
:mod:`~pathsurgeon.specs` (a model named by a string, as the command line's ``--model``),
:mod:`~pathsurgeon.rebuild` (a pathsurgeon directory's model), :mod:`~pathsurgeon.hf_models` (a Hugging
Face model), :mod:`~pathsurgeon.hub` (the caches and the offline policy), :mod:`~pathsurgeon.weights`
(weights I/O), :mod:`~pathsurgeon.untrusted` (hardening against crafted files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

from torch import nn

from ._version import __version__
from .errors import (
    CaptureError,
    ExampleInputsError,
    ModelSpecError,
    PathSurgeonError,
    SavedBranchesMovedError,
    first_line,
)
from .files import check_outputs, staged
from .hub import transformers_quiet
from .manifest import FORMAT_VERSION, MANIFEST
from .rebuild import rebuild
from .runstate import serialised
from .specs import LoadedModel, load_model  # this module's names before the loading room was split
from .weights import WEIGHTS, load_weights

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
        with transformers_quiet():  # "Writing model shards: 100%|███|" would be a line of its own on stderr
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
    model, manifest = rebuild(directory, lambda _: None, allow_missing_keys=allow_missing_keys)
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
            f"do not run {type(model).__name__} ({first_line(error.__cause__ or error)}); "
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
