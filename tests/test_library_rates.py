"""schedule="auto" asks the model's own library: timm constructors, torchvision builders, HF configs.

Ground truth is the library's own code at each rate (a model it builds, on the meta device where only
the rates are read), never numbers written here.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import assert_same_training_output, module_layout, pathsurgeon_leftovers, supported_from
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pathsurgeon
from pathsurgeon import slots as slot_lib
from pathsurgeon.changes import record_of as _record
from pathsurgeon.libraries import RebuildError, constructor_arguments, identify_constructor, meta_build

torchvision = pytest.importorskip("torchvision")

RATE = 0.2


def library_rates(module: nn.Module) -> dict[str, float]:
    """{name: rate} of every drop-path module the library built (timm, torchvision, HF), rate > 0."""
    return {
        name: slot_lib.existing_rate(m) for name, m in module.named_modules()
        if slot_lib.is_drop_path_module(m) and slot_lib.existing_rate(m) > 0
    }


def called_rates(model: nn.Module, inputs) -> dict[str, float]:
    """{name: rate} of the library's drop-path modules a train-mode forward calls, rate > 0."""
    calls: dict[str, float] = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, slot_lib.existing_rate(m)))
               for n, m in model.named_modules() if slot_lib.is_drop_path_module(m)]
    model.train()
    with torch.no_grad():
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    model.eval()
    for handle in handles:
        handle.remove()
    return {n: r for n, r in calls.items() if r > 0}


def our_rates(report_or_branches) -> dict[str, float]:
    branches = getattr(report_or_branches, "branches", report_or_branches)
    return {b.target: b.rate for b in branches if b.rate > 0}


# --- timm: models as fine-tuners build them ----------------------------------------------------------

TIMM = {
    # linspace(0, r, N) in float32; a new head and a smaller image
    "vit_tiny_patch16_224": {"num_classes": 10, "img_size": 64},
    # r * i / (N - 1) in Python floats; drop_path is None at rate 0 and the call is skipped
    "resnet18": {"num_classes": 10},
    # the EfficientNet builder: r * i / N over every block, residual or not
    "efficientnet_b0": {"num_classes": 10},
    # one input channel
    "convnext_atto": {"in_chans": 1},
}


# before timm 1.0.26 a model built with in_chans other than 3 keeps no in_chans (made-up inputs have 3)
IN_CHANS = supported_from("timm", "1.0.26", "a model built with in_chans other than 3 keeps no in_chans")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=IN_CHANS) if "in_chans" in TIMM[name] else name for name in sorted(TIMM)
])
def test_timm_rates_are_the_constructors_bitwise(name):
    kwargs = TIMM[name]
    torch.manual_seed(0)
    native = timm.create_model(name, drop_path_rate=RATE, **kwargs)
    model = timm.create_model(name, drop_path_rate=0.0, **kwargs)
    model.load_state_dict(native.state_dict())
    x = torch.randn(2, kwargs.get("in_chans", 3), 64, 64)

    report = pathsurgeon.add(model, RATE, example_inputs=x)

    assert report.rates_from == "timm constructor" and report.rates_note == ""
    assert our_rates(report) == called_rates(copy.deepcopy(native), x)  # same slots, same floats
    assert_same_training_output(native, model, x, seed=11)
    # set_rate reads the same constructor: timm's numbers at the new rate, bitwise
    pathsurgeon.set_rate(model, 0.35)
    other = meta_build(lambda: timm.create_model(name, drop_path_rate=0.35, **kwargs))
    theirs = library_rates(other)
    assert {c.target: c.drop.rate for c in _record(model).changes} == {c.target: theirs.get(c.target, 0.0)
                                                                      for c in _record(model).changes}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b0", "nextvit_small"])
def test_set_rate_gives_what_add_gives_bitwise(name):
    """Rate laws (linspace in float32; r * i / N; NextViT's rates times its mix ratio) at any rate."""
    kwargs = TIMM.get(name, {})
    model = timm.create_model(name, drop_path_rate=0.0, **kwargs)
    pathsurgeon.add(model, 0.1, example_inputs=torch.randn(2, 3, 64, 64))
    record = _record(model)

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.floats(min_value=0.0, max_value=0.99, allow_nan=False))
    def check(rate):
        pathsurgeon.set_rate(model, rate)
        native = meta_build(lambda: timm.create_model(name, drop_path_rate=rate, **kwargs))
        expected = {
            change.target: slot_lib.existing_rate(slot_lib.read_slot(
                native.get_submodule(change.target.rpartition(".")[0]), change.target.rpartition(".")[2]
            ).value)
            for change in record.changes
        }
        assert {change.target: change.drop.rate for change in record.changes} == expected

    check()
    assert all(law is not None for law in record.library.laws.values())  # no rebuild per call


