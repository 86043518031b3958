"""Modes 'skip' and 'batch': the same drop decisions as the libraries' own stochastic depth, less compute.

Ground truth: timm's native ``drop_path_rate`` model for per-sample semantics (mode 'skip' draws the
same numbers as timm's DropPath when the branch itself draws none), and torchvision's
``StochasticDepth(mode="batch")`` for one draw per mini-batch.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from conftest import module_layout, pathsurgeon_leftovers, supported_from
from torch import nn
from torchvision.ops import StochasticDepth

import pathsurgeon

RATE = 0.5
BATCH = 8

MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, 32),
    "convnext": ("convnext_atto", {}, 32),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "img_size": 32, "window_size": 4},
        32,
    ),
    "mixer": ("mixer_s32_224", {"img_size": 64}, 64),
}


def _build(name: str, overrides: dict, rate: float) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, drop_path_rate=rate, **overrides)


def _pair(key: str, rate: float = RATE, **smaller):
    name, overrides, size = MODELS[key]
    overrides = {**overrides, **smaller}
    native = _build(name, overrides, rate)
    model = _build(name, overrides, 0.0)
    model.load_state_dict(native.state_dict())
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    return native, model, x


def _train_step(model: nn.Module, x: torch.Tensor, seed: int):
    """Training-mode output and parameter gradients (None counted as zero) from a fixed RNG state."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    grads = {
        n.removeprefix("_orig_mod."): (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
        for n, p in model.named_parameters()
    }
    return out.detach(), grads


def _assert_same_step(expected, actual, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=1e-4)
    assert expected[1].keys() == actual[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], atol=atol, rtol=1e-4, msg=name)


def _rows_seen(model: nn.Module, entries: list[str]) -> dict[str, list[int]]:
    """Batch sizes each branch entry receives, per call (after pathsurgeon's gather)."""
    seen: dict[str, list[int]] = {name: [] for name in entries}
    for name in entries:
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, n=name: seen[n].append(args[0].shape[0])
        )
    return seen


@pytest.mark.parametrize("key", sorted(MODELS))
def test_skip_mode_equals_timm_native_outputs_and_gradients(key):
    native, model, x = _pair(key)
    report = pathsurgeon.add(model, RATE, mode="skip", example_inputs=x[:2])
    assert report.fallbacks == []
    assert all(b.mode == "skip" and b.entry for b in report.branches)
    entries = [b.entry for b in report.branches if b.rate > 0]
    seen = _rows_seen(model, entries)
    for seed in (0, 1, 2):
        _assert_same_step(_train_step(native, x, seed), _train_step(model, x, seed))
    fewer = sum(rows < BATCH for name in entries for rows in seen[name])
    assert fewer > len(entries)  # at rate up to 0.5 most branch calls ran on fewer rows than the batch
    assert max(max(rows) for rows in seen.values()) <= BATCH


def _torchvision_batch_reference(native: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the rate-0 model whose slots hold torchvision's per-batch StochasticDepth, at timm's rates."""
    reference = copy.deepcopy(model)
    for name, module in native.named_modules():
        if type(module).__name__ == "DropPath":
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, StochasticDepth(module.drop_prob, mode="batch"))
    return reference


@pytest.mark.parametrize("key", ["vit", "convnext"])
def test_batch_mode_equals_torchvision_stochastic_depth_and_skips_dropped_branches(key):
    native, model, x = _pair(key)
    reference = _torchvision_batch_reference(native, model)
    report = pathsurgeon.add(model, RATE, mode="batch", example_inputs=x[:2])
    assert report.fallbacks == []
    entries = [b.entry for b in report.branches if b.rate > 0]
    seen = _rows_seen(model, entries)
    for seed in range(4):
        _assert_same_step(_train_step(reference, x, seed), _train_step(model, x, seed))
    calls = [rows for name in entries for rows in seen[name]]
    assert set(calls) <= {0, BATCH}  # a branch runs on the whole batch, or (dropped) on nothing
    assert 0 in calls and BATCH in calls


def test_batch_norm_branches_fall_back_and_say_why():
    native, model = _build("resnet18", {}, RATE), _build("resnet18", {}, 0.0)
    model.load_state_dict(native.state_dict())
    x = torch.randn(4, 3, 32, 32)
    report = pathsurgeon.add(model, RATE, mode="skip", example_inputs=x[:2])
    assert len(report.fallbacks) == len(report.branches) == 8
    assert all("BatchNorm" in f.reason and "kept samples only" in f.reason for f in report.fallbacks)
    assert all(b.mode == "sample" and b.entry is None for b in report.branches)
    assert "compute in full" in report.summary()
    _assert_same_step(_train_step(native, x, 0), _train_step(model, x, 0))  # timm's per-sample semantics


def test_cross_sample_branch_is_detected_by_the_check():
    class BatchMix(nn.Module):  # a branch whose output for one sample depends on the others
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x - x.mean(0, keepdim=True))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.mlp = BatchMix(), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
            self.drop_path1, self.drop_path2 = nn.Identity(), nn.Identity()

        def forward(self, x):
            x = x + self.drop_path1(self.mix(x))
            return x + self.drop_path2(self.mlp(x))

    model = nn.Sequential(Block(), Block())
    report = pathsurgeon.add(model, 0.3, schedule="uniform", mode="skip", example_inputs=torch.randn(4, 8))
    by_target = {f.target: f.reason for f in report.fallbacks}
    assert set(by_target) == {"0.drop_path1", "1.drop_path1"}
    assert all("changes the block's output" in reason for reason in by_target.values())
    assert {b.target: b.mode for b in report.branches}["0.drop_path2"] == "skip"


def test_skip_check_runs_each_block_five_times_when_every_branch_agrees():
    """Issue 20, item 4: the skip check runs on the whole model (three forwards: in full, on kept rows,
    with none kept) and only falls back to re-running blocks one by one where that fails; with the
    eval check's two forwards (untouched and surgered, on one made-up sample), five calls per block."""
    _, model, _ = _pair("vit", 0.0)
    calls = dict.fromkeys(range(len(model.blocks)), 0)

    def count(index, module, args):
        if type(args[0]) is torch.Tensor:  # real forwards, not the capture's fake tensors
            calls[index] += 1

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(functools.partial(count, index))
    report = pathsurgeon.add(model, RATE, mode="skip")  # made-up inputs: a batch of 2
    assert not report.fallbacks and all(b.mode == "skip" for b in report.branches)
    assert set(calls.values()) == {5}


def test_eval_is_identity_and_strip_restores_the_model_in_every_mode():
    native, model, x = _pair("vit")
    layout, keys = module_layout(model), list(model.state_dict())
    model.eval()
    with torch.no_grad():
        before = model(x)
    for mode in ("skip", "batch", "sample"):
        pathsurgeon.add(model, RATE, mode=mode, example_inputs=x[:2])
        _train_step(model, x, 0)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), before)
        pathsurgeon.strip(model)
        assert pathsurgeon_leftovers(model) == []
        assert module_layout(model) == layout and list(model.state_dict()) == keys


