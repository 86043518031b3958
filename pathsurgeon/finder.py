"""Find residual branches on a captured graph, and pick the ones to change: pure functions of a graph.

A residual add is an add of two tensors that share a source ``s``, where one operand (the *shortcut*)
reaches ``s`` through a short chain of ops (the identity, or a light projection such as conv + norm)
and the other (the *branch*) carries more parameterised compute than the shortcut. Position-embedding
and bias adds (operands with no common source, or a branch computed from the embedding by an earlier
block of the same kind: DETR's and SAM's decoder layers), adds inside attention (the
shortcut side is not a short chain) and elementwise formulas such as tanh-GELU (no parameters on the
branch) are not residual.

Which residual adds get stochastic depth (:func:`select`): where the model has drop-path slots, those
on slots — the library's authors decided where stochastic depth goes; elsewhere, those whose branch is
the output of a module a forward hook can wrap.

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

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx

from .graph import GraphView
from .report import LeftAlone

__all__ = ["BranchEntry", "GraphView", "ResidualAdd", "Selection", "branch_entries", "find_residual_adds", "select"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
_ADD_METHODS = {"add", "add_"}
_ATEN_ADDS = {"aten.add.Tensor", "aten.add_.Tensor"}

# Ops a drop-path slot may sit behind on its way to the add: scaling by a constant or a parameter
# (layer scale, NFNet's skip gain and alpha) commutes with a per-sample mask.
_SCALE_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
_SCALE_METHODS = {"mul", "mul_", "div", "div_"}
_ATEN_SCALES = {"aten.mul.Tensor", "aten.mul_.Tensor", "aten.div.Tensor", "aten.mul.Scalar", "aten.div.Scalar"}

MAX_SKIP_CHAIN = 16  # a projection shortcut is a handful of ops (pool, conv, norm); more is not a shortcut
MAX_SCALE_HOPS = 8  # window un-partitioning (timm SAM ViT) is a view, a permute, a reshape, a slice and a copy


@dataclass
class ResidualAdd:
    """One residual add. ``block``: the module whose forward performs it (innermost owner of the add)."""

    node: fx.Node  # the add
    shortcut: fx.Node
    branch: fx.Node
    source: fx.Node  # the tensor both operands are computed from (the block input, for most blocks)
    block: str
    slot: str | None  # the drop-path slot sitting on the branch, if any
    slot_call: fx.Node | None  # the node calling that slot
    producer: str | None  # the module whose output is the branch (for a forward hook), if any
    producer_output: fx.Node  # the node the producer returns (the branch, or what the branch scales)


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


def find_residual_adds(view: GraphView) -> list[ResidualAdd]:
    """Every residual add of the graph, in execution order."""
    position, ancestors, data = view.position, view.ancestors, view.data
    parameter_bits = 0
    for node in view.data_users & data:  # computing with data; a view of a weight is not compute
        parameter_bits |= 1 << position[node]

    def parameter_ops(bits: int) -> int:
        return (bits & parameter_bits).bit_count()

    def main_inputs(node: fx.Node) -> list[fx.Node]:
        """Tensor inputs that carry data (not parameters, buffers or shapes)."""
        return [i for i in list(node.all_input_nodes) if i in view.tensor_nodes and i in data]

    def shortcut_source(shortcut: fx.Node, branch: fx.Node) -> tuple[fx.Node, int] | None:
        """Follow ``shortcut`` back to the one ancestor of ``branch`` all its data comes from.

        Usually a chain of single-input ops (the identity, a projection); a pooled shortcut may split
        and join again on the way (timm Hiera: ``cat([amax(view(x)), mean(view(x))])``), as long as
        every path ends at the same source within :data:`MAX_SKIP_CHAIN` ops.
        """
        chain_bits = 0
        sources: set[fx.Node] = set()
        seen: set[fx.Node] = set()
        frontier = [shortcut]
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
    for node in view.nodes:
        if not _is_add(node) or node not in view.tensor_nodes:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or not all(o in view.tensor_nodes for o in operands):
            continue
        if "alpha" in node.kwargs and node.kwargs["alpha"] != 1:
            continue
        best: tuple[int, int, int, fx.Node, fx.Node, fx.Node, fx.Node | None] | None = None
        for shortcut, branch in (operands, operands[::-1]):
            source = shortcut_source(shortcut, branch)
            if source is None:
                continue
            source_node, chain_bits = source
            branch_bits = ancestors[branch] & ~ancestors[source_node]
            if _computed_outside(view, node, source_node, branch_bits):
                continue
            branch_params, shortcut_params = parameter_ops(branch_bits), parameter_ops(chain_bits)
            slot_call = _slot_on_branch(view, branch, data)
            # A drop-path slot at the end of one operand says which one the library's author took for
            # the branch: then a scaled shortcut may carry as many parameters as a light branch
            # (timm PoolFormerV2: res_scale(x) + layer_scale(drop_path(pool(norm(x)) - norm(x)))).
            if branch_params == 0 or (slot_call is None and shortcut_params >= branch_params):
                continue
            rank = (slot_call is None, shortcut_params, chain_bits.bit_count())
            if best is None or rank < best[:3]:
                best = (*rank, shortcut, branch, source_node, slot_call)
        if best is None:
            continue
        *_, shortcut, branch, source_node, slot_call = best
        block = view.owner(node)
        paths: Sequence[tuple[fx.Node, fx.Node | None]] = [(branch, slot_call)]
        if slot_call is None and (parallel := _parallel_paths(view, branch, data)):
            paths = parallel  # one residual branch per parallel path, each with its own slot
        for path, path_slot in paths:
            producer, producer_output = _producer(view, path, node, data)
            found.append(
                ResidualAdd(
                    node=node,
                    shortcut=shortcut,
                    branch=path,
                    source=source_node,
                    block=block,
                    slot=view.slot_calls.get(path_slot) if path_slot is not None else None,
                    slot_call=path_slot,
                    producer=producer,
                    producer_output=producer_output,
                )
            )
    return found


def _computed_outside(view: GraphView, add: fx.Node, source: fx.Node, branch_bits: int) -> bool:
    """Whether the "branch" is an input of the block that adds it, computed from ``source`` by earlier
    blocks, not its residual branch: DETR's attention modules add position embeddings to the hidden
    states the previous layers (or the encoder) computed from them, SAM's two-way layers add the point
    embeddings to the queries the previous layer computed. Judged on the branch's compute outside the
    module that performs the add (a block nested in another of its class, or a shared module the block
    calls, as timm CoaT's position encoding, runs within its forward): it is an earlier block's when it
    runs outside the module around that one (a Hugging Face ``*Output`` module adds the residual of a
    branch its sibling ``*Intermediate`` computed: a branch still), or inside another module of a
    model-defined class the add runs in (another layer of the same stack; two ``nn.Sequential`` are
    not two blocks of one kind)."""
    enclosing = view.module_stack.get(add, ())
    if not enclosing:
        return False
    owner, scope = enclosing[-1], enclosing[-2] if len(enclosing) > 1 else ""
    kinds = {view.module_types.get(name) for name in enclosing} - {None}
    kinds = {kind for kind in kinds if not kind.__module__.startswith("torch.")}
    source_bit = 1 << view.position[source]
    for node in view.nodes_of(branch_bits):
        stack = view.module_stack.get(node, ())
        if not view.ancestors[node] & source_bit or owner in stack:
            continue
        if scope and scope not in stack:
            return True
        if any(name not in enclosing and view.module_types.get(name) in kinds for name in stack):
            return True
    return False


def _parallel_paths(view: GraphView, branch: fx.Node, data: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]] | None:
    """Parallel paths summed before the add, a drop-path slot ending each: ``(path, slot call)`` pairs.

    timm's ``ParallelThingsBlock`` (``vit_*_18x2_224``): ``x + torch.stack([p(x) for p in paths]).sum(0)``
    with each path ``Sequential(norm, attn, layer_scale, drop_path)``: stochastic depth per path.
    """
    if not _is_sum_over_batch_of_stack(branch):
        return None
    # torch.fx types node.args as ``Argument`` (any value a graph can hold); the check just above
    # established that this one is the ``torch.stack`` node.
    stacked = cast(fx.Node, branch.args[0])
    elements = stacked.args[0] if stacked.args else stacked.kwargs.get("tensors")
    if not isinstance(elements, (list, tuple)) or len(elements) < 2:
        return None
    slot_calls = [_slot_on_branch(view, e, data) if isinstance(e, fx.Node) else None for e in elements]
    if any(call is None for call in slot_calls):
        return None
    return list(zip(elements, cast(list[fx.Node], slot_calls), strict=True))  # no None: checked above


def _is_sum_over_batch_of_stack(node: fx.Node) -> bool:
    """``torch.stack(tensors).sum(dim=0)`` (fx) or ``aten.sum.dim_IntList(aten.stack(tensors), [0])`` (export)."""

    def argument(n: fx.Node, index: int, name: str, default: Any) -> Any:
        return n.args[index] if len(n.args) > index else n.kwargs.get(name, default)

    if node.op == "call_method" and node.target == "sum" or (
        node.op == "call_function" and (node.target is torch.sum or str(node.target) == "aten.sum.dim_IntList")
    ):
        dim = argument(node, 1, "dim", None)
        stacked = node.args[0] if node.args else None
        if dim not in (0, [0], (0,)) or not isinstance(stacked, fx.Node) or argument(node, 2, "keepdim", False):
            return False
        return stacked.op == "call_function" and (
            stacked.target is torch.stack or str(stacked.target) == "aten.stack.default"
        ) and argument(stacked, 1, "dim", 0) == 0
    return False


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
        inputs = [i for i in list(current.all_input_nodes) if i in view.tensor_nodes and i in data]
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
        inputs = [i for i in list(current.all_input_nodes) if i in view.tensor_nodes and i in data]
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


def branch_entries(view: GraphView, adds: list[ResidualAdd]) -> dict[tuple[fx.Node, fx.Node | None], BranchEntry]:
    """The :class:`BranchEntry` of each residual branch, keyed by its add node and slot call (parallel
    paths share their add)."""
    return {(a.node, a.slot_call): _branch_entry(view, a) for a in adds}


def _branch_entry(view: GraphView, add: ResidualAdd) -> BranchEntry:
    block_stack = view.module_stack.get(add.node, ())
    depth = len(block_stack)
    ancestors, data = view.ancestors, view.data
    exclusive = set(view.nodes_of(ancestors[add.branch] & ~ancestors[add.shortcut] & ~ancestors[add.source]))
    modules = frozenset(
        name
        for node in exclusive
        for name in view.module_stack.get(node, ())[depth:]
    )
    entering = {
        i
        for node in exclusive
        for i in list(node.all_input_nodes)
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
    if any(entry in view.module_stack.get(n, ()) and n not in exclusive for n in view.nodes):
        return BranchEntry(None, modules, f"{entry} also runs off the branch")
    if add.slot_call is not None and entry in view.module_stack.get(add.slot_call, ()):
        return BranchEntry(None, modules, f"the drop-path slot sits inside {entry}")
    return BranchEntry(entry, modules)


@dataclass
class Selection:
    """The residual adds to change, and those left alone with the reason."""

    chosen: list[ResidualAdd]
    left_alone: list[LeftAlone]

    @property
    def blocks(self) -> list[str]:
        """The blocks of the chosen adds, in execution order."""
        return list(dict.fromkeys(a.block for a in self.chosen))


def select(view: GraphView, adds: list[ResidualAdd]) -> Selection:
    """Pick the residual adds to change: those on drop-path slots if the model has any, else hookable ones."""
    left_alone: list[LeftAlone] = []
    if any(a.slot is not None for a in adds):
        branch_slot_calls: dict[str, set[fx.Node]] = {}
        for a in adds:
            if a.slot is not None:
                assert a.slot_call is not None  # a slot is only ever recorded with the node that calls it
                branch_slot_calls.setdefault(a.slot, set()).add(a.slot_call)
        off_branch = {
            slot for node, slot in view.slot_calls.items() if node not in branch_slot_calls.get(slot, set())
        }
        chosen = []
        for a in adds:
            if a.slot is None:
                left_alone.append(LeftAlone(a.block, "no drop-path slot on this branch; its library never drops it"))
            elif a.slot in off_branch:
                left_alone.append(LeftAlone(a.block, f"slot {a.slot} is also called off the residual branch"))
            else:
                chosen.append(a)
        if chosen:
            return Selection(chosen, left_alone)
        # Every slot is also called off its branch (HF CvT calls its layer's one drop path on the
        # attention branch and on the layer output, shortcut included): filling a slot would drop
        # more than a residual branch, so the branches are hooked like those of a model without slots.
        left_alone = []
        adds = [dataclasses.replace(a, slot=None, slot_call=None) for a in adds]
    hookable = _hookable_producers(view, adds)
    chosen = []
    for a in adds:
        if a.producer is None:
            left_alone.append(LeftAlone(a.block, "branch is computed inline in the block; no module to hook"))
        elif a.producer not in hookable:
            left_alone.append(LeftAlone(a.block, f"{a.producer} output is also used off the residual branch"))
        else:
            chosen.append(a)
    return Selection(chosen, left_alone)


def _hookable_producers(view: GraphView, adds: list[ResidualAdd]) -> set[str]:
    """Producers whose every output leaving the module is the branch operand of a residual add, and is
    used nowhere else.

    A hook drops the whole output, so an output that also feeds the block elsewhere (HF SAM's two-way
    layer: ``layer_norm1``'s output is both added to a positional embedding, which looks like a residual
    add, and the token stream itself) would drop more than a branch. Two uses that take a part of the
    output are allowed: another element of a tuple (the hook drops the first) and another channel slice
    (smp DPN: ``resid = x_s1 + out[:, :c]``, ``dense = cat(x_s2, out[:, c:])``; timm RexNet's own drop
    path covers the channels its block concatenates in the same way).
    """
    branch_nodes: dict[str, set[fx.Node]] = {}
    on_branch: dict[str, set[fx.Node]] = {}
    for a in adds:
        if a.producer is not None:
            branch_nodes.setdefault(a.producer, set()).add(a.producer_output)
            on_branch.setdefault(a.producer, set()).update(_looked_through(view, a))
    hookable = set()
    for producer, branches in branch_nodes.items():
        outputs = set()
        for node, stack in view.module_stack.items():
            if producer in stack and any(producer not in view.module_stack.get(u, ()) for u in node.users):
                outputs.add(node)
        if outputs <= branches and all(
            user in on_branch[producer] or _takes_a_part(user) for node in outputs for user in node.users
        ):
            hookable.add(producer)
    return hookable


def _looked_through(view: GraphView, add: ResidualAdd) -> set[fx.Node]:
    """The nodes from the producer's output to the add, both included (see :func:`_producer`)."""
    nodes = {add.node, add.branch}
    current = add.branch
    for _ in range(MAX_SCALE_HOPS + 1):
        if current is add.producer_output:
            break
        inputs = [i for i in list(current.all_input_nodes) if i in view.tensor_nodes and i in view.data]
        if len(inputs) != 1:
            break
        current = inputs[0]
        nodes.add(current)
    return nodes


def _takes_a_part(node: fx.Node) -> bool:
    """Indexing that takes a part of a value: a tuple element or a slice (not a reshape of all of it)."""
    if node.op == "call_function":
        return node.target is operator.getitem or str(node.target) in {"aten.slice.Tensor", "aten.narrow.default"}
    return node.op == "call_method" and node.target == "narrow"
