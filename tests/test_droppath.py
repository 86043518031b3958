"""DropPath: the same math and the same RNG consumption as timm's drop_path, checked as properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import drop_path as timm_drop_path

import pathsurgeon
from pathsurgeon import DropPath, drop_path

rates = st.floats(min_value=0.0, max_value=0.95, allow_nan=False, exclude_max=False)
shapes = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(rate=rates, shape=shapes)
def test_identity_in_eval(rate, shape):
    x = torch.randn(shape)
    module = DropPath(rate).eval()
    assert module(x) is x


@settings(max_examples=40, deadline=None)
@given(rate=rates, shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_same_values_and_rng_order_as_timm(rate, shape, seed):
    x = torch.randn(shape)
    torch.manual_seed(seed)
    expected = timm_drop_path(x, rate, training=True)
    after_timm = torch.rand(1)
    torch.manual_seed(seed)
    got = DropPath(rate).train()(x)
    after_ours = torch.rand(1)
    assert torch.equal(got, expected)
    assert torch.equal(after_ours, after_timm)  # the generator advanced by the same amount


@settings(max_examples=40, deadline=None)
@given(rate=rates, shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_uniform_floor_draw_is_hugging_faces(rate, shape, seed):
    """The DropPath that fills a Hugging Face slot draws as HF's own XxxDropPath does."""
    transformers = pytest.importorskip("transformers")
    x = torch.randn(shape)
    torch.manual_seed(seed)
    expected = transformers.models.beit.modeling_beit.BeitDropPath(rate).train()(x)
    after_hf = torch.rand(1)
    torch.manual_seed(seed)
    got = DropPath(rate, draw="uniform_floor").train()(x)
    assert torch.equal(got, expected) and torch.equal(torch.rand(1), after_hf)


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(min_value=0.05, max_value=0.95), batch_axis=st.integers(0, 2), seed=st.integers(0, 10**6))
def test_each_sample_kept_or_dropped_whole(rate, batch_axis, seed):
    torch.manual_seed(seed)
    x = torch.rand(6, 5, 4) + 1.0  # strictly positive, so a zero means dropped
    out = DropPath(rate, batch_axis=batch_axis).train()(x)
    keep = 1.0 - rate
    for sample in range(x.shape[batch_axis]):
        ratio = (out.select(batch_axis, sample) / x.select(batch_axis, sample)).flatten()
        assert torch.allclose(ratio, torch.zeros_like(ratio)) or torch.allclose(
            ratio, torch.full_like(ratio, 1.0 / keep)
        )


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_drop_frequency_and_mean_within_statistical_bounds(rate):
    torch.manual_seed(0)
    n = 20000
    out = drop_path(torch.ones(n, 3), rate, training=True)
    dropped = (out[:, 0] == 0).double().mean().item()
    bound = 5 * math.sqrt(rate * (1 - rate) / n)  # five standard deviations of a binomial proportion
    assert abs(dropped - rate) < bound
    # scaling by 1/keep keeps the expectation: mean ≈ 1 within five standard errors
    std_error = math.sqrt(rate / (1 - rate) / n)
    assert abs(out.mean().item() - 1.0) < 5 * std_error


def test_rate_zero_and_unscaled():
    x = torch.randn(4, 3)
    assert drop_path(x, 0.0, training=True) is x
    torch.manual_seed(3)
    out = drop_path(torch.ones(1000, 1), 0.5, training=True, scale_by_keep=False)
    assert set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.1", None, True])
def test_bad_rates_are_rejected(bad):
    with pytest.raises(pathsurgeon.InvalidRateError, match="rate"):
        DropPath(bad)


def test_repr_and_timm_alias():
    module = DropPath(0.25, batch_axis=1)
    assert "rate=0.25" in repr(module) and "batch_axis=1" in repr(module)
    module.drop_prob = 0.5  # code written for timm's DropPath sets drop_prob
    assert module.rate == 0.5
    assert list(module.state_dict()) == []


@settings(max_examples=40, deadline=None)
@given(rate=rates, batch=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["skip", "batch"]))
def test_gather_then_scatter_equals_masking_the_full_branch(rate, batch, seed, mode):
    """A Gather on a per-sample branch f plus the DropPath at its end: f only on kept rows, same result."""
    from pathsurgeon.skipping import Gather

    weight = torch.randn(3, 3)
    x = torch.randn(batch, 3)
    entry = torch.nn.Identity()
    drop = DropPath(rate, mode=mode).train()
    entry.register_forward_pre_hook(Gather(drop))
    rows: list[int] = []
    entry.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    torch.manual_seed(seed)
    out = x + drop(torch.tanh(entry(x) @ weight))
    # the mask that was used, read back from the output: a dropped row is exactly x
    kept = ~(out == x).all(1) if rate > 0 else torch.ones(batch, dtype=torch.bool)
    scale = 1.0 / (1.0 - rate)
    expected = x + torch.tanh(x @ weight) * kept[:, None] * scale
    torch.testing.assert_close(out, expected)
    if mode == "batch":
        assert bool(kept.all()) or not bool(kept.any())  # all or nothing
    if rate > 0:
        assert rows == [int(kept.sum())]  # the branch ran on the kept rows only
    if mode == "skip":  # the draw is timm's: same kept rows as drop_path under the same seed
        torch.manual_seed(seed)
        timm_mask = timm_drop_path(torch.ones(batch, 1), rate, training=True) != 0
        assert torch.equal(kept, timm_mask.flatten())


@settings(max_examples=40, deadline=None)
@given(rate=rates, shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_compiled_mask_op_draws_what_timm_draws(rate, shape, seed):
    """The op a compiled DropPath calls: timm's values and RNG consumption, the rate read from a tensor."""
    from pathsurgeon.droppath import drop_path_mask

    x = torch.randn(shape)
    torch.manual_seed(seed)
    expected = timm_drop_path(x, rate, training=True)
    after_timm = torch.rand(1)
    torch.manual_seed(seed)
    mask = drop_path_mask(torch.tensor(rate, dtype=torch.float64), [shape[0]] + [1] * (len(shape) - 1),
                          x.dtype, x.device, True)
    after_ours = torch.rand(1)
    assert torch.equal(x * mask, expected)
    assert torch.equal(after_ours, after_timm)


def test_rate_is_mirrored_in_a_tensor_outside_the_state_dict():
    module = DropPath(0.1)
    module.rate = 0.3
    assert float(module._rate_tensor) == 0.3 and module._rate_tensor.dtype == torch.float64
    module.drop_prob = 0.2
    assert float(module._rate_tensor) == 0.2
    assert list(module.state_dict()) == [] and list(module.buffers()) == []
    with pytest.raises(pathsurgeon.InvalidRateError):
        module.rate = 1.0
    assert module.rate == 0.2 and float(module._rate_tensor) == 0.2  # a refused rate changes nothing
