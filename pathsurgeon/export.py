"""Export to ONNX in eval mode, check the file with onnxruntime, and write it atomically.

pathsurgeon's DropPath is the identity in eval mode and hooks pass outputs through, so even a surgered
model exports to the same graph as the untouched one; stripping first (:func:`pathsurgeon.strip`) is
still the recommended path, because it leaves nothing of pathsurgeon in the model you ship. A graph
with a random op in it is refused: that would be a drop decision baked into the deployed model.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from .errors import ExampleInputsError, PathSurgeonError
from .files import staged
from .inputs import ExampleInputs, made_up_inputs_failed
from .inputs import example_inputs as make_inputs
from .runstate import private_rng, serialised, training_flags_kept
from .verify import eval_outputs
from .versions import ONNX_EXPORT_TORCH, require

__all__ = [
    "OnnxReport",
    "export_onnx",
    "format_shape",
    "parse_input_size",
    "require_export",
    "supported_opsets",
    "validate_opset",
]

# The dynamo exporter writes opset 18 and newer; asked for less, it warns, tries a conversion that often
# fails, and silently keeps 18.
MIN_OPSET = 18

RANDOM_OPS = {"Bernoulli", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial"}


@dataclass
class OnnxReport:
    """The written file, its op-type histogram, and the onnxruntime vs PyTorch difference.

    ``inputs`` and ``outputs`` map each name in the file to its shape as written: an int per fixed axis,
    ``"batch"`` for the dynamic batch axis. ``checked_batches`` are the batch sizes onnxruntime ran the
    file at (empty when ``check=False``); ``max_abs_diff`` is the largest difference over all of them.
    """

    path: Path
    op_types: collections.Counter
    max_abs_diff: float | None
    inputs: dict[str, list[int | str]] = field(default_factory=dict)
    outputs: dict[str, list[int | str]] = field(default_factory=dict)
    dynamic_batch: bool = False
    checked_batches: tuple[int, ...] = ()


@serialised
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    input_size: Sequence[int] | None = None,
    dynamic_batch: bool = True,
    batch_size: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    check: bool = True,
) -> OnnxReport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with the dynamo exporter; check it with onnxruntime.

    The batch axis (axis 0 of every input) is dynamic by default: the file takes any batch size, and the
    check runs it at the traced batch and at batch 1. ``dynamic_batch=False`` writes fixed shapes, for
    runtimes that want them, at ``batch_size`` (default 1; made-up inputs only). Made-up inputs have the
    size the model's config states; ``input_size=(C, H, W)`` picks another (the model must take it), or
    pass ``example_inputs`` yourself. An image input is called ``pixel_values`` (as Hugging Face calls
    it); outputs are named after the fields of a Hugging Face output (``logits``), ``logits`` for a timm
    classifier's tensor, else ``output``/``output_0``, …; ``input_names`` / ``output_names`` override.

    A model whose weights torch writes to a separate file (over 2 GB) is written as ``path`` and
    ``path + ".data"`` together, and both are checked (and the onnxruntime run made) where they end up.
    """
    require_export()
    import onnx

    if opset is not None:
        opset = validate_opset(opset)
    inputs = _inputs_to_trace(model, example_inputs, input_size, dynamic_batch, batch_size)
    output = _eval_output(model, inputs, made_up=example_inputs is None, input_size=input_size)
    path = Path(path)
    # Over 2 GB (torch's threshold: 1.5 GB of weights) the exporter writes the weights beside the model, as
    # NAME.data, and the .onnx names that file: both go into place together, and the file is checked there.
    data_target = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    difference: list[float | None] = [None]

    batches = _check_batches(inputs.batch_size, dynamic_batch) if check else ()

    def check_in_place() -> None:
        _check_external_data(path)
        if check:
            difference[0] = _check_with_onnxruntime(model, path, inputs, batches, dynamic_batch)

    with staged([(path, "file"), (data_target, "optional file")], check=check_in_place) as (staging, data_staging):
        # the exporter narrates every step on stdout and logs conversion attempts; keep the terminal for results
        with training_flags_kept(model, training=False), torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes=_batch_dynamic_shapes(model, inputs) if dynamic_batch else None,
            )
        assert program is not None  # typed Optional for dynamo=False; the dynamo exporter returns its program
        if dynamic_batch:
            _require_dynamic_batch(model, program.model.graph, inputs.batch_size)
            _name_batch_axis(program.model.graph)
        _name_values(program.model.graph, model, output, input_names, output_names)
        program.save(str(staging))
        proto = onnx.load(str(staging), load_external_data=False)
        _carry_external_data(proto, staging, data_staging, data_target)
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and written != opset:
            raise PathSurgeonError(
                f"the exporter wrote opset {written}, not the requested {opset}; pass an opset between "
                f"{MIN_OPSET} and {supported_opsets()[-1]}"
            )
        op_types = collections.Counter(node.op_type for node in proto.graph.node)
        random_ops = sorted(RANDOM_OPS & op_types.keys())
        if random_ops:
            raise PathSurgeonError(
                f"the exported graph contains random ops ({', '.join(random_ops)}); call pathsurgeon.strip(model) "
                "and make sure the model's eval forward draws no random numbers"
            )
    return OnnxReport(
        path, op_types, difference[0], _shapes(proto.graph.input), _shapes(proto.graph.output), dynamic_batch,
        batches,
    )


