"""Export to ONNX in eval mode, check the file with onnxruntime, and write it atomically.

pathsurgeon's DropPath is the identity in eval mode and hooks pass outputs through, so even a surgered
model exports to the same graph as the untouched one; stripping first (:func:`pathsurgeon.strip`) is
still the recommended path, because it leaves nothing of pathsurgeon in the model you ship. A graph
with a random op in it is refused: that would be a drop decision baked into the deployed model.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PathSurgeonError
from .files import staged
from .inputs import example_inputs as make_inputs
from .runstate import serialised, training_flags_kept
from .verify import eval_outputs

__all__ = ["OnnxReport", "export_onnx", "supported_opsets", "validate_opset"]

# The dynamo exporter writes opset 18 and newer; asked for less, it warns, tries a conversion that often
# fails, and silently keeps 18.
MIN_OPSET = 18

RANDOM_OPS = {"Bernoulli", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial"}


@dataclass
class OnnxReport:
    """The written file, its op-type histogram, and the onnxruntime vs PyTorch difference."""

    path: Path
    op_types: collections.Counter
    max_abs_diff: float | None


@serialised
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    opset: int | None = None,
    check: bool = True,
) -> OnnxReport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with the dynamo exporter; check it with onnxruntime.

    A model whose weights torch writes to a separate file (over 2 GB) is written as ``path`` and
    ``path + ".data"`` together, and both are checked (and the onnxruntime run made) where they end up.
    """
    try:
        import onnx
    except ImportError as error:
        raise PathSurgeonError(
            "ONNX export needs onnx, onnxruntime and onnxscript; pip install 'pathsurgeon[export]'"
        ) from error
    if opset is not None:
        opset = validate_opset(opset)
    inputs = make_inputs(model, example_inputs)
    path = Path(path)
    # Over 2 GB (torch's threshold: 1.5 GB of weights) the exporter writes the weights beside the model, as
    # NAME.data, and the .onnx names that file: both go into place together, and the file is checked there.
    data_target = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    difference: list[float | None] = [None]

    def check_in_place() -> None:
        _check_external_data(path)
        if check:
            difference[0] = _check_with_onnxruntime(model, path, inputs)

    with staged([(path, "file"), (data_target, "optional file")], check=check_in_place) as (staging, data_staging):
        # the exporter narrates every step on stdout and logs conversion attempts; keep the terminal for results
        with training_flags_kept(model, training=False), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True, opset_version=opset, verbose=False
            )
        program.save(str(staging))
        proto = onnx.load(str(staging), load_external_data=False)
        _carry_external_data(proto, staging, data_staging, data_target)
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and written != opset:
            raise PathSurgeonError(
                f"the exporter wrote opset {written}, not the requested {opset}; pass --opset between "
                f"{MIN_OPSET} and {supported_opsets()[-1]}"
            )
        op_types = collections.Counter(node.op_type for node in proto.graph.node)
        random_ops = sorted(RANDOM_OPS & op_types.keys())
        if random_ops:
            raise PathSurgeonError(
                f"the exported graph contains random ops ({', '.join(random_ops)}); call pathsurgeon.strip(model) "
                "and make sure the model's eval forward draws no random numbers"
            )
    return OnnxReport(path, op_types, difference[0])


EXTERNAL_DATA_SUFFIX = ".data"  # what torch's exporter names the weights file of a model over 2 GB


def _external_locations(proto) -> dict[str, list[tuple[int, int]]]:
    """The files the model's tensors live in, each with the (offset, length) ranges read from it."""
    import onnx

    locations: dict[str, list[tuple[int, int]]] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        offset, length = int(entries.get("offset") or 0), int(entries.get("length") or 0)
        locations.setdefault(entries.get("location", ""), []).append((offset, length))
    return locations


def _carry_external_data(proto, staging: Path, data_staging: Path, data_target: Path) -> None:
    """Move the exporter's external weights file (if it wrote one) to the staging path of ``data_target``."""
    locations = set(_external_locations(proto))
    if not locations:
        data_staging.unlink()  # one self-contained file: nothing to write beside it
        return
    if locations != {data_target.name}:
        raise PathSurgeonError(
            f"the exporter put the weights in {sorted(locations)}, not {data_target.name!r}; pathsurgeon carries "
            "only that one file into place: report this with your torch and onnx versions"
        )
    os.replace(staging.with_name(data_target.name), data_staging)


def _check_external_data(path: Path) -> None:
    """The file in place names only weights files that are there and long enough (what a loader reads)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for location, ranges in _external_locations(proto).items():
        file = path.parent / location
        size = file.stat().st_size if file.is_file() else -1
        end = max(offset + length for offset, length in ranges)
        if size < end:
            raise PathSurgeonError(
                f"{path} names its weights file {file}, which is {'missing' if size < 0 else 'too short'} once in "
                "place; nothing was written: report this with your torch and onnx versions"
            )


def supported_opsets() -> range:
    """The ONNX opsets this installation can write: what both onnx and the exporter's converter support.

    Asked for an opset its version converter does not support, the exporter keeps opset 18 with a warning.
    """
    import onnx

    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET as converter_max
    except ImportError:  # the converter moved: fall back on what torch documents
        from torch.onnx import _constants

        converter_max = getattr(_constants, "ONNX_MAX_OPSET", MIN_OPSET)
    return range(MIN_OPSET, min(onnx.defs.onnx_opset_version(), converter_max) + 1)


def validate_opset(opset: object) -> int:
    """``opset`` as an int the exporter can write, or a one-line :class:`PathSurgeonError`."""
    versions = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in versions:
        raise PathSurgeonError(
            f"ONNX opset {opset!r} is not supported; pass --opset between {versions[0]} and {versions[-1]}"
        )
    return opset


@contextlib.contextmanager
def _quiet_exporter():
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_with_onnxruntime(model: nn.Module, file: Path, inputs) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    tensors = [t for t in (*inputs.args, *inputs.kwargs.values()) if isinstance(t, torch.Tensor)]
    feeds = {node.name: t.detach().cpu().numpy() for node, t in zip(session.get_inputs(), tensors, strict=False)}
    got = session.run(None, feeds)
    want = eval_outputs(model, inputs)
    if len(got) < 1 or len(want) < 1:
        raise PathSurgeonError(f"onnxruntime returned {len(got)} outputs for {len(want)} expected; report this model")
    worst = 0.0
    for ort_output, torch_output in zip(got, want, strict=False):
        reference = torch_output.detach().cpu().float()
        worst = max(worst, float((torch.from_numpy(ort_output).float() - reference).abs().max()))
    return worst
