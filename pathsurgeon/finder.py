"""Find residual branches on a captured graph: pure functions of a graph, no model needed.

A residual add is an add of two tensors that share a source ``s``, where one operand (the *skip*)
reaches ``s`` through a short chain of single-input ops (the identity, or a light projection shortcut
such as conv + norm) and the other (the *branch*) carries more parameterised compute than the skip.
Position-embedding and bias adds (operands with no common source), adds inside attention (the skip
side is not a single-input chain) and elementwise formulas such as tanh-GELU (no parameters on the
branch) are not residual.

Example on a hand-written module::

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
        def forward(self, x):
            return x + self.fc(x)

    view = GraphView.from_graph_module(torch.fx.symbolic_trace(Block()))
    [add] = find_residual_adds(view)
    assert add.block == "" and add.branch.target == "fc"
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

__all__ = ["BranchEntry", "GraphView", "ResidualAdd", "branch_entries", "find_residual_adds"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
_ADD_METHODS = {"add", "add_"}
_ATEN_ADDS = {"aten.add.Tensor", "aten.add_.Tensor"}

# Ops a drop-path slot may sit behind on its way to the add: scaling by a constant or a parameter
# (layer scale, NFNet's skip gain and alpha) commutes with a per-sample mask.
_SCALE_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
_SCALE_METHODS = {"mul", "mul_", "div", "div_"}
_ATEN_SCALES = {"aten.mul.Tensor", "aten.mul_.Tensor", "aten.div.Tensor", "aten.mul.Scalar", "aten.div.Scalar"}

# torch.fx nodes that produce shapes or other non-tensor values.
_SHAPE_METHODS = {"size", "dim", "numel", "item", "tolist", "type", "get_device", "stride"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "training"}

MAX_SKIP_CHAIN = 16  # a projection shortcut is a handful of ops (pool, conv, norm); more is not a skip
MAX_SCALE_HOPS = 8  # window un-partitioning (timm SAM ViT) is a view, a permute, a reshape, a slice and a copy


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

    @classmethod
    def from_graph_module(
        cls, graph_module: fx.GraphModule, slot_of_module: Callable[[str], str | None] = lambda _: None
    ) -> GraphView:
        """Describe a torch.fx symbolic trace; ``slot_of_module`` maps a call_module target to its slot."""
        return from_symbolic_trace(graph_module.graph, graph_module, slot_of_module)

    def owner(self, node: fx.Node) -> str:
        stack = self.module_stack.get(node, ())
        return stack[-1] if stack else ""


@dataclass
class ResidualAdd:
    """One residual add. ``block``: the module whose forward performs it (innermost owner of the add)."""

    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    source: fx.Node  # the tensor both operands are computed from (the block input, for most blocks)
    block: str
    slot: str | None  # the drop-path slot sitting on the branch, if any
    slot_call: fx.Node | None  # the node calling that slot
    producer: str | None  # the module whose output is the branch (for a forward hook), if any
    producer_output: fx.Node  # the node the producer returns (the branch, or what the branch scales)
    order: int  # position of the add in execution order


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS or str(node.target) in _ATEN_ADDS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_scale(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SCALE_FUNCTIONS or str(node.target) in _ATEN_SCALES
    return node.op == "call_method" and node.target in _SCALE_METHODS


_LAYOUT_METHODS = {"narrow", "view", "reshape", "permute", "transpose", "flatten", "contiguous"}
_ATEN_LAYOUT = {
    "aten.slice.Tensor", "aten.narrow.default", "aten.view.default", "aten.reshape.default",
    "aten.permute.default", "aten.transpose.int", "aten.flatten.using_ints", "aten.contiguous.default",
    "aten.clone.default",
}


def _is_slice(node: fx.Node) -> bool:
    """Indexing and layout changes a per-sample mask commutes with, as long as the batch stays axis 0.

    timm RexNet adds the shortcut to a channel slice of the branch; NextViT reshapes after its drop path.
    """
    if node.op == "call_function":
        return node.target in (operator.getitem, torch.reshape, torch.flatten, torch.permute,
                               torch.transpose) or str(node.target) in _ATEN_LAYOUT
    return node.op == "call_method" and node.target in _LAYOUT_METHODS


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


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
            inp in parameter_nodes for inp in _node_inputs(node)
        ):
            parameter_users.add(node)
    tensor_nodes = {n for n in graph.nodes if n not in non_tensor and n.op != "output"}
    return GraphView(graph, module_stack, parameter_users, slot_calls, tensor_nodes, parameter_nodes,
                     scale_calls=scale_calls)


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
    inputs = _node_inputs(node)
    if node.op in ("call_function", "call_method") and inputs and all(i in non_tensor for i in inputs):
        # arithmetic on shapes (H // 2, B * N, shape[0]) stays a shape
        return True
    return False


def _ancestor_bits(graph: fx.Graph) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """Each node's ancestors (itself included) as an integer bitset over topological positions."""
    position: dict[fx.Node, int] = {}
    ancestors: dict[fx.Node, int] = {}
    for index, node in enumerate(graph.nodes):
        position[node] = index
        bits = 1 << index
        for inp in node.all_input_nodes:
            bits |= ancestors[inp]
        ancestors[node] = bits
    return position, ancestors


