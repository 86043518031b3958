"""A Hugging Face model from a local directory or a cached hub id, with its weights, checked first.

Before transformers parses a byte: the config is read by :func:`pathsurgeon.untrusted.read_hf_config`
(no ``auto_map``: the directory's own Python never runs; every call passes ``trust_remote_code=False``),
a PEFT adapter next to the model is refused, and the config is checked against the weights' shapes on
the meta device. The model class is one ``config.json``'s ``architectures`` lists (a manifest may pick
which), else ``AutoModel``; weights that do not fit are refused unless missing keys are allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import CheckpointError, ManifestError, ModelSpecError, first_line
from .hub import downloads_allowed, hf_config_file, transformers_quiet
from .manifest import MANIFEST
from .untrusted import check_build_against_weights, check_config_against_weights, read_hf_config, refuse_adapter
from .weights import weights_shapes_of_directory


def load_transformers(
    spec: str, say: Callable[[str], None], *, class_name: str | None = None, allow_missing_keys: bool = False
) -> tuple[nn.Module, list[str]]:
    """The model ``spec`` (a directory or hub id) names, and notes for the user (weights left missing)."""
    try:
        import transformers
    except ImportError as error:
        raise ModelSpecError(
            f"{spec} looks like a Hugging Face model but transformers is not installed; pip install transformers"
        ) from error
    config_file = hf_config_file(spec)
    raw_config = read_hf_config(config_file)
    refuse_adapter(config_file.parent, spec)
    shapes = weights_shapes_of_directory(config_file.parent)
    if shapes is not None:
        check_config_against_weights(raw_config, shapes, spec)
    local_only = not downloads_allowed()
    say(f"loading Hugging Face model {spec}" + (" (local files only)" if local_only else ""))
    try:
        with transformers_quiet():
            config = transformers.AutoConfig.from_pretrained(spec, local_files_only=local_only,
                                                             trust_remote_code=False)
    except (ImportError, RecursionError, MemoryError) as error:
        raise ModelSpecError(f"cannot read the Hugging Face config of {spec} ({first_line(error)}); "
                             "check its config.json") from error
    except Exception as error:  # noqa: BLE001 - transformers validates fields with its own exception types
        raise ModelSpecError(f"cannot read the Hugging Face config of {spec} ({first_line(error)}); "
                             "check its config.json (model_type must be one transformers knows)") from error
    model_class = transformers_class(raw_config, class_name, spec)
    if shapes is not None:  # the weights fix every shape: a config asking for more is refused before building
        check_build_against_weights(lambda: model_class(config), _without_prefix_variants(shapes, model_class),
                                     f"{spec}'s config.json", "check config.json against the weights file")
    try:
        with transformers_quiet():
            model, info = model_class.from_pretrained(
                spec, config=config, local_files_only=local_only, trust_remote_code=False, output_loading_info=True
            )
    except OSError as error:
        raise ModelSpecError(f"cannot load the weights of {spec} ({first_line(error)}); "
                             "the directory needs model.safetensors or pytorch_model.bin") from error
    except Exception as error:  # mis-shaped tensors, a pickle weights_only refuses, a truncated file
        raise CheckpointError(f"the weights of {spec} do not fit {model_class.__name__} ({first_line(error)}); "
                              "check config.json against the weights file") from error
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    if (unexpected or mismatched or (missing and not allow_missing_keys)):
        raise CheckpointError(
            f"the weights of {spec} do not fit {model_class.__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(mismatched)} of "
            "another shape; check config.json's architectures (or pass allow_missing_keys=True to keep missing "
            "weights randomly initialised)"
        )
    notes = [f"{len(missing)} weights missing from {spec}, randomly initialised: {missing[:3]}"] if missing else []
    return model, notes


def transformers_class(config: dict[str, Any], class_name: str | None, spec: str) -> type[Any]:
    """The model class: one that ``architectures`` lists (the manifest may pick which), else AutoModel."""
    import transformers

    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelSpecError(f"{spec}: config.json's architectures must be a list of class names")
    if class_name is not None and class_name not in architectures:
        raise ManifestError(
            f"{spec}: {MANIFEST} names class {class_name!r}, which config.json's architectures "
            f"{architectures} does not list; rewrite the directory with pathsurgeon.save"
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
