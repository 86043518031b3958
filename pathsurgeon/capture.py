"""Capture: an FX graph of the model with every drop-path slot visible in it.

First torch.fx symbolic tracing (needs no inputs), with timm's no-trace registries and the drop-path
classes as leaves. Where that fails, or where a slot hides inside a module that tracing must treat as
opaque (timm's ``TinyVitBlock``, ``NormFreeBlock``), ``torch.export`` (non-strict) of the model in eval
mode, which traces through everything and specialises shape-dependent control flow on the example
inputs. Both give FX graphs whose nodes know their owning module (``nn_module_stack``).

The model is captured in eval mode with :class:`~pathsurgeon.slots.SlotProbe` in every slot, on a
*shadow* (the module tree copied, every parameter and buffer shared), so models that write caches
during forward never see proxies or fake tensors; the user's model is only read.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import slots as slot_lib
from .errors import CaptureError
from .graph import GraphView, from_export, from_symbolic_trace
from .inputs import ExampleInputs
from .runstate import private_rng, training_flags_kept

__all__ = ["Capture", "capture", "register_leaf_module"]

log = logging.getLogger(__name__)

_LEAF_MODULES: list[type] = []


def register_leaf_module(cls: type) -> type:
    """Trace calls to ``cls`` as opaque leaves in torch.fx (for modules with data-dependent control flow)."""
    if cls not in _LEAF_MODULES:
        _LEAF_MODULES.append(cls)
    return cls


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm before 1.0.10 or so kept the registries with its feature extraction
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], autowrap_functions: tuple) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self._leaf_types = leaf_types

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, self._leaf_types) or slot_lib.is_drop_path_module(module):
            return True
        return super().is_leaf_module(module, qualified_name)

    # While it traces, torch.fx patches nn.Module.__call__ (and attribute reads) for the whole process: a
    # model another thread runs meanwhile must run as it always does, not be traced into this graph.
    def trace(self, root, concrete_args=None):
        self._thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


@dataclass
class Capture:
    """A graph view of the model and how it was obtained ("torch.fx" or "torch.export")."""

    view: GraphView
    method: str


def _shadow(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``.

    Capture runs the model's Python code with proxies or fake tensors, and some models write what they
    see into attributes (timm LeViT's attention-bias cache); doing that on a shadow keeps the user's
    model untouched, at the cost of copying modules but no tensors.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def capture(model: nn.Module, inputs: ExampleInputs | None) -> Capture:
    """Capture ``model``'s graph (torch.fx; torch.export on ``inputs`` where that fails). Reads the model only."""
    model = _shadow(model)
    slots = slot_lib.find_slots(model)
    leaf_types, autowrap = _timm_notrace()
    leaf_types = leaf_types + tuple(_LEAF_MODULES) + (slot_lib.SlotProbe,)
    failures: list[str] = []
    with training_flags_kept(model, training=False), slot_lib.install(model, slots) as probes, private_rng(model):
        view = None
        method = ""
        try:
            graph = _Tracer(leaf_types, autowrap).trace(model)
            hidden = _slots_hidden_in_leaves(graph, probes)
            if hidden:
                failures.append(f"torch.fx: slot {hidden[0]} is inside a module traced as a leaf")
            else:
                view = from_symbolic_trace(graph, model, lambda target: target if target in probes else None)
                method = "torch.fx"
                if inputs is not None and not inputs.kwargs and _calls_opaque_functions(graph, autowrap):
                    _learn_tensor_nodes(view, model, inputs)
        except Exception as error:  # tracing fails in many ways (TraceError, TypeError, ...)
            failures.append(f"torch.fx: {type(error).__name__}: {_first_line(error)}")
        if view is None and inputs is not None:
            log.info("%s: %s; capturing it with torch.export on the example inputs instead",
                     type(model).__name__, failures[-1])
            try:
                slot_of_probe = {probe.slot_id: name for name, probe in probes.items()}
                view = from_export(model, inputs, slot_of_probe, torch.ops.pathsurgeon.slot_probe.default)
                method = "torch.export"
            except Exception as error:
                failures.append(f"torch.export: {type(error).__name__}: {_first_line(error)}")
    if view is None:
        hint = "" if inputs is not None else "; pass example_inputs= so torch.export can be tried"
        raise CaptureError(
            f"could not capture a graph of {type(model).__name__} ({'; '.join(failures)}){hint}"
        )
    log.debug("%s: captured with %s", type(model).__name__, method)
    return Capture(view=view, method=method)


def _calls_opaque_functions(graph: fx.Graph, autowrap: tuple) -> bool:
    """Whether the trace calls functions it could not look into (whose results may be tuples of sizes)."""
    opaque = set(autowrap)
    return any(node.op == "call_function" and node.target in opaque for node in graph.nodes)


def _learn_tensor_nodes(view: GraphView, model: nn.Module, inputs: ExampleInputs) -> None:
    """Which nodes of a symbolic trace hold tensors, learned by running it once on the example inputs.

    Tracing cannot see inside functions it treats as opaque: timm MViTv2's ``reshape_post_pool``
    returns ``(x, feat_size)``, and without running it the sizes would pass for tensors that carry data.
    Keeps the guess from tracing if the traced graph does not run on the inputs.
    """
    values: dict[fx.Node, bool] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            values[node] = isinstance(result, torch.Tensor) or (
                isinstance(result, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in result)
            )
            return result

    try:
        with torch.no_grad():
            Recorder(fx.GraphModule(model, view.graph)).run(*inputs.args)
    except Exception:  # noqa: BLE001 - e.g. control flow the trace froze differently; keep tracing's guess
        return
    view.tensor_nodes = {node for node in view.tensor_nodes if values.get(node, True)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _slots_hidden_in_leaves(graph: fx.Graph, probes: dict[str, slot_lib.SlotProbe]) -> list[str]:
    leaves = {node.target for node in graph.nodes if node.op == "call_module" and node.target not in probes}
    return [name for name in probes if any(name.startswith(leaf + ".") for leaf in leaves)]