def test_bad_mode_is_refused_and_changes_nothing():
    _, model, x = _pair("vit")
    layout = module_layout(model)
    with pytest.raises(pathsurgeon.InvalidModeError, match="mode must be one of"):
        pathsurgeon.add(model, RATE, mode="fast")
    assert module_layout(model) == layout and not pathsurgeon.is_surgered(model)


def test_set_rate_deepcopy_and_gradient_checkpointing_keep_skip_mode_exact():
    native, model, x = _pair("vit", rate=0.3)
    pathsurgeon.add(model, 0.1, mode="skip", example_inputs=x[:2])
    branches = pathsurgeon.set_rate(model, 0.3)
    assert all(b.mode == "skip" for b in branches)
    expected = _train_step(native, x, 5)
    _assert_same_step(expected, _train_step(model, x, 5))
    ema = copy.deepcopy(model)  # what timm's ModelEmaV3 does
    _assert_same_step(expected, _train_step(ema, x, 5))
    model.set_grad_checkpointing(True)
    native.set_grad_checkpointing(True)
    _assert_same_step(expected, _train_step(model, x, 5))
    pathsurgeon.strip(ema)
    assert pathsurgeon_leftovers(ema) == [] and pathsurgeon.is_surgered(model)


def _bf16_step(model: nn.Module, x: torch.Tensor, seed: int, autocast: bool = True):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    return out, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_autocast_sample_mode_is_timm_bit_for_bit():
    native, model, x = _pair("vit")
    pathsurgeon.add(model, RATE, example_inputs=x[:2])
    (theirs, _), (ours, _) = _bf16_step(native, x, 3), _bf16_step(model, x, 3)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_bf16_autocast_skip_mode_trains_as_sample_mode():
    """Under autocast, skip draws the same masks as sample and computes the same rows (up to bf16 rounding)."""
    _, sample, x = _pair("vit")
    skip = copy.deepcopy(sample)
    pathsurgeon.add(sample, RATE, example_inputs=x[:2])
    pathsurgeon.add(skip, RATE, mode="skip", example_inputs=x[:2])
    for seed in (3, 4):
        (expected, expected_grads), (out, grads) = _bf16_step(sample, x, seed), _bf16_step(skip, x, seed)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=2e-2, rtol=5e-2)


def test_bf16_autocast_batch_mode_makes_the_same_draws_as_in_float32():
    """One draw per branch per batch comes from the CPU generator: autocast changes the numbers, not the draws."""
    _, model, x = _pair("vit")
    pathsurgeon.add(model, RATE, mode="batch", example_inputs=x[:2])
    for seed in (3, 4, 5):
        full, _ = _bf16_step(model, x, seed, autocast=False)
        half, _ = _bf16_step(model, x, seed)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)


def test_failure_during_the_subset_check_leaves_the_model_as_it_was(monkeypatch):
    from pathsurgeon import surgery

    _, model, x = _pair("vit")
    layout, keys = module_layout(model), list(model.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(surgery, "check_gathers", broken)
    with pytest.raises(RuntimeError, match="injected"):
        pathsurgeon.add(model, RATE, mode="skip", example_inputs=x[:2])
    assert pathsurgeon_leftovers(model) == []
    assert module_layout(model) == layout and list(model.state_dict()) == keys


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sample", "skip", "batch", pytest.param("fixed_count", marks=supported_from(
    "torch", "2.14", "dynamo refuses the fixed-count rows op (Dynamic shape operator; seen on 2.4 and 2.9)"))])
def test_torch_compile_matches_eager(mode):
    """Inductor with ``fallback_random`` draws eager's random numbers, so compiled and eager steps agree.

    Modes 'sample' and 'fixed_count' compile with ``fullgraph=True``: pathsurgeon adds no graph break
    to a ViT (fixed_count's kept count is an unbacked size inductor generates code for).
    """
    import torch._dynamo
    import torch._inductor.config

    native, model, x = _pair("vit", depth=2)  # two blocks (four branches) prove what four blocks did
    pathsurgeon.add(model, RATE, mode=mode, example_inputs=x[:2])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=mode in ("sample", "fixed_count"))
    with torch._inductor.config.patch(fallback_random=True):
        for seed in (0, 1):
            _assert_same_step(_train_step(model, x, seed), _train_step(compiled, x, seed))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