@pytest.mark.slow
def test_a_larger_n_that_mimics_a_fraction_on_the_probes_is_not_chosen():
    """NextViT-L: rates are linspace(0, r, 40)[k] times 1/4 or 3/4, and linspace(0, r, 157) holds every
    quarter step in real arithmetic; it agreed with timm on all six probe rates, not at 0.8765 (found
    by the coverage sweep). Built on the meta device: only rates are compared, at rates off the probes."""
    model = meta_build(lambda: timm.create_model("nextvit_large"))
    pathsurgeon.add(model, 0.2, verify=False)
    record = _record(model)
    for rate in (0.8765, 0.4567, 0.0123, 0.6181):
        pathsurgeon.set_rate(model, rate)
        theirs = library_rates(meta_build(lambda r=rate: timm.create_model("nextvit_large", drop_path_rate=r)))
        assert {c.target: c.drop.rate for c in record.changes} == {c.target: theirs.get(c.target, 0.0)
                                                                  for c in record.changes}
    assert {law.n for law in record.library.laws.values() if law is not None and law.kind != "zero"} == {40}


def test_a_shrunken_model_falls_back_to_the_recipe_and_says_why():
    model = timm.create_model("cait_xxs24_224", depth=4, img_size=64)  # depth=4: nothing keeps it
    report = pathsurgeon.add(model, RATE)
    assert report.rates_from == "recipe"  # recipes/timm.toml: CaiT is constant
    assert "blocks.4" in report.rates_note and "\n" not in report.rates_note
    assert {b.rate for b in report.branches if b.block.startswith("blocks.")} == {RATE}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


def test_custom_model_gets_linear_over_found_units():
    def Residual():  # noqa: N802 - reads as the class it builds
        return nn.Sequential(*(Block() for _ in range(3)))

    report = pathsurgeon.add(Residual(), RATE, example_inputs=torch.randn(2, 8))
    assert report.rates_from == "linear over found units"
    assert [b.rate for b in report.branches] == torch.linspace(0, RATE, 3).tolist()
    report = pathsurgeon.preview(Residual(), RATE, schedule="uniform", example_inputs=torch.randn(2, 8))
    assert report.rates_from == "uniform schedule"


# --- torchvision ---------------------------------------------------------------------------------------

def zero_stochastic_depth(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, torchvision.ops.StochasticDepth):
            module.p = 0.0
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "builder, rate, size",
    [
        # builders that take the rate: the native model is built at it
        ("convnext_tiny", 0.3, 64),
        ("efficientnet_b0", 0.3, 64),  # r * i / N over every block
        # builders that fix their rate (0.2): add at that rate must give the builder's numbers
        ("swin_t", 0.2, 64),
        ("maxvit_t", 0.2, None),  # numpy linspace over every block layer; needs its 224 x 224
    ],
)
def test_torchvision_rates_are_the_builders(builder, rate, size):
    build = torchvision.models.get_model_builder(builder)
    torch.manual_seed(0)
    native = build(num_classes=10, stochastic_depth_prob=rate) if builder in ("convnext_tiny", "efficientnet_b0") \
        else build(num_classes=10)
    model = zero_stochastic_depth(copy.deepcopy(native))
    x = torch.randn(2, 3, size, size) if size else torch.randn(2, 3, 224, 224)

    report = pathsurgeon.add(model, rate, example_inputs=x if size else None)  # maxvit: default inputs

    assert report.rates_from == "torchvision builder"
    assert our_rates(report) == called_rates(copy.deepcopy(native), x)
    assert report.max_abs_diff == 0.0
    assert_same_training_output(native, model, x, seed=2)


