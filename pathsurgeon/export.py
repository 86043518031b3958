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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import training_flags_kept
from .errors import PathSurgeonError
from .inputs import example_inputs as make_inputs
from .verify import eval_outputs

__all__ = ["OnnxReport", "export_onnx"]

RANDOM_OPS = {"Bernoulli", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial"}


@dataclass
class OnnxReport:
    """The written file, its op-type histogram, and the onnxruntime vs PyTorch difference."""

    path: Path
    op_types: collections.Counter
    max_abs_diff: float | None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    opset: int | None = None,
    check: bool = True,
) -> OnnxReport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with the dynamo exporter; check it with onnxruntime."""
    try:
        import onnx
    except ImportError as error:
        raise PathSurgeonError(
            "ONNX export needs onnx, onnxruntime and onnxscript; pip install 'pathsurgeon[export]'"
        ) from error
    inputs = make_inputs(model, example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(handle)
    staging = Path(staging)
    try:
        # the exporter narrates every step on stdout; keep the user's terminal for results
        with training_flags_kept(model, training=False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True, opset_version=opset, verbose=False
            )
        program.save(str(staging))
        graph = onnx.load(str(staging), load_external_data=False).graph
        op_types = collections.Counter(node.op_type for node in graph.node)
        random_ops = sorted(RANDOM_OPS & op_types.keys())
        if random_ops:
            raise PathSurgeonError(
                f"the exported graph contains random ops ({', '.join(random_ops)}); call pathsurgeon.strip(model) "
                "and put the model in eval mode before exporting"
            )
        difference = _check_with_onnxruntime(model, staging, inputs) if check else None
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return OnnxReport(path, op_types, difference)


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
