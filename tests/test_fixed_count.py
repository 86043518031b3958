"""Mode 'fixed_count': DINOv2's efficient stochastic depth on any model pathsurgeon can gather.

Ground truth: ``drop_add_residual_stochastic_depth`` of facebookresearch/dinov2 (dinov2/layers/block.py),
written here from its formula — ``k = max(int(b * (1 - p)), 1)`` rows from ``torch.randperm(b)``, the
branch on those rows, ``torch.index_add(x, 0, rows, branch, alpha=b / k)`` — and put on a timm ViT's blocks.
"""

from __future__ import annotations

import copy
import types

import pytest
import timm
import torch
from conftest import supported_from
from torch import nn

import pathsurgeon
from pathsurgeon.droppath import DropPath, fixed_count

BATCH = 8
VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    with torch.no_grad():  # real layer scales: timm may start them near zero
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(0.5)
    return model


def _inputs() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def drop_add_residual_stochastic_depth(x: torch.Tensor, residual_func, sample_drop_ratio: float) -> torch.Tensor:
    """DINOv2's function, from its formula."""
    b = x.shape[0]
    count = max(int(b * (1 - sample_drop_ratio)), 1)
    rows = torch.randperm(b, device=x.device)[:count]
    residual = residual_func(x[rows])
    added = torch.index_add(x.flatten(1), 0, rows, residual.flatten(1).to(x.dtype), alpha=b / count)
    return added.view_as(x)


def _dinov2_blocks(model: nn.Module, rate: float) -> nn.Module:
    """A copy of ``model`` whose blocks train as DINOv2's Block does with ``sample_drop_ratio=rate``."""
    reference = copy.deepcopy(model)

    def forward(self, x):
        if not self.training:
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        x = drop_add_residual_stochastic_depth(x, lambda t: self.ls1(self.attn(self.norm1(t))), rate)
        return drop_add_residual_stochastic_depth(x, lambda t: self.ls2(self.mlp(self.norm2(t))), rate)

    for block in reference.blocks:
        block.forward = types.MethodType(forward, block)
    return reference


def _step(model: nn.Module, x: torch.Tensor, seed: int):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(expected, actual, atol=1e-5):
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=1e-4)
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rate", [0.25, 0.6])
def test_fixed_count_is_dinov2_efficient_stochastic_depth(rate):
    model = _vit()
    x = _inputs()
    reference = _dinov2_blocks(model, rate)
    report = pathsurgeon.add(model, rate, schedule="uniform", mode="fixed_count", example_inputs=x[:2])
    assert report.fallbacks == [] and all(b.mode == "fixed_count" and b.entry for b in report.branches)
    rows: list[int] = []
    for b in report.branches:
        model.get_submodule(b.entry).register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    for seed in range(3):
        _assert_same(_step(reference, x, seed), _step(model, x, seed))
    assert set(rows) == {fixed_count(BATCH, rate)}  # every branch call: exactly k rows, every step
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.slow
@supported_from("torch", "2.14", "dynamo refuses the fixed-count rows op (Dynamic shape operator; seen on 2.4 and 2.9)")
def test_fixed_count_compiles_fullgraph_once_for_every_step_and_rate():
    """One graph, no break, no recompile while the rate moves (0 included); compiled equals eager."""
    import torch._dynamo

    model = _vit()
    x = _inputs()
    pathsurgeon.add(model, 0.3, mode="fixed_count", example_inputs=x[:2])
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, rate in enumerate((0.3, 0.3, 0.5, 0.1, 0.0, 0.7)):
            pathsurgeon.set_rate(model, rate)
            pathsurgeon.set_rate(twin, rate)
            _assert_same(_step(twin, x, step), _step(compiled, x, step))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_fixed_count_without_a_gather_draws_the_same_rows_and_computes_them_all():
    """The fallback (a branch that cannot be gathered): every row computed, the same k rows kept."""
    x = torch.randn(BATCH, 5)
    drop = DropPath(0.4, mode="fixed_count").train()
    torch.manual_seed(0)
    out = drop(x)
    torch.manual_seed(0)
    rows = torch.randperm(BATCH)[: fixed_count(BATCH, 0.4)]
    expected = torch.zeros_like(x).index_add(0, rows, x[rows], alpha=BATCH / len(rows))
    torch.testing.assert_close(out, expected)
    assert int((out.abs().sum(1) > 0).sum()) == fixed_count(BATCH, 0.4) == 4
    assert torch.equal(drop.eval()(x), x)
