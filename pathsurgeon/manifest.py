"""``pathsurgeon.json``: how to rebuild a saved model and re-apply its surgery. Untrusted input.

A manifest comes from a directory anyone may have written, so it is data to check, never instructions
to follow: it is validated against :data:`SCHEMA` (JSON Schema, every object closed to unknown keys)
and then against the installed libraries (a timm name timm knows, a torchvision builder torchvision
lists, a transformers model class that ``config.json`` lists in ``architectures``). The only values
that reach a constructor are the plain architecture arguments in :data:`CONSTRUCTOR_ARGUMENTS` — never
a path, a callable or a class name of the file's choosing (a free-form ``kwargs`` would let a file make
timm open any ``checkpoint_path``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .choices import BATCH_NORM_CHOICES, MODES, SCHEDULES
from .errors import ManifestError

__all__ = [
    "CONSTRUCTOR_ARGUMENTS",
    "FORMAT_VERSION",
    "MANIFEST",
    "READABLE_FORMATS",
    "SCHEMA",
    "SCHEMAS",
    "STRICT_VALIDATOR",
    "read_manifest",
    "validate_manifest",
]

MANIFEST = "pathsurgeon.json"
# 3: format 2 and the pathsurgeon release that wrote it (0.3 on); 2: the config and the exact targets
# (pathsurgeon.save, 0.2); 1: written by pathsurgeon 0.1
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
_RELEASE = {"type": "string", "pattern": r"^[0-9][0-9A-Za-z.+-]{0,63}$"}
_RELEASE_PATTERN = re.compile(_RELEASE["pattern"])
MAX_BYTES = 16 * 1024 * 1024  # a manifest lists branches; a bigger file is not one of ours

_SIZE = {"type": "integer", "minimum": 1, "maximum": 65536}
_RATE = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
_NAME = {"type": "string", "maxLength": 1000}
_MODE = {"enum": list(MODES)}
_SCHEDULE = {
    "oneOf": [
        {"enum": list(SCHEDULES)},
        {"type": "array", "items": _RATE, "maxItems": 100_000},
    ]
}

# Architecture arguments fine-tuners change, with plain values only, per library.
CONSTRUCTOR_ARGUMENTS: dict[str, dict[str, dict]] = {
    "timm": {
        "num_classes": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "in_chans": {"type": "integer", "minimum": 1, "maximum": 1024},
        "img_size": {"oneOf": [_SIZE, {"type": "array", "items": _SIZE, "minItems": 2, "maxItems": 2}]},
        "global_pool": {"type": "string", "pattern": "^[a-z]{0,16}$"},
    },
    "torchvision": {
        "num_classes": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "image_size": _SIZE,
    },
}


def _source(library: str, required: list[str], properties: dict) -> dict:
    """The shape of ``source`` for one library: a discriminator on ``library`` rather than oneOf, so
    that an error names the field that is wrong."""
    return {
        "if": {"properties": {"library": {"const": library}}},
        "then": {
            "additionalProperties": False,
            "required": ["library", *required],
            "properties": {"library": True, **properties},
        },
    }


_MODEL_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,200}$"}
_SOURCE = {
    "type": "object",
    "required": ["library"],
    "properties": {"library": {"enum": ["timm", "torchvision", "transformers"]}},
    "allOf": [
        _source("timm", ["name"], {
            "name": _MODEL_NAME,
            "kwargs": {"type": "object", "additionalProperties": False,
                       "properties": CONSTRUCTOR_ARGUMENTS["timm"]},
        }),
        _source("torchvision", ["name"], {
            "name": _MODEL_NAME,
            "kwargs": {"type": "object", "additionalProperties": False,
                       "properties": CONSTRUCTOR_ARGUMENTS["torchvision"]},
        }),
        _source("transformers", ["class"], {
            "class": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]{0,200}$"},
        }),
    ],
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
        "batch_axis": {"type": "integer", "minimum": 0, "maximum": 64},
        "unit": {"oneOf": [{"type": "null"}, _NAME]},
        "mode": _MODE,
        "entry": {"oneOf": [{"type": "null"}, _NAME]},
        "part": {"type": "string", "maxLength": 1000},  # the part's module path ('' for the model itself)
    },
}
_BRANCHES = {"type": "array", "items": _BRANCH, "maxItems": 100_000}

_SURGERY_1 = {
    "type": ["object", "null"],  # null: a stripped checkpoint
    "additionalProperties": False,
    "required": ["rate", "schedule", "mode", "branches"],
    "properties": {"rate": {"oneOf": [{"type": "null"}, _RATE]}, "schedule": _SCHEDULE, "mode": _MODE,
                   "branches": _BRANCHES},
}

_GLOBS = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 1000}, "maxItems": 1000}
_SURGERY_2 = {
    "type": ["object", "null"],  # null: a stripped checkpoint, or a model saved without surgery
    "additionalProperties": False,
    "required": ["config", "rate", "schedule", "targets", "branches"],
    "properties": {
        "config": {
            "type": "object",
            "additionalProperties": False,
            "required": ["rate", "schedule", "mode", "verify", "include", "exclude"],
            "properties": {
                "rate": {"oneOf": [{"type": "null"}, _RATE]},
                "schedule": _SCHEDULE,
                "mode": _MODE,
                "verify": {"oneOf": [{"type": "boolean"}, {"type": "number", "minimum": 0}]},
                "include": _GLOBS,
                "exclude": _GLOBS,
                "batch_norm": {"enum": list(BATCH_NORM_CHOICES)},
            },
        },
        "rate": {"oneOf": [{"type": "null"}, _RATE]},  # in effect when saved (set_rate may have moved it)
        "schedule": _SCHEDULE,
        "targets": {
            "type": "array",
            "maxItems": 100_000,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["target", "mechanism", "block", "silenced"],
                "properties": {"target": _NAME, "mechanism": {"enum": ["slot", "hook"]}, "block": _NAME,
                               "silenced": {"type": "boolean"}},
            },
        },
        "branches": _BRANCHES,
        # "given": add ran on the caller's example_inputs, so load may need them too (absent: made up)
        "inputs": {"enum": ["made up", "given"]},
    },
}


def _schema(version: int, source: dict, surgery: dict) -> dict[str, Any]:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"pathsurgeon manifest, format {version}",
        "type": "object",
        "additionalProperties": False,
        "required": ["format", "source", "surgery"],
        "properties": {"format": {"const": version}, "source": source, "surgery": surgery},
    }
    if version >= 3:  # the release that wrote it: what a reader too old for a later format is told to install
        schema["required"] = ["format", "pathsurgeon", "source", "surgery"]
        schema["properties"] = {"format": {"const": version}, "pathsurgeon": _RELEASE, "source": source,
                                "surgery": surgery}
    return schema


# Format 1 (pathsurgeon 0.1) knew timm and transformers sources and recorded the rate, schedule, mode
# and branches of the surgery.
_SOURCE_1 = {**_SOURCE, "properties": {"library": {"enum": ["timm", "transformers"]}}}
SCHEMAS: dict[int, dict[str, Any]] = {
    1: _schema(1, _SOURCE_1, _SURGERY_1),
    2: _schema(2, _SOURCE, _SURGERY_2),
    3: _schema(3, _SOURCE, _SURGERY_2),
}
SCHEMA = SCHEMAS[FORMAT_VERSION]


def _strict_validator():
    """Draft 2020-12 with JSON's integer meaning a Python int: the standard counts 5.0 as an integer, which
    a constructor then gets as a float (``nn.Linear(768, 5.0)`` fails deep inside it)."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)


