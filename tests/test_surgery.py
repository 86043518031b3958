"""add / find / set_rate / strip: invariants, schedules, errors and transactions."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import timm
import torch
from conftest import assert_same_training_output, module_layout, pathsurgeon_leftovers, supported_from
from torch import nn

import pathsurgeon
from pathsurgeon import changes, surgery


@pytest.fixture(scope="module")
def vit_factory():
    def build(rate: float = 0.0):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 depth=4, drop_path_rate=rate)
    return build


@pytest.fixture
def vit(vit_factory):
    return vit_factory().eval()


def snapshot(model: nn.Module):
    return {
        "layout": module_layout(model),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "parameters": [id(p) for p in model.parameters()],
        "hooks": [dict(m._forward_hooks) for m in model.modules()],
        "pre_hooks": [dict(m._forward_pre_hooks) for m in model.modules()],
        "vars": sorted(vars(model)),
    }


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after["layout"] == before["layout"]
    assert after["parameters"] == before["parameters"]
    assert after["hooks"] == before["hooks"]
    assert after["pre_hooks"] == before["pre_hooks"]
    assert after["vars"] == before["vars"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert pathsurgeon_leftovers(model) == []


def test_find_changes_nothing_and_reports_current_rates(vit_factory):
    model = vit_factory(0.1).eval()
    before = snapshot(model)
    branches = pathsurgeon.find(model)
    assert_unchanged(model, before)
    assert len(branches) == 8
    assert [round(b.rate, 6) for b in branches[-2:]] == [0.1, 0.1]  # timm's own DropPath, as built
    assert {b.mechanism for b in branches} == {"slot"}


def test_set_rate_matches_native_model_at_the_new_rate(vit_factory):
    model = vit_factory(0.0)
    pathsurgeon.add(model, 0.1)
    branches = pathsurgeon.set_rate(model, 0.3)
    expected = torch.linspace(0, 0.3, 4).tolist()
    assert [b.rate for b in branches[::2]] == pytest.approx(expected)
    native = vit_factory(0.3)
    # the modules themselves carry the new rates, slot by slot as timm's native model has them
    ours = {n: m.rate for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)}
    theirs = {n: m.drop_prob for n, m in native.named_modules() if type(m).__name__ == "DropPath"}
    theirs["blocks.0.drop_path1"] = theirs["blocks.0.drop_path2"] = 0.0  # timm builds nn.Identity at rate 0
    assert ours == pytest.approx(theirs)
    x = torch.randn(3, 3, 32, 32)
    assert_same_training_output(native, model, x, seed=5)
    assert [round(b.rate, 6) for b in pathsurgeon.find(model)] == [round(b.rate, 6) for b in branches]


def test_schedules_uniform_linear_and_explicit(vit):
    report = pathsurgeon.add(vit, 0.2, schedule="uniform")
    assert {b.rate for b in report.branches} == {0.2}
    branches = pathsurgeon.set_rate(vit, None, schedule=[0.0, 0.1, 0.1, 0.3])
    assert [b.rate for b in branches[::2]] == [0.0, 0.1, 0.1, 0.3]
    branches = pathsurgeon.set_rate(vit, 0.2, schedule="linear")
    assert [b.rate for b in branches[::2]] == pytest.approx(torch.linspace(0, 0.2, 4).tolist())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"rate": -0.1}, pathsurgeon.InvalidRateError, "[0, 1)"),
        ({"rate": 1.0}, pathsurgeon.InvalidRateError, "[0, 1)"),
        ({"rate": float("nan")}, pathsurgeon.InvalidRateError, "[0, 1)"),
        ({"rate": "0.1"}, pathsurgeon.InvalidRateError, "number"),
        ({"rate": 0.1, "schedule": "cosine"}, pathsurgeon.InvalidScheduleError, "unknown schedule"),
        ({"rate": None, "schedule": [0.1, 0.2]}, pathsurgeon.InvalidScheduleError, "4 depth units"),
        ({"rate": 0.1, "schedule": [0.1] * 4}, pathsurgeon.InvalidScheduleError, "not both"),
        ({"rate": None}, pathsurgeon.InvalidScheduleError, "needs a rate"),
        ({"rate": None, "schedule": [0.1, 2.0, 0, 0]}, pathsurgeon.InvalidRateError, "schedule[1]"),
    ],
)
def test_bad_arguments_raise_one_line_errors_and_change_nothing(vit, kwargs, error, words):
    assert isinstance(refused(vit, error, words, **kwargs), ValueError)


def refused(model, error, *words, **add_arguments) -> Exception:
    """``add`` raises ``error`` in one line holding every one of ``words``, and ``model`` is unchanged."""
    before = snapshot(model)
    with pytest.raises(error) as caught:
        pathsurgeon.add(model, **add_arguments)
    message = str(caught.value)
    assert all(word in message for word in words) and "\n" not in message, message
    assert_unchanged(model, before)
    return caught.value


def test_residual_adds_all_left_alone_say_why():
    class Inline(nn.Module):  # a residual branch computed inline: no module whose output a hook could drop
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x + torch.nn.functional.linear(x, self.weight)

    refused(nn.Sequential(Inline(), Inline()), pathsurgeon.NoBranchesError, "found 2 residual adds",
            "computed inline", rate=0.1, example_inputs=torch.randn(2, 8))


def test_model_without_residual_branch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    before = snapshot(model)
    with pytest.raises(pathsurgeon.NoBranchesError, match="no residual branch"):
        pathsurgeon.add(model, 0.1, example_inputs=torch.randn(2, 3, 8, 8))
    assert_unchanged(model, before)


def test_not_a_model_and_missing_inputs():
    with pytest.raises(pathsurgeon.PathSurgeonError, match="torch.nn.Module"):
        pathsurgeon.add("vit", 0.1)
    with pytest.raises(pathsurgeon.PathSurgeonError, match="example_inputs"):
        pathsurgeon.add(nn.Linear(3, 3), 0.1)


def test_add_twice_is_refused(vit):
    pathsurgeon.add(vit, 0.1)
    with pytest.raises(pathsurgeon.AlreadySurgeredError, match="set_rate"):
        pathsurgeon.add(vit, 0.2)


def test_strip_untouched_model_is_a_no_op(vit):
    before = snapshot(vit)
    assert pathsurgeon.strip(vit) is vit
    assert_unchanged(vit, before)


def test_set_rate_needs_add_first(vit):
    with pytest.raises(pathsurgeon.PathSurgeonError, match="add"):
        pathsurgeon.set_rate(vit, 0.1)


def test_failure_midway_through_add_leaves_model_as_it_was(vit, monkeypatch):
    before = snapshot(vit)
    real = changes.Change.install
    calls = {"n": 0}

    def flaky(change):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected")
        real(change)

    monkeypatch.setattr(changes.Change, "install", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        pathsurgeon.add(vit, 0.1)
    assert calls["n"] == 5
    assert_unchanged(vit, before)


def test_failure_midway_through_strip_keeps_the_surgery_whole(vit, monkeypatch):
    pathsurgeon.add(vit, 0.1)
    surgered = module_layout(vit)
    calls = {"n": 0}
    real = changes.Change.undo

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        real(self)

    monkeypatch.setattr(changes.Change, "undo", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        pathsurgeon.strip(vit)
    assert module_layout(vit) == surgered
    assert pathsurgeon.is_surgered(vit)
    monkeypatch.setattr(changes.Change, "undo", real)
    pathsurgeon.strip(vit)
    assert pathsurgeon_leftovers(vit) == []


def test_verification_failure_rolls_back_and_names_the_block(vit, monkeypatch):
    before = snapshot(vit)

    def leaky_forward(self, x):  # a DropPath that is not the identity in eval
        return x + 1e-3 if "blocks.2" in self._test_name else x

    original_change = changes._change

    def tagging_change(model, branch, *rest):
        change = original_change(model, branch, *rest)
        change.drop._test_name = branch.target
        return change

    monkeypatch.setattr(changes, "_change", tagging_change)
    monkeypatch.setattr(pathsurgeon.DropPath, "forward", leaky_forward)
    with pytest.raises(pathsurgeon.VerificationError, match="blocks.2") as caught:
        pathsurgeon.add(vit, 0.1)
    assert "rolled back" in str(caught.value)
    assert_unchanged(vit, before)


def test_training_flags_are_kept(vit):
    vit.train()
    vit.blocks[1].norm1.eval()  # a user's frozen sub-module
    pathsurgeon.add(vit, 0.1)
    assert vit.training and not vit.blocks[1].norm1.training
    assert all(m.training for m in vit.modules() if isinstance(m, pathsurgeon.DropPath))


def test_deepcopy_of_a_surgered_model_can_be_stripped(vit):
    pathsurgeon.add(vit, 0.1)
    twin = copy.deepcopy(vit)
    pathsurgeon.strip(twin)
    assert pathsurgeon_leftovers(twin) == []
    assert pathsurgeon.is_surgered(vit)


class SequenceFirst(nn.Module):
    """Residual stream laid out (tokens, batch, channels), as in the original CLIP transformer."""

    def __init__(self, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x):  # x: (batch, tokens, channels), processed as (tokens, batch, channels)
        x = x.transpose(0, 1)
        for fc in self.blocks:
            x = x + fc(x)
        return x.transpose(0, 1)


def test_batch_axis_is_inferred_for_sequence_first_streams():
    model = SequenceFirst(depth=1)
    report = pathsurgeon.add(model, 0.5, schedule="uniform", example_inputs=torch.randn(3, 7, 8))
    assert [(b.batch_axis, b.mechanism, b.target) for b in report.branches] == [(1, "hook", "blocks.0")]
    model.train()
    torch.manual_seed(0)
    x = torch.randn(64, 7, 8)
    with torch.no_grad():
        delta = model(x) - x
        fc = model.blocks[0]
        branch = nn.functional.linear(x, fc.weight, fc.bias)  # not through the hooked module
    outcomes = set()
    for sample in range(x.shape[0]):  # every sample: its branch dropped whole, or kept whole and scaled
        if torch.allclose(delta[sample], torch.zeros_like(delta[sample]), atol=1e-6):
            outcomes.add("dropped")
        else:
            torch.testing.assert_close(delta[sample], branch[sample] / 0.5, atol=1e-5, rtol=1e-5)
            outcomes.add("kept")
    assert outcomes == {"dropped", "kept"}


def test_torchvision_resnet_without_slots_gets_hooks():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    before = snapshot(model)
    with torch.no_grad():
        reference = model(x)
    report = pathsurgeon.add(model, 0.2, example_inputs=x)
    assert report.blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert {b.mechanism for b in report.branches} == {"hook"}
    assert [b.target for b in report.branches][:2] == ["layer1.0.bn2", "layer1.1.bn2"]
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    # in training the hooks drop each sample's branch output whole: some outputs zeroed, others scaled
    branch_outputs = {}
    for branch in report.branches:
        model.get_submodule(branch.target).register_forward_hook(
            lambda m, i, out, n=branch.target: branch_outputs.__setitem__(n, out.detach().clone())
        )
    pathsurgeon.set_rate(model, 0.5, schedule="uniform")
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.randn(16, 3, 64, 64))
    assert branch_outputs.keys() == {b.target for b in report.branches}
    for target, out in branch_outputs.items():  # at rate 0.5, of 16 samples some are dropped and some kept
        dropped = (out.flatten(1) == 0).all(1)
        assert 0 < int(dropped.sum()) < 16, target
    for handle_owner in {b.target for b in report.branches}:
        model.get_submodule(handle_owner)._forward_hooks.popitem()  # our test hooks, registered last
    pathsurgeon.strip(model)
    assert_unchanged(model, {**before, "state": snapshot(model)["state"]})  # BatchNorm statistics moved in training


def test_torchvision_stochastic_depth_matches_native():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    native = torchvision.models.convnext_tiny(stochastic_depth_prob=0.2, num_classes=10)
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.0, num_classes=10)
    model.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 32, 32)
    report = pathsurgeon.add(model, 0.2, example_inputs=x)
    want = {
        (name.rpartition(".")[0], round(m.p, 6))
        for name, m in native.named_modules()
        if type(m).__name__ == "StochasticDepth" and m.p > 0
    }
    assert {(b.block, round(b.rate, 6)) for b in report.branches if b.rate > 0} == want
    assert_same_training_output(native, model, x, seed=1)


class DataDependent(nn.Module):
    """Control flow on tensor values: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.fc(x)
        return x