def _bits_to_nodes(bits: int, nodes: list[fx.Node]) -> Iterable[fx.Node]:
    while bits:
        low = bits & -bits
        yield nodes[low.bit_length() - 1]
        bits ^= low


def find_residual_adds(view: GraphView) -> list[ResidualAdd]:
    """Every residual add of the graph, in execution order."""
    nodes = list(view.graph.nodes)
    position, ancestors = _ancestor_bits(view.graph)
    data, parameter_users = _data_flow(view)
    parameter_bits = 0
    for node in parameter_users & data:  # computing with data; a view of a weight is not compute
        parameter_bits |= 1 << position[node]

    def parameter_ops(bits: int) -> int:
        return (bits & parameter_bits).bit_count()

    def main_inputs(node: fx.Node) -> list[fx.Node]:
        """Tensor inputs that carry data (not parameters, buffers or shapes)."""
        return [i for i in _node_inputs(node) if i in view.tensor_nodes and i in data]

    def skip_source(skip: fx.Node, branch: fx.Node) -> tuple[fx.Node, int] | None:
        """Follow ``skip`` back to the one ancestor of ``branch`` all its data comes from.

        Usually a chain of single-input ops (the identity, a projection); a pooled shortcut may split
        and join again on the way (timm Hiera: ``cat([amax(view(x)), mean(view(x))])``), as long as
        every path ends at the same source within :data:`MAX_SKIP_CHAIN` ops.
        """
        chain_bits = 0
        sources: set[fx.Node] = set()
        seen: set[fx.Node] = set()
        frontier = [skip]
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            if ancestors[branch] >> position[current] & 1:
                sources.add(current)
                continue
            chain_bits |= 1 << position[current]
            inputs = main_inputs(current)
            if not inputs or current.op in ("placeholder", "get_attr") or chain_bits.bit_count() > MAX_SKIP_CHAIN:
                return None
            frontier.extend(inputs)
        if len(sources) != 1:
            return None
        return sources.pop(), chain_bits

    found: list[ResidualAdd] = []
    for node in nodes:
        if not _is_add(node) or node not in view.tensor_nodes:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or not all(o in view.tensor_nodes for o in operands):
            continue
        if "alpha" in node.kwargs and node.kwargs["alpha"] != 1:
            continue
        best: tuple[int, int, int, fx.Node, fx.Node, fx.Node, fx.Node | None] | None = None
        for skip, branch in (operands, operands[::-1]):
            source = skip_source(skip, branch)
            if source is None:
                continue
            source_node, chain_bits = source
            branch_bits = ancestors[branch] & ~ancestors[source_node]
            branch_params, skip_params = parameter_ops(branch_bits), parameter_ops(chain_bits)
            slot_call = _slot_on_branch(view, branch, data)
            # A drop-path slot at the end of one operand says which one the library's author took for
            # the branch: then a scaled shortcut may carry as many parameters as a light branch
            # (timm PoolFormerV2: res_scale(x) + layer_scale(drop_path(pool(norm(x)) - norm(x)))).
            if branch_params == 0 or (slot_call is None and skip_params >= branch_params):
                continue
            rank = (slot_call is None, skip_params, chain_bits.bit_count())
            if best is None or rank < best[:3]:
                best = (*rank, skip, branch, source_node, slot_call)
        if best is None:
            continue
        *_, skip, branch, source_node, slot_call = best
        block = view.owner(node)
        producer, producer_output = _producer(view, branch, node, data)
        found.append(
            ResidualAdd(
                add=node,
                skip=skip,
                branch=branch,
                source=source_node,
                block=block,
                slot=view.slot_calls.get(slot_call) if slot_call is not None else None,
                slot_call=slot_call,
                producer=producer,
                producer_output=producer_output,
                order=position[node],
            )
        )
    return found


def _data_flow(view: GraphView) -> tuple[set[fx.Node], set[fx.Node]]:
    """Nodes that depend on the model's inputs, and those that compute with a parameter.

    A weight computed from parameters alone (timm's ScaledStdConv2d standardises its weight in forward)
    is not data: the conv that uses it has one data input and counts as parameterised compute.
    """
    data: set[fx.Node] = set()
    parameter_derived: set[fx.Node] = set(view.parameter_nodes)
    users = set(view.parameter_users)
    for node in view.graph.nodes:
        inputs = _node_inputs(node)
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


