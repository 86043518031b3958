"""Graph views: a captured FX graph and what pathsurgeon needs to know about its nodes.

Both kinds of capture end here — a torch.fx symbolic trace (:func:`from_symbolic_trace`) and a
torch.export program (:func:`from_export`) — so the finder sees one kind of object: the graph, the
module that owns each node (``nn_module_stack``), the nodes that compute with parameters, the calls
of drop-path slots, and which nodes hold tensors. Execution order, ancestor sets and data flow are
derived once per view, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn

from .inputs import ExampleInputs

__all__ = ["GraphView", "from_export", "from_symbolic_trace"]

# torch.fx nodes that produce shapes or other non-tensor values.
_SHAPE_METHODS = {"size", "dim", "numel", "item", "tolist", "type", "get_device", "stride"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "training"}


@dataclass
class GraphView:
    """A captured graph and what the finder needs to know about its nodes.

    ``module_stack[node]``: qualified names of the modules executing ``node``, outermost first ('' is the
    root). ``parameter_users``: nodes that compute with a parameter. ``slot_calls[node]``: the drop-path
    slot a node calls. ``tensor_nodes``: nodes whose value is a tensor (not a shape or a number).
    """

    graph: fx.Graph
    module_stack: dict[fx.Node, tuple[str, ...]]
    parameter_users: set[fx.Node]
    slot_calls: dict[fx.Node, str] = field(default_factory=dict)
    tensor_nodes: set[fx.Node] = field(default_factory=set)
    parameter_nodes: set[fx.Node] = field(default_factory=set)
    constant_nodes: set[fx.Node] = field(default_factory=set)  # buffers and constants lifted to inputs
    # calls of leaf modules that only scale their input (timm MetaFormer's Scale, or nn.Identity where
    # no scale was built): at most one parameter, no buffers, no children
    scale_calls: set[fx.Node] = field(default_factory=set)
    # the class of each module by qualified name (shared modules under every name they have)
    module_types: dict[str, type] = field(default_factory=dict)

    @functools.cached_property
    def nodes(self) -> list[fx.Node]:
        """The nodes in execution (topological) order."""
        return list(self.graph.nodes)

    @functools.cached_property
    def position(self) -> dict[fx.Node, int]:
        return {node: index for index, node in enumerate(self.nodes)}

    @functools.cached_property
    def ancestors(self) -> dict[fx.Node, int]:
        """Each node's ancestors (itself included) as an integer bitset over positions (computed once)."""
        ancestors: dict[fx.Node, int] = {}
        for index, node in enumerate(self.nodes):
            bits = 1 << index
            for inp in node.all_input_nodes:
                bits |= ancestors[inp]
            ancestors[node] = bits
        return ancestors

    @functools.cached_property
    def data(self) -> set[fx.Node]:
        """Nodes that depend on the model's inputs (see :meth:`data_users`)."""
        return self._data_flow[0]

    @functools.cached_property
    def data_users(self) -> set[fx.Node]:
        """Nodes that compute with a parameter (or a weight computed from parameters alone) and data."""
        return self._data_flow[1]

    @functools.cached_property
    def _data_flow(self) -> tuple[set[fx.Node], set[fx.Node]]:
        return _data_flow(self)

    def nodes_of(self, bits: int) -> Iterable[fx.Node]:
        """The nodes whose positions are set in ``bits``."""
        while bits:
            low = bits & -bits
            yield self.nodes[low.bit_length() - 1]
            bits ^= low

    @classmethod
    def from_graph_module(
        cls, graph_module: fx.GraphModule, slot_of_module: Callable[[str], str | None] = lambda _: None
    ) -> GraphView:
        """Describe a torch.fx symbolic trace; ``slot_of_module`` maps a call_module target to its slot."""
        return from_symbolic_trace(graph_module.graph, graph_module, slot_of_module)

    def owner(self, node: fx.Node) -> str:
        stack = self.module_stack.get(node, ())
        return stack[-1] if stack else ""