def test_uncapturable_model_raises_capture_error_and_changes_nothing():
    refused(DataDependent(), pathsurgeon.CaptureError, "torch.fx", "torch.export", rate=0.1,
            example_inputs=torch.ones(2, 4))


class SpaceToDepthNet(nn.Module):
    """A residual net whose stem folds 2×2 pixels into channels before its first convolution (as TResNet's
    does): that convolution reads 12 channels of a 3-channel image, and nothing states the image's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3, padding=1))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        return x + self.block(x)


def test_a_model_failing_on_made_up_inputs_asks_for_example_inputs():
    error = refused(SpaceToDepthNet(), pathsurgeon.ExampleInputsError, "does not run on the random inputs",
                    "(2, 12, 224, 224)", "pass example_inputs=", rate=0.1)
    assert isinstance(error, pathsurgeon.PathSurgeonError) and isinstance(error.__cause__, RuntimeError)
    with pytest.raises(pathsurgeon.ExampleInputsError, match="pass example_inputs="):
        pathsurgeon.find(SpaceToDepthNet())  # its branch is hooked: find runs it for the output shape
    report = pathsurgeon.add(SpaceToDepthNet(), 0.1, example_inputs=torch.randn(2, 3, 16, 16))
    assert report.max_abs_diff == 0.0 and len(report.branches) == 1


def test_dtype_is_respected(vit):
    vit.double()
    report = pathsurgeon.add(vit, 0.1)  # example inputs made in the model's dtype
    assert report.max_abs_diff == 0.0
    assert all(p.dtype == torch.float64 for p in vit.parameters())


# --- API edges: nested surgery, interrupts, meta device, number types, random eval ----------------------


def test_surgery_through_a_wrapper_is_refused_both_ways(vit):
    pathsurgeon.add(vit, 0.5)
    before = snapshot(vit)
    wrapper = nn.Sequential(vit)
    with pytest.raises(pathsurgeon.AlreadySurgeredError, match="submodule '0'"):
        pathsurgeon.add(wrapper, 0.5)
    assert snapshot(vit)["layout"] == before["layout"]
    assert pathsurgeon.is_surgered(wrapper)
    pathsurgeon.strip(wrapper)  # strips the surgery inside, too
    assert pathsurgeon_leftovers(vit) == [] and not pathsurgeon.is_surgered(wrapper)

    wrapper = nn.Sequential(vit)
    pathsurgeon.add(wrapper, 0.5, example_inputs=torch.randn(2, 3, 32, 32))
    with pytest.raises(pathsurgeon.AlreadySurgeredError, match="holds pathsurgeon's DropPath"):
        pathsurgeon.add(vit, 0.5)
    pathsurgeon.strip(wrapper)
    assert pathsurgeon_leftovers(vit) == []


def test_a_users_own_droppath_layers_are_re_rated_not_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop_path = pathsurgeon.DropPath(0.3)

        def forward(self, x):
            return x + self.drop_path(self.fc(x))

    model = Net()
    report = pathsurgeon.add(model, 0.1, schedule="uniform", example_inputs=torch.randn(2, 4))
    assert [b.rate for b in report.branches] == [0.1]
    pathsurgeon.strip(model)
    assert model.drop_path.rate == 0.3 and not model.drop_path.inserted


@pytest.mark.parametrize("where", ["record", "change", "verify", "gather check", "report"])
def test_interrupt_anywhere_in_add_leaves_the_model_consistent(vit, monkeypatch, where):
    """A KeyboardInterrupt at any point of add: the model is untouched, or fully surgered with its record."""
    before = snapshot(vit)
    if where == "change":
        real, calls = changes.Change.install, {"n": 0}

        def interrupted(change):
            calls["n"] += 1
            real(change)  # the change is made, then the interrupt arrives
            if calls["n"] == 8:
                raise KeyboardInterrupt

        monkeypatch.setattr(changes.Change, "install", interrupted)
    elif where == "record":  # the record is made: it must not be the last step, after the changes
        monkeypatch.setattr(surgery, "Record", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    elif where == "verify":
        monkeypatch.setattr(surgery, "max_abs_diff", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    elif where == "gather check":  # after the last change, before the record is complete
        monkeypatch.setattr(surgery, "check_gathers", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(surgery, "Report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pathsurgeon.add(vit, 0.1, mode="skip" if where == "gather check" else "sample")
    if where == "report":  # the surgery completed: it must be whole, recorded and strippable
        assert pathsurgeon.is_surgered(vit)
        assert len([m for m in vit.modules() if isinstance(m, pathsurgeon.DropPath)]) == 8
        pathsurgeon.strip(vit)
    assert_unchanged(vit, before)


@supported_from("torch", "2.9", "timm cannot build under torch.device('meta') on 2.4: .item() of a meta linspace")
def test_model_on_the_meta_device(vit_factory):
    native = vit_factory(0.2)
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4)
    with pytest.raises(pathsurgeon.PathSurgeonError, match="meta device.*verify=False"):
        pathsurgeon.add(model, 0.2)
    assert pathsurgeon_leftovers(model) == []
    with pytest.raises(pathsurgeon.PathSurgeonError, match="meta device"):
        pathsurgeon.add(model, 0.2, mode="skip", verify=False)
    report = pathsurgeon.add(model, 0.2, verify=False)  # built empty, surgered, then loaded: the FSDP way
    assert report.max_abs_diff is None and len(report.branches) == 8
    model.to_empty(device="cpu")
    model.load_state_dict(native.state_dict())
    assert_same_training_output(native, model, torch.randn(3, 3, 32, 32), seed=11)


@pytest.mark.parametrize(
    "rate",
    [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64), np.int64(0)],
    ids=["np.float32", "np.float64", "tensor", "tensor64", "np.int64"],
)
def test_any_real_number_type_is_a_rate(vit, rate):
    report = pathsurgeon.add(vit, rate, schedule="uniform", verify=np.float32(0.0))
    expected = float(rate)
    assert {b.rate for b in report.branches} == {expected}
    assert {m.rate for m in vit.modules() if isinstance(m, pathsurgeon.DropPath)} == {expected}
    assert all(type(m.rate) is float for m in vit.modules() if isinstance(m, pathsurgeon.DropPath))
    branches = pathsurgeon.set_rate(vit, None, schedule=[np.float32(0.5), torch.tensor(0.0), 0, 0.1])
    assert [b.rate for b in branches[::2]] == [0.5, 0.0, 0.0, 0.1]


@pytest.mark.parametrize("rate", [torch.tensor([0.1]), np.bool_(True), True, 0.1 + 0j, torch.tensor(True)])
def test_non_real_rates_are_refused(vit, rate):
    with pytest.raises(pathsurgeon.InvalidRateError, match="must be a number") as caught:
        pathsurgeon.add(vit, rate)
    assert "\n" not in str(caught.value)
    assert pathsurgeon_leftovers(vit) == []


class PythonRandomEval(nn.Module):
    """A residual block whose eval forward draws from Python's random module, which no seed of torch's fixes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x * random.random())