def _slot_on_branch(view: GraphView, branch: fx.Node, data: set[fx.Node]) -> fx.Node | None:
    """The slot call the branch passes through just before the add (possibly behind a scale).

    A scale's factor may be computed from a parameter (timm MetaFormer's ``Scale``:
    ``x * self.scale.view(shape)``): only the operand that carries data is followed.
    """
    current = branch
    for _ in range(MAX_SCALE_HOPS + 1):
        if current in view.slot_calls:
            return current
        if not (_is_scale(current) or _is_slice(current) or current in view.scale_calls):
            return None
        inputs = [i for i in _node_inputs(current) if i in view.tensor_nodes and i in data]
        if len(inputs) != 1:
            return None
        current = inputs[0]
    return None


def _producer(
    view: GraphView, branch: fx.Node, add: fx.Node, data: set[fx.Node]
) -> tuple[str | None, fx.Node]:
    """The child module of the block whose call returns the branch, and the node it returns.

    Inline scaling and layout code between the module and the add is looked through (HF LW-DETR's
    ViT: ``attention(x)[0] * gamma``, reshaped): a per-sample mask on the module output is the same.
    So is a drop-path slot, for a model whose slots cannot be filled (HF CvT).
    (None, branch) when the branch is computed inline.
    """
    add_stack = view.module_stack.get(add, ())
    depth = len(add_stack)
    slots = set(view.slot_calls.values())
    current = branch
    for _ in range(MAX_SCALE_HOPS + 1):
        stack = view.module_stack.get(current, ())
        in_slot = len(stack) > depth and stack[depth] in slots
        if not in_slot and len(stack) > depth and stack[:depth] == add_stack:
            return stack[depth], current
        if not (_is_scale(current) or _is_slice(current) or in_slot):
            break
        inputs = [i for i in _node_inputs(current) if i in view.tensor_nodes and i in data]
        if len(inputs) != 1:
            break
        current = inputs[0]
    return None, branch


@dataclass(frozen=True)
class BranchEntry:
    """Where a residual branch starts, for running it on a subset of the batch.

    ``module``: the child module of the block (any depth) that is the branch's only way in: every use
    of the source tensor on the branch happens inside it, and nothing else with a batch enters the
    branch. None when there is no such module; ``reason`` says why. ``modules``: every module the
    branch runs in, below the block.
    """

    module: str | None
    modules: frozenset[str]
    reason: str = ""


def branch_entries(view: GraphView, adds: list[ResidualAdd]) -> dict[fx.Node, BranchEntry]:
    """The :class:`BranchEntry` of each residual add, keyed by its add node."""
    nodes = list(view.graph.nodes)
    _, ancestors = _ancestor_bits(view.graph)
    data, _ = _data_flow(view)
    return {a.add: _branch_entry(view, a, nodes, ancestors, data) for a in adds}


def _branch_entry(
    view: GraphView, add: ResidualAdd, nodes: list[fx.Node], ancestors: dict[fx.Node, int], data: set[fx.Node]
) -> BranchEntry:
    block_stack = view.module_stack.get(add.add, ())
    depth = len(block_stack)
    exclusive = set(_bits_to_nodes(ancestors[add.branch] & ~ancestors[add.skip] & ~ancestors[add.source], nodes))
    modules = frozenset(
        name
        for node in exclusive
        for name in view.module_stack.get(node, ())[depth:]
    )
    entering = {
        i
        for node in exclusive
        for i in _node_inputs(node)
        if i not in exclusive and i in data and i in view.tensor_nodes
    }
    if entering != {add.source}:
        return BranchEntry(None, modules, "the branch takes batch data from more than the block input")
    users = [n for n in add.source.users if n in exclusive]
    stacks = [view.module_stack.get(n, ()) for n in users]
    common = stacks[0] if stacks else ()
    for stack in stacks[1:]:
        length = 0
        while length < min(len(common), len(stack)) and common[length] == stack[length]:
            length += 1
        common = common[:length]
    if len(common) <= depth or common[:depth] != block_stack:
        return BranchEntry(None, modules, "the branch starts with inline code, not with a module call")
    entry = common[depth]
    if any(entry in view.module_stack.get(n, ()) and n not in exclusive for n in nodes):
        return BranchEntry(None, modules, f"{entry} also runs off the branch")
    if add.slot_call is not None and entry in view.module_stack.get(add.slot_call, ()):
        return BranchEntry(None, modules, f"the drop-path slot sits inside {entry}")
    return BranchEntry(entry, modules)
