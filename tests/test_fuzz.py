"""Random residual networks: on every one, find/add/verify/strip keep their invariants.

Hypothesis draws networks from a small grammar — residual blocks with a drop-path slot (some with a
projection shortcut, a scale after the slot, two residuals in one block, residuals nested inside a
branch), and things that are not residual (plain layers, bias and position-embedding adds). Each
network is built twice: *native*, with timm's ``DropPath(rate)`` in every slot, the way a library
built with ``drop_path_rate`` has it; and *bare*, with ``nn.Identity`` slots and the same weights,
which pathsurgeon then surgers at a uniform rate. The invariants: classes, ``state_dict`` keys and
parameter objects unchanged; eval outputs bitwise equal after add and after strip; training outputs
equal to the native network's under one seed (the same masks drawn, in the same order); a failure
injected anywhere in ``add`` leaves the network exactly as it was.

``HYPOTHESIS_PROFILE=fuzz`` runs many more examples than the suite's deterministic default.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from conftest import module_layout, pathsurgeon_leftovers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers import DropPath as TimmDropPath
from torch import nn

import pathsurgeon
from pathsurgeon import changes

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DIM, TOKENS, BATCH = 8, 3, 4


def _slot(rate: float) -> nn.Module:
    return TimmDropPath(rate) if rate > 0 else nn.Identity()


class Residual(nn.Module):
    """``shortcut(x) + [scale *] drop_path(fc2(act(fc1(norm(x)))))``."""

    def __init__(self, rate: float, projection: bool, scaled: bool):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc1, self.act, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM)
        self.drop_path = _slot(rate)
        self.shortcut = nn.Linear(DIM, DIM) if projection else nn.Identity()
        self.gamma = nn.Parameter(torch.full((DIM,), 0.5)) if scaled else None

    def forward(self, x):
        branch = self.drop_path(self.fc2(self.act(self.fc1(self.norm(x)))))
        if self.gamma is not None:
            branch = branch * self.gamma  # a scale after the slot (NFNet's skip gain, res-scale)
        return self.shortcut(x) + branch


class TwoResiduals(nn.Module):
    """A transformer-style block: two residual adds, each with its own slot."""

    def __init__(self, rate: float):
        super().__init__()
        self.norm1, self.mix = nn.LayerNorm(DIM), nn.Linear(DIM, DIM)
        self.norm2, self.mlp = nn.LayerNorm(DIM), nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.drop_path1, self.drop_path2 = _slot(rate), _slot(rate)

    def forward(self, x):
        x = x + self.drop_path1(self.mix(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Nested(nn.Module):
    """An outer residual whose branch holds residual blocks of its own."""

    def __init__(self, rate: float, inner: list[nn.Module]):
        super().__init__()
        self.inner = nn.Sequential(*inner)
        self.proj = nn.Linear(DIM, DIM)
        self.drop_path = _slot(rate)

    def forward(self, x):
        return x + self.drop_path(self.proj(self.inner(x)))


class Plain(nn.Module):
    """Not residual: a layer, optionally with a bias-like parameter added (no shared source)."""

    def __init__(self, bias_add: bool):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.extra = nn.Parameter(torch.zeros(DIM)) if bias_add else None

    def forward(self, x):
        x = torch.tanh(self.fc(x))
        return x + self.extra if self.extra is not None else x


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], position_embedding: bool):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02) if position_embedding else None
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(DIM, 2)

    def forward(self, x):
        x = self.embed(x)
        if self.pos is not None:
            x = x + self.pos  # not residual: the operands share no source
        return self.head(self.blocks(x).mean(1))


# A network is described as data, so that one description builds both the native and the bare network.
leaf = st.one_of(
    st.tuples(st.just("residual"), st.booleans(), st.booleans()),
    st.tuples(st.just("two")),
    st.tuples(st.just("plain"), st.booleans()),
)
block = st.recursive(leaf, lambda inner: st.tuples(st.just("nested"), st.lists(inner, min_size=1, max_size=3)),
                     max_leaves=4)
network = st.tuples(st.lists(block, min_size=1, max_size=5), st.booleans())


def build(description, rate: float) -> Net:
    def make(spec) -> nn.Module:
        kind = spec[0]
        if kind == "residual":
            return Residual(rate, projection=spec[1], scaled=spec[2])
        if kind == "two":
            return TwoResiduals(rate)
        if kind == "plain":
            return Plain(bias_add=spec[1])
        return Nested(rate, [make(s) for s in spec[1]])

    blocks, position_embedding = description
    return Net([make(b) for b in blocks], position_embedding)


def count_slots(description) -> int:
    def count(spec) -> int:
        kind = spec[0]
        if kind == "residual":
            return 1
        if kind == "two":
            return 2
        if kind == "plain":
            return 0
        return 1 + sum(count(s) for s in spec[1])

    return sum(count(b) for b in description[0])


def pair(description, rate: float) -> tuple[Net, Net]:
    torch.manual_seed(0)
    native = build(description, rate)
    bare = build(description, 0.0)
    bare.load_state_dict(native.state_dict())
    return native.eval(), bare.eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@given(description=network, rate=st.sampled_from([0.25, 0.5, 0.9]))
def test_surgery_keeps_its_invariants_and_draws_timms_masks(description, rate):
    native, model = pair(description, rate)
    x = inputs()
    layout, keys = module_layout(model), list(model.state_dict())
    parameters = [id(p) for p in model.parameters()]
    with torch.no_grad():
        before = model(x)

    slots = count_slots(description)
    if slots == 0:
        try:
            pathsurgeon.add(model, rate, schedule="uniform", example_inputs=x)
        except pathsurgeon.NoBranchesError:
            assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []
            return
        raise AssertionError("a network without residual branches was surgered")

    report = pathsurgeon.add(model, rate, schedule="uniform", example_inputs=x)
    assert len({b.target for b in report.branches}) == slots  # every slot, once; no add that is not residual
    assert {b.mechanism for b in report.branches} == {"slot"}
    assert report.max_abs_diff == 0.0
    assert type(model) is Net and list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == parameters
    with torch.no_grad():
        assert torch.equal(model(x), before)

    for seed in (0, 1):  # the same masks as timm's DropPath, drawn in the same order
        native.train()
        model.train()
        torch.manual_seed(seed)
        expected = native(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)

    pathsurgeon.strip(model)
    model.eval()
    assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), before)


@given(description=network, failure_at=st.integers(min_value=1, max_value=12))
@settings(max_examples=15)
def test_a_failure_anywhere_in_add_leaves_the_network_as_it_was(description, failure_at):
    _, model = pair(description, 0.3)
    x = inputs()
    layout = module_layout(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    real, calls = changes.Change.install, {"n": 0}

    def failing(change):
        calls["n"] += 1
        real(change)  # the change lands, then the failure
        if calls["n"] == failure_at:
            raise RuntimeError("injected")

    with mock.patch.object(changes.Change, "install", failing):
        try:
            pathsurgeon.add(model, 0.3, schedule="uniform", mode="skip", example_inputs=x)
        except (RuntimeError, pathsurgeon.NoBranchesError):
            pass
        else:
            assert calls["n"] < failure_at  # fewer changes than the failure point: add completed
            pathsurgeon.strip(model)
    assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
