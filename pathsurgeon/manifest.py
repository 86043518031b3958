"""``pathsurgeon.json``: how to rebuild a saved model and re-apply its surgery. Untrusted input.

A manifest comes from a directory anyone may have written, so it is data to check, never instructions
to follow: it is validated against :data:`SCHEMA` (JSON Schema, every object closed to unknown keys)
and then against the installed libraries (a timm name timm knows; a transformers model class that
``config.json`` lists in ``architectures``). The only values that reach a constructor are the plain
architecture arguments in :data:`CONSTRUCTOR_ARGUMENTS` — never a path, a callable or a class name of
the file's choosing (a free-form ``kwargs`` would let a file make timm open any ``checkpoint_path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ManifestError

__all__ = ["CONSTRUCTOR_ARGUMENTS", "FORMAT_VERSION", "MANIFEST", "SCHEMA", "read_manifest", "validate_manifest"]

MANIFEST = "pathsurgeon.json"
FORMAT_VERSION = 1
MAX_BYTES = 16 * 1024 * 1024  # a manifest lists branches; a bigger file is not one of ours

_SIZE = {"type": "integer", "minimum": 1, "maximum": 65536}
_RATE = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
_NAME = {"type": "string", "maxLength": 1000}

# Architecture arguments fine-tuners change, with plain values only.
CONSTRUCTOR_ARGUMENTS: dict[str, dict] = {
    "num_classes": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
    "in_chans": {"type": "integer", "minimum": 1, "maximum": 1024},
    "img_size": {"oneOf": [_SIZE, {"type": "array", "items": _SIZE, "minItems": 2, "maxItems": 2}]},
    "global_pool": {"type": "string", "pattern": "^[a-z]{0,16}$"},
}

_BRANCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["block", "index", "rate", "mechanism", "target"],
    "properties": {
        "block": _NAME,
        "index": {"type": "integer"},
        "rate": _RATE,
        "mechanism": {"enum": ["slot", "hook"]},
        "target": _NAME,
        "mode": {"enum": ["sample", "skip", "batch"]},
        "entry": {"oneOf": [{"type": "null"}, _NAME]},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pathsurgeon manifest",
    "type": "object",
    "additionalProperties": False,
    "required": ["format", "source", "surgery"],
    "properties": {
        "format": {"const": FORMAT_VERSION},
        "source": {
            "type": "object",
            "required": ["library"],
            "properties": {"library": {"enum": ["timm", "transformers"]}},
            # a discriminator rather than oneOf, so that an error names the field that is wrong
            "allOf": [
                {
                    "if": {"properties": {"library": {"const": "timm"}}},
                    "then": {
                        "additionalProperties": False,
                        "required": ["library", "name"],
                        "properties": {
                            "library": True,
                            "name": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,200}$"},
                            "kwargs": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": CONSTRUCTOR_ARGUMENTS,
                            },
                        },
                    },
                },
                {
                    "if": {"properties": {"library": {"const": "transformers"}}},
                    "then": {
                        "additionalProperties": False,
                        "required": ["library", "class"],
                        "properties": {
                            "library": True,
                            "class": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]{0,200}$"},
                        },
                    },
                },
            ],
        },
        "surgery": {
            "type": ["object", "null"],  # null: a stripped checkpoint
            "additionalProperties": False,
            "required": ["rate", "schedule", "mode", "branches"],
            "properties": {
                "rate": {"oneOf": [{"type": "null"}, _RATE]},
                "schedule": {
                    "oneOf": [
                        {"enum": ["auto", "linear", "uniform"]},
                        {"type": "array", "items": _RATE, "maxItems": 100_000},
                    ]
                },
                "mode": {"enum": ["sample", "skip", "batch"]},
                "branches": {"type": "array", "items": _BRANCH, "maxItems": 100_000},
            },
        },
    },
}


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and validate ``directory/pathsurgeon.json``; raise :class:`ManifestError` on anything off."""
    path = directory / MANIFEST
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ManifestError(f"{path} is larger than {MAX_BYTES // 2**20} MiB; it is not a pathsurgeon manifest")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        if isinstance(error, ManifestError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ManifestError(f"cannot read {path} ({reason}); rewrite it with pathsurgeon add --out") from error
    validate_manifest(data, path)
    return data


def validate_manifest(data: Any, where: Path | str = MANIFEST) -> None:
    """Check ``data`` against :data:`SCHEMA`; the error names the first offending field."""
    import jsonschema

    if isinstance(data, dict) and "format" in data and data["format"] != FORMAT_VERSION:
        raise ManifestError(
            f"{where} has manifest format {data['format']!r}; this pathsurgeon reads format {FORMAT_VERSION} "
            "(upgrade pathsurgeon, or rewrite the directory with pathsurgeon add --out)"
        )
    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return
    field = ".".join(str(p) for p in error.absolute_path) or "the top level"
    if error.validator == "type":  # the default message quotes the whole offending value
        message = f"must be of type {error.validator_value}, not {_json_type(error.instance)}"
    else:
        message = " ".join(error.message.split())
    if len(message) > 200:
        message = message[:200] + "..."
    raise ManifestError(f"{where} is not a valid pathsurgeon manifest: {field}: {message}; "
                        "rewrite it with pathsurgeon add --out")


def _json_type(value: Any) -> str:
    for name, kinds in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                        ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kinds):
            return name
    return type(value).__name__