def test_torchvision_resnet18_needs_no_example_inputs():
    model = torchvision.models.resnet18()
    layout = module_layout(model)
    report = pathsurgeon.add(model, 0.1)  # (2, 3, 224, 224): torchvision's input size, channels of conv1
    assert report.max_abs_diff == 0.0 and len(report.branches) == 8
    assert report.rates_from == "linear over found units"
    assert "takes no drop-path rate" in report.rates_note  # torchvision builds ResNet without any
    pathsurgeon.strip(model)
    assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []


@IN_CHANS
def test_default_inputs_use_the_models_own_image_size():
    from pathsurgeon.inputs import example_inputs

    model = torchvision.models.vit_b_32(image_size=64, num_classes=10)  # keeps image_size
    assert example_inputs(model).args[0].shape == (2, 3, 64, 64)
    model = timm.create_model("convnext_atto", in_chans=1)
    assert example_inputs(model).args[0].shape[1] == 1


@supported_from("timm", "1.0.31", "no timm.models.get_model_input_config, and csatv2 is missing")
@pytest.mark.parametrize(
    "name, arguments, stated",
    [
        ("csatv2", {}, (3, 512, 512)),  # its first convolution reads the DCT stem's 64 coefficients
        ("tresnet_m", {}, (3, 224, 224)),  # its stem convolution reads 48 channels after a space-to-depth
        ("maxvit_tiny_tf_384", {"img_size": 224}, (3, 224, 224)),  # built below its config's 384 px
        ("vit_tiny_patch16_224", {"img_size": 64, "in_chans": 5}, (5, 64, 64)),
    ],
)
def test_default_inputs_for_timm_are_what_timm_states(name, arguments, stated):
    """Made-up inputs have timm's stated (C, H, W), and the model runs on them (on the meta device:
    shapes only, every shape check of the real forward, no compute)."""
    from pathsurgeon.inputs import example_inputs

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **arguments)
    assert tuple(timm.models.get_model_input_config(model)["input_size"]) == stated  # timm's own word
    inputs = example_inputs(model)
    assert inputs.args[0].shape == (2, *stated)
    model.eval()
    with torch.no_grad():
        model(*inputs.args)  # the old guesses failed here: 64 / 48 channels, or 384 px windows of 7


@supported_from("timm", "1.0.26", "TResNet keeps no in_chans")
def test_timm_constructor_arguments_take_no_channels_from_a_stem_convolution():
    with torch.device("meta"):
        assert constructor_arguments(timm.create_model("tresnet_m"))["arguments"] == {}  # not in_chans=48
        model = timm.create_model("maxvit_tiny_tf_384", img_size=224)
    assert constructor_arguments(model)["arguments"] == {"img_size": 224}


# --- constructor arguments (what save/load will record) ---------------------------------------------

@pytest.mark.slow
def test_constructor_arguments_round_trip_through_the_library():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64)
    recipe = constructor_arguments(model)
    assert recipe == {"library": "timm", "name": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                      "arguments": {"num_classes": 10, "img_size": 64}}
    rebuilt = timm.create_model(recipe["name"], **recipe["arguments"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}

    # MViTv2 keeps no img_size; the rebuild differs in shapes only, so the usual sizes are tried
    assert constructor_arguments(timm.create_model("mvitv2_tiny", img_size=64))["arguments"] == {"img_size": 64}

    tv = constructor_arguments(torchvision.models.swin_t(num_classes=10))
    assert tv == {"library": "torchvision", "name": "swin_t", "arguments": {"num_classes": 10}}
    assert type(identify_constructor(torchvision.models.swin_v2_t()).build()) is torchvision.models.SwinTransformer
    assert constructor_arguments(torchvision.models.swin_v2_t())["name"] == "swin_v2_t"


@pytest.mark.parametrize(
    "model, words",
    [
        (nn.Sequential(nn.Linear(2, 2)), "not a timm, torchvision or transformers model"),
        (timm.create_model("vit_tiny_patch16_224", depth=3), "blocks.3"),
    ],
)
def test_an_architecture_the_library_cannot_rebuild_is_refused(model, words):
    with pytest.raises(RebuildError) as caught:
        constructor_arguments(model)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, pathsurgeon.PathSurgeonError)


def test_rebuilding_leaves_the_random_streams_alone():
    model = timm.create_model("resnet18")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    identify_constructor(model, rate=0.1)
    assert torch.equal(torch.rand(3), expected)