class _LazyValidator:
    """The strict validator class, built on first use (jsonschema is imported only when a file is read)."""

    def __call__(self, schema: dict[str, Any]):
        return _strict_validator()(schema)


STRICT_VALIDATOR = _LazyValidator()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and validate ``directory/pathsurgeon.json``; raise :class:`ManifestError` on anything off."""
    import stat

    path = directory / MANIFEST
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            raise ManifestError(f"{path} is not a regular file; rewrite it with pathsurgeon.save")
        if info.st_size > MAX_BYTES:
            raise ManifestError(f"{path} is larger than {MAX_BYTES // 2**20} MiB; it is not a pathsurgeon manifest")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        if isinstance(error, ManifestError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ManifestError(f"cannot read {path} ({reason}); rewrite it with pathsurgeon.save") from error
    validate_manifest(data, path)
    return data


def validate_manifest(data: Any, where: Path | str = MANIFEST) -> None:
    """Check ``data`` against :data:`SCHEMA`; the error names the first offending field."""
    import jsonschema

    from ._version import __version__

    version = data.get("format", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        writer = data.get("pathsurgeon")
        release = writer if isinstance(writer, str) and _RELEASE_PATTERN.match(writer) else None
        raise ManifestError(
            f"{where} was written by pathsurgeon {release or 'a newer release'} (manifest format {version}); "
            f"pathsurgeon {__version__} reads formats up to {FORMAT_VERSION}: "
            + (f"pip install 'pathsurgeon>={release}'" if release else "upgrade pathsurgeon")
        )
    if version not in READABLE_FORMATS:
        raise ManifestError(
            f"{where} has manifest format {version!r}; this pathsurgeon reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))} (upgrade pathsurgeon, or rewrite the directory with "
            "pathsurgeon.save)"
        )
    validator = STRICT_VALIDATOR(SCHEMAS[version])
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
                        "rewrite it with pathsurgeon.save")


def _json_type(value: Any) -> str:
    for name, kinds in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                        ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, kinds):
            return name
    return type(value).__name__