def from_symbolic_trace(
    graph: fx.Graph, root: nn.Module, slot_of_module: Callable[[str], str | None]
) -> GraphView:
    """Build a :class:`GraphView` from a torch.fx symbolic trace of ``root``."""
    module_stack: dict[fx.Node, tuple[str, ...]] = {}
    parameter_nodes: set[fx.Node] = set()
    parameter_users: set[fx.Node] = set()
    slot_calls: dict[fx.Node, str] = {}
    scale_calls: set[fx.Node] = set()
    non_tensor: set[fx.Node] = set()
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        names = tuple(path for path, _ in stack.values() if path)
        if node.op == "call_module":
            names = names + (node.target,) if not names or names[-1] != node.target else names
        module_stack[node] = names
        if node.op == "get_attr":
            value = _resolve(root, node.target)
            if isinstance(value, nn.Parameter):
                parameter_nodes.add(node)
            elif not isinstance(value, torch.Tensor):
                non_tensor.add(node)
        elif node.op == "call_module":
            slot = slot_of_module(node.target)
            module = root.get_submodule(node.target)
            if slot is not None:
                slot_calls[node] = slot
            elif any(True for _ in module.parameters()):
                parameter_users.add(node)
            if slot is None and _only_scales(module):
                scale_calls.add(node)
        elif node.op == "placeholder" and node.args and not isinstance(node.args[0], torch.Tensor):
            non_tensor.add(node)  # an optional argument left at its default (timm ViT's attn_mask=None)
        elif _is_shape_node(node, non_tensor):
            non_tensor.add(node)
        if node.op in ("call_function", "call_method") and any(
            inp in parameter_nodes for inp in list(node.all_input_nodes)
        ):
            parameter_users.add(node)
    tensor_nodes = {n for n in graph.nodes if n not in non_tensor and n.op != "output"}
    _stacks_inside_graph_modules(graph, root, module_stack)
    return GraphView(graph, module_stack, parameter_users, slot_calls, tensor_nodes, parameter_nodes,
                     scale_calls=scale_calls, module_types=_module_types(root))


def _stacks_inside_graph_modules(
    graph: fx.Graph, root: nn.Module, module_stack: dict[fx.Node, tuple[str, ...]]
) -> None:
    """Owning modules of the nodes that run inside an ``fx.GraphModule`` (a feature extractor from
    torchvision's ``create_feature_extractor`` or timm's ``FeatureGraphNet``, ``torch.fx.symbolic_trace``
    of a model), from the module names it keeps.

    A GraphModule runs generated code: its blocks are no longer called, only their leaves
    (``features.1.0.block.0``) and attributes (``features.1.0.layer_scale``), so tracing it puts every
    residual add at the GraphModule itself, and all branches in one block. Each leaf call is owned by
    the modules its name passes through; an add (any node with several inputs) by the deepest module
    holding every call and attribute between the add and the nearest node both its inputs depend on
    (the block's input): ``features.1.0`` for ConvNeXt's ``x + stochastic_depth(layer_scale * block(x))``;
    any other node by the deepest module holding its inputs.
    """
    graph_modules = {name for name, m in root.named_modules() if isinstance(m, fx.GraphModule)}
    if not graph_modules:
        return
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    ancestors: dict[fx.Node, int] = {}
    owner: dict[fx.Node, str] = {}  # the synthesised deepest owner of each node inside a GraphModule
    for node in nodes:
        inputs = node.all_input_nodes
        bits = 0
        for i in inputs:
            bits |= ancestors[i] | (1 << position[i])
        ancestors[node] = bits
        stack = module_stack[node]
        if node.op == "call_module":
            stack = stack[:-1]  # the call itself is appended below, with the names it passes through
        inside = [name for name in stack if name in graph_modules]
        if not inside and "" not in graph_modules:
            continue
        base = stack[:stack.index(inside[-1]) + 1] if inside else ()
        top = inside[-1] if inside else ""
        if node.op == "call_module":
            path = node.target
        elif node.op == "get_attr":
            path = node.target.rpartition(".")[0]
        elif node.op in ("placeholder", "output"):
            path = top
        else:
            path = _owner_between(node, inputs, nodes, position, ancestors, owner, top)
        owner[node] = path
        below = (path[len(top) + 1:] if top else path) if path != top and _within(path, top) else ""
        deeper = below.split(".") if below else []
        names = [".".join(([top] if top else []) + deeper[:end]) for end in range(1, len(deeper) + 1)]
        module_stack[node] = base + tuple(names)