def require_export() -> None:
    """Refuse, in one line, where ONNX export cannot work: the exporter's packages or a torch too old."""
    require("torch", ONNX_EXPORT_TORCH, "ONNX export (torch.onnx.export with dynamo=True and dynamic shapes)")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise PathSurgeonError(
            "ONNX export needs onnx, onnxruntime and onnxscript; pip install 'pathsurgeon[export]'"
        ) from error


def format_shape(shape: Sequence[int | str]) -> str:
    """``[batch, 3, 224, 224]``: a shape as :class:`OnnxReport` holds it, for a one-line message."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``"3,224,224"`` as (C, H, W), or a one-line :class:`ExampleInputsError` (the command line's input size)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ExampleInputsError(f"input size {text!r} is not C,H,W; pass three positive integers, e.g. 3,224,224")
    channels, height, width = (int(p) for p in parts)
    return channels, height, width


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
            f"ONNX opset {opset!r} is not supported; pass an opset between {versions[0]} and {versions[-1]}"
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


# torch.export fixes a dimension whose example size is 0 or 1: a dynamic batch is traced at 2 or more
TRACE_BATCH = 2
BATCH = "batch"  # the name of the dynamic axis in the file
IMAGE_INPUT = "pixel_values"


def _inputs_to_trace(
    model: nn.Module, given: Any, input_size: Sequence[int] | None, dynamic_batch: bool, batch_size: int | None
) -> ExampleInputs:
    """The inputs to export with: the user's, or made up (at ``input_size``, at ``batch_size`` if static)."""
    if given is not None and (input_size is not None or batch_size is not None):
        raise ExampleInputsError(
            "example_inputs already fix the input size and batch; pass either example_inputs or "
            "input_size / batch_size"
        )
    if batch_size is not None and dynamic_batch:
        raise ExampleInputsError(
            "batch_size fixes the batch of a static export; pass dynamic_batch=False with it, "
            "or leave it out: a dynamic-batch file takes every batch size"
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ExampleInputsError(f"batch size {batch_size!r} is not a positive integer; pass e.g. batch_size=1")
    inputs = make_inputs(model, given)
    if input_size is not None:
        inputs = _resized(model, inputs, input_size)
    if inputs.batch_size is None:
        return inputs
    if dynamic_batch:  # a batch of 1 is repeated: its one sample is still the one compared
        return _at_batch(inputs, max(inputs.batch_size, TRACE_BATCH))
    return inputs if given is not None else _at_batch(inputs, batch_size or 1)


def _resized(model: nn.Module, inputs: ExampleInputs, input_size: Sequence[int]) -> ExampleInputs:
    """Made-up inputs with their image batch at ``input_size`` (C, H, W), drawn from a fixed seed."""
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ExampleInputsError(f"input size {input_size!r} is not (C, H, W); pass three positive integers")
    positional: list[tuple[int | str, Any]] = [*enumerate(inputs.args)]  # (position or name, value)
    images = [
        key for key, value in [*positional, *inputs.kwargs.items()]
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point()
    ]
    others = len([v for v in (*inputs.args, *inputs.kwargs.values()) if isinstance(v, torch.Tensor)]) - len(images)
    if len(images) != 1 or others:
        raise ExampleInputsError(
            f"input_size sets the one image batch (B, C, H, W) a model takes; {type(model).__name__} takes "
            f"other inputs ({_describe(inputs)}); pass example_inputs= instead"
        )
    (key,) = images
    old = inputs.args[key] if isinstance(key, int) else inputs.kwargs[key]
    generator = torch.Generator().manual_seed(0)
    new = torch.randn((old.shape[0], *size), generator=generator).to(device=old.device, dtype=old.dtype)
    if isinstance(key, int):
        return ExampleInputs(tuple(new if i == key else a for i, a in enumerate(inputs.args)), inputs.kwargs)
    return ExampleInputs(inputs.args, {**inputs.kwargs, key: new})


def _describe(inputs: ExampleInputs) -> str:
    return ", ".join(
        f"{key}{tuple(value.shape)}" for key, value in
        [*(("", a) for a in inputs.args), *((f"{k}=", v) for k, v in inputs.kwargs.items())]
        if isinstance(value, torch.Tensor)
    )


def _at_batch(inputs: ExampleInputs, size: int) -> ExampleInputs:
    """``inputs`` with ``size`` samples: the first ones, or all of them repeated (tensors with the batch's length)."""
    batch = inputs.batch_size
    if batch is None or batch == size:
        return inputs
    if size < batch:
        return inputs.first_samples(size)

    def grow(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            repeats = -(-size // batch)
            return value.repeat(repeats, *([1] * (value.ndim - 1)))[:size]
        return value

    return ExampleInputs(tuple(grow(v) for v in inputs.args), {k: grow(v) for k, v in inputs.kwargs.items()})


def _eval_output(model: nn.Module, inputs: ExampleInputs, *, made_up: bool, input_size: Sequence[int] | None) -> Any:
    """The model's eval output on ``inputs``; a model that does not run on made-up inputs is a one-line error."""
    try:
        with training_flags_kept(model, training=False), torch.no_grad(), private_rng(model):
            return inputs.call(model)
    except Exception as error:
        if not made_up:
            raise
        if input_size is None:
            raise made_up_inputs_failed(model, inputs, error) from error
        lines = str(error).strip().splitlines()
        raise ExampleInputsError(
            f"{type(model).__name__} does not run at input_size={tuple(input_size)} "
            f"({type(error).__name__}: {lines[0][:160] if lines else ''}); pass a size it takes"
        ) from error


def _batch_dynamic_shapes(model: nn.Module, inputs: ExampleInputs) -> Any:
    """``dynamic_shapes`` for torch.export: axis 0 of every tensor with the batch's length is ``batch``."""
    batch = inputs.batch_size
    axis = torch.export.Dim(BATCH, min=1)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            return {0: axis}
        return None

    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs).arguments
    except (TypeError, ValueError):  # no readable signature: positional inputs only
        if inputs.kwargs:
            raise ExampleInputsError(
                f"cannot read the forward signature of {type(model).__name__} to mark the batch axis of its "
                "keyword inputs; pass dynamic_batch=False"
            ) from None
        return tuple(_pytree.tree_map(spec, value) for value in inputs.args)
    return {name: _pytree.tree_map(spec, value) for name, value in bound.items()}


def _require_dynamic_batch(model: nn.Module, graph: Any, batch: int | None) -> None:
    """The exporter fixes the batch silently where the model's code depends on it: refuse such a file."""
    fixed = [value.name for value in graph.inputs if value.shape is not None and len(value.shape) > 0
             and isinstance(value.shape[0], int) and value.shape[0] == batch]
    if fixed:
        raise PathSurgeonError(
            f"{type(model).__name__}'s code fixes the batch size of {', '.join(fixed)} at {batch}, so the batch "
            "axis cannot be dynamic; pass dynamic_batch=False and batch_size=N"
        )


def _name_batch_axis(graph: Any) -> None:
    """Call the batch axis ``batch`` everywhere in the graph: the exporter keeps the ``Dim``'s name only
    when every input is a tensor (a ``flag=True`` keyword input leaves it ``s77``)."""
    import re

    import onnx_ir

    symbols = {
        value.shape[0].value for value in graph.inputs
        if value.shape is not None and len(value.shape) > 0 and isinstance(value.shape[0], onnx_ir.SymbolicDim)
        and isinstance(value.shape[0].value, str)
    } - {BATCH}
    if len(symbols) != 1:
        return
    pattern = re.compile(rf"\b{re.escape(symbols.pop())}\b")
    nodes = onnx_ir.traversal.RecursiveGraphIterator(graph)
    for value in [*graph.inputs, *(output for node in nodes for output in node.outputs)]:
        if value.shape is None:
            continue
        dims = [
            onnx_ir.SymbolicDim(pattern.sub(BATCH, dim.value))
            if isinstance(dim, onnx_ir.SymbolicDim) and isinstance(dim.value, str) else dim
            for dim in value.shape
        ]
        if dims != list(value.shape):
            value.shape = onnx_ir.Shape(dims)


def _name_values(
    graph: Any, model: nn.Module, output: Any, input_names: Sequence[str] | None, output_names: Sequence[str] | None
) -> None:
    """Rename the graph's inputs and outputs (the exporter names them ``x``, ``linear_24``, …)."""
    if input_names is None:
        images = [v for v in graph.inputs if v.shape is not None and len(v.shape) == 4
                  and v.dtype is not None and v.dtype.is_floating_point()]
        if len(images) == 1 and IMAGE_INPUT not in {v.name for v in graph.inputs}:
            images[0].name = IMAGE_INPUT
    else:
        _rename(graph.inputs, input_names, "input_names")
    if output_names is None:
        names = _output_names(model, output)
        if len(names) == len(graph.outputs) and len(set(names)) == len(names):
            _rename(graph.outputs, names, "output_names")
    else:
        _rename(graph.outputs, output_names, "output_names")


def _rename(values: Sequence[Any], names: Sequence[str], argument: str) -> None:
    names = list(names)
    if len(names) != len(values) or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise PathSurgeonError(
            f"{argument} must be {len(values)} distinct non-empty strings, one per value in the file "
            f"({', '.join(v.name for v in values)}); got {names!r}"
        )
    for value, name in zip(values, names, strict=True):
        value.name = name


def _output_names(model: nn.Module, output: Any) -> list[str]:
    """Names for the tensors of ``output``, in the order the exporter writes them (pytree order)."""
    if isinstance(output, torch.Tensor):
        classes = getattr(model, "num_classes", None)  # timm's classifier width
        classifier = isinstance(classes, int) and classes > 0 and output.ndim == 2 and output.shape[-1] == classes
        return ["logits" if classifier else "output"]
    if isinstance(output, Mapping):
        output = dict(output)  # a Hugging Face ModelOutput: its fields that are set, in order
        prefix = []
    else:
        prefix = ["output"]
    leaves, _ = _pytree.tree_flatten_with_path(output)
    return [
        "_".join([*prefix, *(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)])
        for path, leaf in leaves if isinstance(leaf, torch.Tensor)
    ]


def _shapes(values: Sequence[Any]) -> dict[str, list[int | str]]:
    """Name -> shape of the ONNX graph's inputs or outputs, a dynamic axis by its name."""
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in values
    }


def _check_batches(batch: int | None, dynamic_batch: bool) -> tuple[int, ...]:
    """The batch sizes onnxruntime runs the file at: the traced one, and 1 when the batch is dynamic."""
    if batch is None:
        return ()
    return (batch, 1) if dynamic_batch and batch != 1 else (batch,)


def _check_with_onnxruntime(
    model: nn.Module, file: Path, inputs: ExampleInputs, batches: Sequence[int], dynamic_batch: bool
) -> float:
    """The largest difference between onnxruntime's and PyTorch's outputs over ``batches`` (every input
    batch cut to that size), refusing outputs whose shapes differ."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a failing run is reported as one line below, not also as a log record
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches or (None,):
        at_batch = inputs if batch is None else _at_batch(inputs, batch)
        tensors = _tensor_inputs(model, at_batch)
        feeds = {node.name: t.detach().cpu().numpy() for node, t in zip(session.get_inputs(), tensors, strict=False)}
        try:
            got = session.run(None, feeds)
        except Exception as error:
            if not dynamic_batch or batch == inputs.batch_size:
                raise
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise PathSurgeonError(
                f"the exported file fails in onnxruntime at batch {batch} ({first}): the model's code fixes its "
                "batch size; pass dynamic_batch=False and batch_size=N"
            ) from error
        want = eval_outputs(model, at_batch)
        if len(got) < 1 or len(want) < 1:
            raise PathSurgeonError(
                f"onnxruntime returned {len(got)} outputs for {len(want)} expected; report this model"
            )
        for node, ort_output, torch_output in zip(session.get_outputs(), got, want, strict=False):
            reference = torch_output.detach().cpu().float()
            if tuple(ort_output.shape) != tuple(reference.shape):
                raise PathSurgeonError(
                    f"onnxruntime's {node.name} has shape {list(ort_output.shape)} at batch {batch}, PyTorch's "
                    f"{list(reference.shape)}; pass dynamic_batch=False, and report this model"
                )
            worst = max(worst, float((torch.from_numpy(ort_output).float() - reference).abs().max()))
    return worst


def _tensor_inputs(model: nn.Module, inputs: ExampleInputs) -> list[torch.Tensor]:
    """The input tensors in the order the file takes them: torch.export orders keyword inputs by the
    forward signature."""
    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs).arguments
        values = list(bound.values())
    except (TypeError, ValueError):
        values = [*inputs.args, *inputs.kwargs.values()]
    return [leaf for leaf in _pytree.tree_leaves(values) if isinstance(leaf, torch.Tensor)]
