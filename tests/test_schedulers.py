"""RateScheduler: at step k the model is what set_rate(model, fn(k)) makes it, and timm's model at fn(k).

Ground truth: ``pathsurgeon.set_rate`` on a twin model (so a change to how rates are computed over depth
moves both sides), timm's own model built with ``drop_path_rate=fn(k)`` for training outputs, and the
definitions the named shapes cite (numpy's linspace for early stochastic depth).
"""

from __future__ import annotations

import copy

import numpy
import pytest
import timm
import torch
from conftest import assert_same_training_output
from torch import nn

import pathsurgeon
from pathsurgeon import DropPath, RateScheduler

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4})
CONVNEXT = ("convnext_atto", {})  # stage-split schedule: rates over depth are not one linspace over blocks
SHALLOW_VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2})  # compiles faster


def _build(spec, rate: float = 0.0) -> nn.Module:
    name, overrides = spec
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, drop_path_rate=rate, **overrides)


def _inputs(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _surgered(spec=VIT, rate: float = 0.1, **kwargs) -> nn.Module:
    model = _build(spec)
    pathsurgeon.add(model, rate, example_inputs=_inputs(2), **kwargs)
    return model


def _rates(model: nn.Module) -> list[tuple[str, float]]:
    """Every inserted DropPath's rate, as the modules hold it, and the record's view of every branch."""
    modules = [(name, m.rate) for name, m in model.named_modules() if isinstance(m, DropPath)]
    return modules + [(b.target, b.rate) for b in pathsurgeon.find(model)]


def ramp(step: int) -> float:  # an arbitrary rate function with repeats and a return to 0
    return [0.0, 0.05, 0.3, 0.3, 0.0, 0.2, 0.45][step % 7]


@pytest.mark.parametrize("spec", [VIT, CONVNEXT], ids=["vit", "convnext"])
@pytest.mark.parametrize("schedule", ["auto", "linear", "uniform"])
def test_each_step_equals_set_rate_with_the_schedule_it_was_added_with(spec, schedule):
    model = _surgered(spec, 0.1, schedule=schedule)
    twin = copy.deepcopy(model)
    scheduler = RateScheduler(model, ramp)
    for step in range(7):
        if step:
            assert scheduler.step() == ramp(step)
        pathsurgeon.set_rate(twin, ramp(step), schedule=schedule)
        assert scheduler.last_step == step and scheduler.rate == ramp(step)
        assert _rates(model) == _rates(twin)


def test_a_list_schedule_is_scaled_to_its_largest_rate():
    model = _build(VIT)
    units = len(pathsurgeon.preview(model, 0.1)) // 2  # ViT: two branches per block
    shape = [0.1 * (i % 2 + 1) for i in range(units)]
    pathsurgeon.add(model, None, schedule=shape, example_inputs=_inputs(2))
    twin = copy.deepcopy(model)
    scheduler = RateScheduler(model, ramp)
    for step in range(1, 7):
        scheduler.step()
        pathsurgeon.set_rate(twin, None, schedule=[value * ramp(step) / max(shape) for value in shape])
        assert _rates(model) == _rates(twin)
    assert max(b.rate for b in pathsurgeon.find(model)) == pytest.approx(ramp(6))


def test_schedule_argument_overrides_the_one_the_model_carries():
    model = _surgered(VIT, 0.1)
    twin = copy.deepcopy(model)
    RateScheduler.late(model, 0.2, start=0, schedule="uniform")
    pathsurgeon.set_rate(twin, 0.2, schedule="uniform")
    assert _rates(model) == _rates(twin)


@pytest.mark.parametrize("mode", ["sample", "skip"])
def test_training_outputs_equal_timm_built_at_each_steps_rate(mode):
    """timm's own model at drop_path_rate=fn(k), same weights and seed: the same training outputs."""
    model = _surgered(VIT, 0.1, mode=mode)
    x = _inputs(8)
    scheduler = RateScheduler.warmup(model, 0.3, steps=3)
    for step in range(5):
        native = _build(VIT, scheduler.rate_at(step))
        native.load_state_dict(model.state_dict())
        assert scheduler.last_step == step
        assert_same_training_output(native, model, x, seed=step, at_rate_zero=scheduler.rate_at(step) == 0,
                                    atol=1e-5 if mode == "skip" else 1e-6)
        scheduler.step()


def test_named_shapes_follow_their_definitions():
    warm = RateScheduler.warmup(_surgered(), 0.2, steps=4)
    assert [warm.rate_at(k) for k in range(7)] == pytest.approx([0.2 * min(k, 4) / 4 for k in range(7)])
    # early stochastic depth as facebookresearch/dropout's drop_scheduler builds it, per iteration
    until, rate = 5, 0.5
    reference = numpy.concatenate([numpy.linspace(rate, 0, until), numpy.zeros(3)])
    early = RateScheduler.early(_surgered(), rate, until=until, decay="linear")
    assert [early.rate_at(k) for k in range(until + 3)] == pytest.approx(reference.tolist())
    constant = RateScheduler.early(_surgered(), rate, until=until)
    assert [constant.rate_at(k) for k in range(until + 3)] == [rate] * until + [0.0] * 3
    late = RateScheduler.late(_surgered(), rate, start=2)
    assert [late.rate_at(k) for k in range(5)] == [0.0, 0.0, rate, rate, rate]
    assert late.rate == 0.0 and all(r == 0.0 for _, r in _rates(late.model))  # at fn(0) after construction


def test_state_dict_resumes_the_schedule():
    first = RateScheduler(_surgered(), ramp)
    for _ in range(4):
        first.step()
    resumed = RateScheduler(_surgered(), ramp)
    resumed.load_state_dict(first.state_dict())
    assert resumed.last_step == 4 and _rates(resumed.model) == _rates(first.model)
    first.step()
    resumed.step()
    assert _rates(resumed.model) == _rates(first.model)
    assert first.state_dict() == {"last_step": 5, "rate": ramp(5)}


def test_a_step_captures_nothing(monkeypatch):
    from pathsurgeon import surgery

    model = _surgered()
    modules_before = dict(model.named_modules())

    def no_capture(*args, **kwargs):
        raise AssertionError("a scheduler step must not capture the model again")

    monkeypatch.setattr(surgery, "capture", no_capture)
    scheduler = RateScheduler.warmup(model, 0.3, steps=2)
    scheduler.step()
    scheduler.step()
    assert dict(model.named_modules()) == modules_before  # the same module objects, only rates changed


def test_bad_rate_from_fn_changes_nothing():
    model = _surgered()
    scheduler = RateScheduler(model, lambda step: [0.1, 1.5][step])
    before = _rates(model)
    with pytest.raises(pathsurgeon.InvalidRateError, match="gave 1.5 at step 1"):
        scheduler.step()
    assert scheduler.last_step == 0 and _rates(model) == before


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda m: RateScheduler(nn.Linear(2, 2), ramp), pathsurgeon.PathSurgeonError, "pathsurgeon.add"),
        (lambda m: RateScheduler(m, 0.1), pathsurgeon.PathSurgeonError, "function of the step"),
        (lambda m: RateScheduler.early(m, 0.1, until=5, decay="cosine"), pathsurgeon.InvalidScheduleError, "decay"),
        (lambda m: RateScheduler.warmup(m, 0.1, steps=0), pathsurgeon.PathSurgeonError, "at least 1"),
        (lambda m: RateScheduler.late(m, 1.2, start=3), pathsurgeon.InvalidRateError, "rate"),
        (lambda m: RateScheduler(m, ramp, schedule=[0.0] * 4), pathsurgeon.InvalidScheduleError, "zeros"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(make, error, words):
    model = _surgered()
    before = _rates(model)
    with pytest.raises(error, match=words) as caught:
        make(model)
    assert "\n" not in str(caught.value)
    assert _rates(model) == before


def test_stepping_a_stripped_model_says_so():
    model = _surgered()
    scheduler = RateScheduler.warmup(model, 0.1, steps=3)
    pathsurgeon.strip(model)
    with pytest.raises(pathsurgeon.PathSurgeonError, match="stripped"):
        scheduler.step()


# --- torch.compile: a new rate is a new input value, not a new graph --------------------------------


def _compile(model: nn.Module, **kwargs) -> nn.Module:
    """aot_eager: forward and backward through AOTAutograd and its partitioner, without inductor's codegen.

    Starts from a clean dynamo state, so ``counters["stats"]["unique_graphs"]`` counts this model's graphs.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(model, backend="aot_eager", **kwargs)


def _graphs() -> int:
    import torch._dynamo

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _step_grads(model: nn.Module, x: torch.Tensor, seed: int):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.slow
def test_sample_mode_compiles_once_for_all_rates_and_matches_timm():
    """fullgraph: one graph for rates 0, 0.3, 0.05, ...; each compiled step equals timm's eager model at fn(k)."""
    import torch._dynamo

    model = _surgered(SHALLOW_VIT, 0.1)
    x = _inputs(8)
    compiled = _compile(model, fullgraph=True)
    scheduler = RateScheduler(model, ramp)
    for step in range(7):
        native = _build(SHALLOW_VIT, ramp(step))
        native.load_state_dict(model.state_dict())
        expected, compiled_step = _step_grads(native, x, step), _step_grads(compiled, x, step)
        torch.testing.assert_close(compiled_step[0], expected[0], atol=1e-6, rtol=0)
        for got, want in zip(compiled_step[1], expected[1], strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        scheduler.step()
    assert _graphs() == 1
    assert not any(torch._dynamo.utils.guard_failures.values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["skip", "batch"])
def test_skip_and_batch_modes_never_recompile_for_a_rate(mode):
    """Their graph breaks recompile for batch sizes (the kept count); never because a rate changed."""
    import torch._dynamo

    model = _surgered(SHALLOW_VIT, 0.1, mode=mode)
    x = _inputs(8)
    compiled = _compile(model)
    scheduler = RateScheduler(model, lambda step: 0.05 * (step % 7) + 0.1)
    for step in range(6):
        torch.testing.assert_close(_step_grads(compiled, x, step)[0], _step_grads(model, x, step)[0])
        scheduler.step()
    reasons = [str(r) for failures in torch._dynamo.utils.guard_failures.values() for r in failures]
    guards = [line.split("#")[0] for reason in reasons for line in reason.splitlines()]
    assert not [g for g in guards if "rate" in g or "scale" in g], reasons
    assert _graphs() > 0