def _within(path: str, outer: str) -> bool:
    return not outer or path == outer or path.startswith(outer + ".")


def _common(paths: Iterable[str]) -> str | None:
    pieces: list[str] | None = None
    for path in paths:
        split = path.split(".") if path else []
        if pieces is None:
            pieces = split
            continue
        end = 0
        while end < min(len(pieces), len(split)) and pieces[end] == split[end]:
            end += 1
        pieces = pieces[:end]
    return None if pieces is None else ".".join(pieces)


def _anchor(node: fx.Node, owner: dict[fx.Node, str], top: str) -> str:
    """The module a node's value comes out into: a leaf call's parent, an attribute's holder."""
    if node.op in ("call_module", "get_attr"):
        # torch.fx types a target as str | Callable; a call_module or get_attr node's is a dotted path
        return cast(str, node.target).rpartition(".")[0]
    return owner.get(node, top)


def _owner_between(
    node: fx.Node, inputs: list[fx.Node], nodes: list[fx.Node], position: dict[fx.Node, int],
    ancestors: dict[fx.Node, int], owner: dict[fx.Node, str], top: str,
) -> str:
    found: str | None = None
    if len(inputs) >= 2:
        common = -1
        for i in inputs:
            common &= ancestors[i] | (1 << position[i])
        if common > 0:
            start = common.bit_length() - 1  # the nearest node every input depends on
            between = ancestors[node] >> (start + 1)
            paths: list[str] = []
            leaves: set[str] = set()
            index = start + 1
            while between:
                if between & 1:
                    inner = nodes[index]
                    if inner.op == "call_module":  # the target of these two ops is a dotted path
                        paths.append(cast(str, inner.target))
                        leaves.add(cast(str, inner.target))
                    elif inner.op == "get_attr":
                        paths.append(cast(str, inner.target).rpartition(".")[0])
                between >>= 1
                index += 1
            found = _common(paths)
            if found in leaves:  # the add takes one leaf's output: it runs in that leaf's parent
                found = found.rpartition(".")[0]
    if found is None:
        # an op on a module's own weights is that module's inlined code (timm's LayerNorm traced into
        # F.layer_norm(x, blocks.0.norm1.weight, ...)), wherever its data input came from
        weights = [i for i in inputs if i.op == "get_attr"]
        found = _common(_anchor(i, owner, top) for i in (weights or inputs) if i.op != "placeholder")
    return found if found is not None and _within(found, top) else top


def _only_scales(module: nn.Module) -> bool:
    """An identity (a layer scale built at init value 0: timm MetaFormer) or a one-parameter scale."""
    if type(module) is nn.Identity:
        return True
    return (
        not module._modules
        and not module._buffers
        and len(module._parameters) == 1
        and not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding))
    )