def test_randomness_outside_torch_is_reported():
    model = PythonRandomEval()
    before = snapshot(model)
    with pytest.raises(pathsurgeon.VerificationError, match="from one call to the next"):
        pathsurgeon.add(model, 0.1, example_inputs=torch.randn(2, 4))
    assert_unchanged(model, before)


def test_add_leaves_the_global_rng_where_it_was(vit):
    state = torch.get_rng_state()
    pathsurgeon.add(vit, 0.1, mode="skip")
    pathsurgeon.set_rate(vit, 0.2)
    pathsurgeon.strip(vit)
    assert torch.equal(torch.get_rng_state(), state)


def test_add_and_strip_tell_the_pathsurgeon_logger_and_print_nothing(vit, caplog, capsys):
    import logging

    with caplog.at_level(logging.DEBUG, logger="pathsurgeon"):
        report = pathsurgeon.add(vit, pathsurgeon.DropPathConfig(0.1, exclude=["blocks.0"]))
        undone = len(changes.record_of(vit).changes)
        pathsurgeon.strip(vit)
    seen = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("pathsurgeon.surgery", logging.INFO, f"added drop path to VisionTransformer: {report.summary()}") in seen
    assert ("pathsurgeon.surgery", logging.DEBUG,
            "left blocks.0 alone: excluded by the config's include / exclude patterns") in seen
    assert ("pathsurgeon.surgery", logging.INFO,
            f"stripped pathsurgeon's drop path from VisionTransformer ({undone} changes undone)") in seen
    assert ("pathsurgeon.capture", logging.DEBUG, "VisionTransformer: captured with torch.fx") in seen
    assert capsys.readouterr() == ("", "")  # nothing printed: what is shown is the application's choice
    package = logging.getLogger("pathsurgeon")  # a library configures no level and no handler that shows
    assert package.level == logging.NOTSET and all(type(h) is logging.NullHandler for h in package.handlers)
