"""The finder on small hand-built graphs: pure graph analysis, no library model involved."""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from pathsurgeon.finder import GraphView, find_residual_adds


def residual_adds(module: nn.Module, slots: set[str] = frozenset()):
    graph_module = fx.symbolic_trace(module)
    view = GraphView.from_graph_module(graph_module, lambda target: target if target in slots else None)
    return find_residual_adds(view)


class PreNormBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.drop_path = nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.norm(x)))


def test_plain_residual_with_slot():
    [add] = residual_adds(PreNormBlock(), slots={"drop_path"})
    assert add.block == ""
    assert add.slot == "drop_path"
    assert add.shortcut.op == "placeholder"


class Nested(nn.Module):
    """A residual whose branch holds two residual blocks of its own."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(PreNormBlock(), PreNormBlock())
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.proj(self.inner(x))


def test_nested_residuals_each_found_in_their_own_block():
    adds = residual_adds(Nested())
    assert [a.block for a in adds] == ["inner.0", "inner.1", ""]
    assert adds[-1].producer == "proj"
    assert [a.producer for a in adds[:2]] == ["inner.0.drop_path", "inner.1.drop_path"]


class Bottleneck(nn.Module):
    """ResNet-style block with a projection shortcut (conv + norm) on the skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        shortcut = self.downsample(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y += shortcut
        return torch.relu(y)


def test_projection_shortcut_is_the_skip():
    [add] = residual_adds(Bottleneck())
    assert add.producer == "bn2"
    assert add.shortcut.target == "downsample.1"


class SharedMlp(nn.Module):
    """One module called on two residual branches (as HF and timm Mixer/CaiT do with drop path)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.fc1(x))
        return x + self.drop_path(self.fc2(x))


def test_shared_slot_found_on_both_branches():
    adds = residual_adds(SharedMlp(), slots={"drop_path"})
    assert [a.slot for a in adds] == ["drop_path", "drop_path"]
    assert adds[0].slot_call is not adds[1].slot_call


class NotResidual(nn.Module):
    """Adds that are not residual: a position embedding, a bias, tanh-GELU, an attention mask."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.bias = nn.Parameter(torch.zeros(8))
        self.qk = nn.Linear(8, 16)
        self.mask = nn.Parameter(torch.zeros(4, 4))

    def forward(self, x):
        x = x + self.pos_embed
        x = x + self.bias
        x = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
        q, k = self.qk(x).chunk(2, dim=-1)
        attn = q @ k.transpose(-1, -2)
        attn = attn + self.mask
        return attn.softmax(-1) @ x


def test_no_residual_adds_in_non_residual_arithmetic():
    assert residual_adds(NotResidual()) == []


class ShapeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        n = self.fc(x).shape[1] + x.shape[1]  # ints derived from tensors are not tensors
        return x.new_zeros(n)


def test_shape_arithmetic_is_not_a_residual():
    assert residual_adds(ShapeArithmetic()) == []


class ScaledSlot(nn.Module):
    """NFNet-style: the slot sits behind a scale by a constant and a parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path = nn.Identity()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        y = self.drop_path(self.fc(x))
        y = y * self.gain
        return y * 0.2 + x


def test_slot_found_behind_scaling():
    [add] = residual_adds(ScaledSlot(), slots={"drop_path"})
    assert add.slot == "drop_path"


class StreamAddedTo(nn.Module):
    """HF SAM's two-way layer in small: the norm's output is the token stream, and one add adds it to a
    tensor it was computed from (``queries + query_point_embedding``), which looks like a residual add."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        stream = self.norm(x + self.proj(x))
        query = stream + x
        return stream + self.mlp(query)


class ChannelSplit(nn.Module):
    """smp DPN's block in small: one conv output, a channel slice added to the input, the rest concatenated."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        out = self.conv(x)
        return torch.cat([x + out[:, :4], out[:, 4:]], dim=1)


def _selection(module: nn.Module):
    from pathsurgeon.finder import select

    view = GraphView.from_graph_module(fx.symbolic_trace(module))
    return select(view, find_residual_adds(view))


def test_a_module_whose_output_is_used_off_the_branch_is_not_hooked():
    selection = _selection(StreamAddedTo())
    assert [a.producer for a in selection.chosen] == ["proj", "mlp"]
    assert [(k.block, k.reason) for k in selection.left_alone] == [
        ("", "norm output is also used off the residual branch")
    ]


def test_a_channel_slice_taken_elsewhere_still_lets_the_branch_be_hooked():
    [add] = _selection(ChannelSplit()).chosen
    assert add.producer == "conv"