def _resolve(root: nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _is_shape_node(node: fx.Node, non_tensor: set[fx.Node]) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES:
            return True
        if node.target in (len, int, float, math.sqrt, math.ceil, math.floor):
            return True
    inputs = list(node.all_input_nodes)
    if node.op in ("call_function", "call_method") and inputs and all(i in non_tensor for i in inputs):
        # arithmetic on shapes (H // 2, B * N, shape[0]) stays a shape
        return True
    return False


@contextlib.contextmanager
def _no_partial_graph_dump() -> Iterator[None]:
    """torch.export prints the partial graph of a failed export (thousands of lines) on stderr before it
    raises; the error, which pathsurgeon reports in one line, says enough. Only that module's ``print`` is
    silenced, and only for the call: nothing another thread or the user prints is touched."""
    try:
        from torch.export import _trace
    except ImportError:  # another layout of torch: its dump stays
        yield
        return
    namespace = vars(_trace)
    previous = namespace.get("print", _MISSING)
    namespace["print"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if previous is _MISSING:
            namespace.pop("print", None)
        else:
            namespace["print"] = previous


_MISSING = object()


def from_export(
    model: nn.Module, inputs: ExampleInputs, slot_of_probe: dict[int, str], probe_op: object
) -> GraphView:
    """Export ``model`` (non-strict) on ``inputs`` and describe the program's graph.

    ``probe_op``: the custom op marking a drop-path slot; its second argument is the probe's id,
    ``slot_of_probe`` maps ids to slot names.
    """
    with warnings.catch_warnings(), _no_partial_graph_dump():
        # export complains about attributes the shadow's forward assigns (caches); the shadow is thrown away
        warnings.simplefilter("ignore")
        program = torch.export.export(model, inputs.args, inputs.kwargs, strict=False)
    graph = program.graph
    signature = program.graph_signature
    parameter_names = set(signature.inputs_to_parameters)
    constant_names = set(signature.inputs_to_buffers) | set(getattr(signature, "inputs_to_lifted_tensor_constants", {}))
    module_stack: dict[fx.Node, tuple[str, ...]] = {}
    parameter_nodes: set[fx.Node] = set()
    parameter_users: set[fx.Node] = set()
    slot_calls: dict[fx.Node, str] = {}
    tensor_nodes: set[fx.Node] = set()
    constant_nodes: set[fx.Node] = set()
    real_path = _RealPaths(model)
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        real = (real_path(path) for path, _ in stack.values() if path)
        module_stack[node] = tuple(path for path in real if path)
        value = node.meta.get("val")
        # ops with several outputs (max(dim) -> values, indices) count too; getitem takes them apart
        if isinstance(value, torch.Tensor) or (
            isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
        ):
            tensor_nodes.add(node)
        if node.op == "placeholder" and node.name in parameter_names:
            parameter_nodes.add(node)
        elif node.op == "placeholder" and node.name in constant_names:
            constant_nodes.add(node)
        elif node.op == "call_function":
            if node.target is probe_op:
                slot_calls[node] = slot_of_probe[node.args[1]]
            elif any(inp in parameter_nodes for inp in node.all_input_nodes):
                parameter_users.add(node)
    return GraphView(graph, module_stack, parameter_users, slot_calls, tensor_nodes, parameter_nodes, constant_nodes,
                     module_types=_module_types(model))


def _module_types(root: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in root.named_modules(remove_duplicate=False)}


_SLICE = re.compile(r"slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)")


class _RealPaths:
    """Module paths as torch.export names them, mapped to the paths of the modules in the model's tree.

    A forward that slices a container (smp's DPN encoder: ``self.features[1:4](x)``) runs a temporary
    ``Sequential`` that export names ``features.slice(1, 4, None)``; its children are the model's own
    modules. Each such path maps to the real path of the module it reaches (``features.conv2_1``; a sliced
    ``ModuleList`` renumbers from 0, so the object, not the name, decides), and the temporary container
    itself to None: it is not in the tree, so nothing can be wrapped or hooked there.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._real_names: dict[int, str] | None = None  # built on the first sliced path only
        self._cache: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if "slice(" not in path:
            return path
        if path not in self._cache:
            self._cache[path] = self._resolve(path)
        return self._cache[path]

    def _resolve(self, path: str) -> str | None:
        module: Any = self._model
        for part in path.split("."):
            match = _SLICE.fullmatch(part)
            try:
                if match:
                    module = module[slice(*(None if v == "None" else int(v) for v in match.groups()))]
                else:
                    module = getattr(module, part)
            except (AttributeError, IndexError, KeyError, TypeError):
                return None
        if self._real_names is None:
            self._real_names = {id(m): name for name, m in self._model.named_modules(remove_duplicate=False)}
        return self._real_names.get(id(module))


def _data_flow(view: GraphView) -> tuple[set[fx.Node], set[fx.Node]]:
    """Nodes that depend on the model's inputs, and those that compute with a parameter.

    A weight computed from parameters alone (timm's ScaledStdConv2d standardises its weight in forward)
    is not data: the conv that uses it has one data input and counts as parameterised compute.
    """
    data: set[fx.Node] = set()
    parameter_derived: set[fx.Node] = set(view.parameter_nodes)
    users = set(view.parameter_users)
    for node in view.graph.nodes:
        inputs = list(node.all_input_nodes)
        if node.op == "placeholder":
            if node not in view.parameter_nodes and node not in view.constant_nodes:
                data.add(node)
            continue
        if any(i in data for i in inputs):
            data.add(node)
            if any(i in parameter_derived for i in inputs):
                users.add(node)
        elif any(i in parameter_derived for i in inputs):
            parameter_derived.add(node)
    return data, users


