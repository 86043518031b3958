"""Ground truth: where timm itself puts DropPath, at what rate, and what its models output.

For each family a small model is built twice by timm: with ``drop_path_rate=0`` (then surgered by
pathsurgeon) and with ``drop_path_rate=RATE`` (timm's native placement). Both share weights.

Most models are built as a fine-tuner builds them (only ``img_size`` changed, where the model keeps
it): pathsurgeon rebuilds them on the meta device and reads timm's own rates, which must then be
bitwise equal. Models shrunken with architecture overrides (``depth=4``) cannot be rebuilt from what
they keep; there the rates come from ``recipes/timm.toml``, reported as such, and must agree with
timm's to 6 decimals.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import (
    assert_same_training_output,
    called_drop_paths,
    liven,
    module_layout,
    parent_rates,
    pathsurgeon_leftovers,
    supported_from,
    timm_model,
)

import pathsurgeon

RATE = 0.2

# family -> (model name, constructor overrides that only make it smaller, input size or None for the model's)
FAMILIES = {
    "vision_transformer": ("vit_tiny_patch16_224", {"img_size": 64}, None),
    "deit": ("deit_tiny_distilled_patch16_224", {"img_size": 64}, None),
    "beit": ("beit_base_patch16_224", {"img_size": 64, "depth": 4, "embed_dim": 64, "num_heads": 2}, None),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 4}, None),
    "swin_transformer": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 32, "depths": (2, 2, 2, 2), "img_size": 64, "window_size": 4},
        64,
    ),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", {"depths": (2, 2, 2, 2), "img_size": 64, "window_size": 4}, 64),
    "convnext": ("convnext_atto", {}, 64),
    "resnet": ("resnet18", {}, 64),
    "resnetv2": ("resnetv2_18", {}, 64),
    "regnet": ("regnetx_002", {}, 64),
    "efficientnet": ("efficientnet_b0", {}, 64),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64),
    "mlp_mixer": ("mixer_s32_224", {"img_size": 64}, 64),
    "maxxvit": ("maxvit_pico_rw_256", {"img_size": 64}, 64),
    "cait": ("cait_xxs24_224", {"depth": 4, "img_size": 64}, None),
    "xcit": ("xcit_nano_12_p16_224", {"depth": 4, "img_size": 64}, None),
    "pvt_v2": ("pvt_v2_b0", {}, 64),
    "twins": ("twins_svt_small", {}, 64),
    "metaformer": ("poolformer_s12", {}, 64),
    "edgenext": ("edgenext_xx_small", {}, 64),
    "hiera": ("hiera_tiny_224", {"img_size": (64, 64)}, 64),
    "davit": ("davit_tiny", {}, 64),
    "focalnet": ("focalnet_tiny_srf", {}, 64),
    "mambaout": ("mambaout_femto", {}, 64),
    "nest": ("nest_tiny", {"img_size": 64}, 64),
    "levit": ("levit_128s", {"img_size": 64}, 64),
    "tiny_vit": ("tiny_vit_5m_224", {}, None),
    "fastvit": ("fastvit_t8", {}, 64),
    "gcvit": ("gcvit_xxtiny", {"img_size": 64}, 64),
    "inception_next": ("inception_next_atto", {}, 64),
    # beyond the families the core issue lists: each needed its own rule in recipes/timm.toml or a
    # finder change (computed conv weights, partial residuals on a channel slice)
    "nfnet": ("nf_regnet_b0", {}, 64),
    "rexnet": ("rexnet_100", {}, 64),
    "byobnet": ("repvgg_b0", {}, 64),
    "hgnet": ("hgnet_tiny", {}, 64),
    "coat": ("coat_tiny", {"img_size": 64}, 64),
    "sequencer": ("sequencer2d_s", {}, 64),
    "swiftformer": ("swiftformer_xs", {}, 64),
    "volo": ("volo_d1_224", {"img_size": 64}, 64),
    "iformer": ("iformer_t", {}, 64),
    # the families the first release knew no rule for: now timm's own numbers, and finder fixes for
    # CrossViT's two branches, MViTv2's pooled attention shortcut and NextViT's mix-ratio split rates
    "crossvit": ("crossvit_tiny_240", {"img_size": 120}, 120),
    "cpubone": ("cpubone_nano", {}, 64),
    "lowformer": ("lowformer_b0", {}, 64),
    "nextvit": ("nextvit_small", {}, 64),
    "mvitv2": ("mvitv2_tiny", {"img_size": 64}, 64),
}
# built with structural overrides a rebuild cannot read back from the model (depth=4, window_size=4):
# rates from recipes/timm.toml. (An img_size the model does not keep is found by trying the usual sizes.)
SHRUNKEN = {"beit", "cait", "eva", "swin_transformer", "swin_transformer_v2", "xcit"}

# finder fixes, each on a timm model that needs it: name -> (model, overrides, input size)
FINDER_CASES = {
    # layer_scale(drop_path(mixer(norm(x)))) with a res_scale on the shortcut (stages 2 and 3)
    "slot before a scale, res_scale on the shortcut": ("convformer_s18", {}, 64),
    # blocks that partition tokens into windows around attention, others attend globally
    "windowed attention in a ViT": (
        "samvit_base_patch16",
        {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2,
         "global_attn_indexes": [1, 3], "window_size": 3, "neck_chans": 32},
        64,
    ),
    # a pooling branch, pool(norm(x)) - norm(x), has no more parameters than the res_scale'd shortcut
    "pooling branch as light as a scaled shortcut": ("poolformerv2_s12", {}, 64),
    # the shortcut of a stage's first block is max- and mean-pooled and concatenated
    # x + stack([path(x) for path in paths]).sum(0), a drop path ending each parallel path
    "parallel paths summed before the add": (
        "vit_small_patch16_18x2_224", {"img_size": 64, "depth": 3, "embed_dim": 64, "num_heads": 2}, None,
    ),
    "pooled shortcut that splits and joins": ("hiera_tiny_224", {"img_size": (64, 64), "use_expand_proj": False}, 64),
}


def _build(name: str, overrides: dict, rate: float | None):
    kwargs = dict(overrides)
    if rate is not None:
        kwargs["drop_path_rate"] = rate
    torch.manual_seed(0)
    return timm.create_model(timm_model(name), pretrained=False, **kwargs)


def _inputs(model, size: int | None = None) -> torch.Tensor:
    channels, height, width = model.pretrained_cfg["input_size"]
    size = (size, size) if size else getattr(getattr(model, "patch_embed", None), "img_size", None) or (height, width)
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, channels, *size, generator=generator)


# families an older timm builds without the drop path this test compares against
_FAMILY_RELEASES = {"coat": ("1.0.31", "timm 1.0.8's CoaT has no stochastic depth (asserts drop_path_rate == 0)")}


# families whose model takes seconds to build and compare: `make test-fast` leaves them out (the rest keep
# one model of each kind: ViTs, hierarchical transformers, convnets, MLP-mixers, hybrids)
_SLOW_FAMILIES = {
    "byobnet", "cait", "coat", "crossvit", "davit", "fastvit", "focalnet", "gcvit", "hgnet", "hiera", "inception_next",
    "lowformer", "maxxvit", "metaformer", "mvitv2", "nest", "nextvit", "nfnet", "rexnet", "sequencer", "swiftformer",
    "swin_transformer_v2", "tiny_vit", "twins", "volo",
}


@pytest.mark.parametrize("family", [
    pytest.param(family, marks=[
        *([supported_from("timm", *_FAMILY_RELEASES[family])] if family in _FAMILY_RELEASES else []),
        *([pytest.mark.slow] if family in _SLOW_FAMILIES else []),
    ]) for family in sorted(FAMILIES)
])
def test_matches_native_timm(family):
    name, overrides, size = FAMILIES[family]
    report = assert_matches_native(name, overrides, size, module=f"timm.models.{family}")
    if family in SHRUNKEN:
        assert report.rates_from in ("recipe", "linear over found units")
        assert "no library constructor rebuilds" in report.rates_note
    else:
        assert report.rates_from == "timm constructor", report.rates_note


_CASE_RELEASES = dict.fromkeys(  # cases an older timm builds otherwise (or whose arguments it lacks)
    ["parallel paths summed before the add", "pooled shortcut that splits and joins", "windowed attention in a ViT"],
    ("1.0.31", "timm 1.0.8 builds these blocks (or takes these arguments) otherwise"),
)


_SLOW_CASES = {"slot before a scale, res_scale on the shortcut", "pooled shortcut that splits and joins"}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=[
        *([supported_from("timm", *_CASE_RELEASES[case])] if case in _CASE_RELEASES else []),
        *([pytest.mark.slow] if case in _SLOW_CASES else []),
    ]) for case in sorted(FINDER_CASES)
])
def test_finder_fix_matches_native_timm(case):
    assert_matches_native(*FINDER_CASES[case])


def test_none_slot_trains_bitwise_like_timm():
    """timm ResNet leaves ``drop_path = None`` at rate 0 and skips the call: the slot is filled, not hooked."""
    native, model = _build("resnet18", {}, RATE), _build("resnet18", {}, 0.0)
    model.load_state_dict(native.state_dict())
    assert model.layer1[0].drop_path is None
    x = _inputs(model, 64)
    report = pathsurgeon.add(model, RATE, example_inputs=x)
    assert {b.mechanism for b in report.branches} == {"slot"}
    liven(native)  # timm zero-inits each branch's last BatchNorm: without this any model would match
    liven(model)
    native.train()
    model.train()
    torch.manual_seed(4)
    assert not torch.equal(native(x), native(x))  # the masks now move the output
    torch.manual_seed(3)
    expected = native(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), expected)  # the library's own code path, so bitwise


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_training_comparison_catches_a_model_with_no_drop_path(name):
    """Fresh timm ResNets zero-init each branch's last BatchNorm, ConvNeXt starts its layer scales at
    1e-6: unlivened, a model with no drop path at all matches timm's at rate 0.3 (Δ ≈ 0)."""
    native, bare = _build(name, {}, 0.3), _build(name, {}, 0.0)
    bare.load_state_dict(native.state_dict())
    x = _inputs(bare, 64)
    native.train()
    bare.train()
    torch.manual_seed(0)
    expected = native(x)
    torch.manual_seed(0)
    assert torch.allclose(bare(x), expected, atol=2e-6, rtol=0)  # what the old comparison accepted
    with pytest.raises(AssertionError):
        assert_same_training_output(native, bare, x, seed=0)


def assert_matches_native(name: str, overrides: dict, size: int | None, module: str | None = None):
    native = _build(name, overrides, RATE)
    model = _build(name, overrides, 0.0)
    if module is not None:
        assert type(model).__module__ == module
    model.load_state_dict(native.state_dict())
    x = _inputs(model, size)
    model.eval()
    native.eval()

    keys = list(model.state_dict())
    layout = module_layout(model)
    parameters = [id(p) for p in model.parameters()]
    with torch.no_grad():
        before = model(x)

    report = pathsurgeon.add(model, RATE, example_inputs=x if size else None)

    # (a) the same slots at the same rates as timm's own DropPath modules that a training forward calls:
    # bitwise where the rates are timm's own (read from a rebuild), to 6 decimals from a recipe
    ours = {b.target: b.rate for b in report.branches if b.rate > 0}
    theirs = {n: r for n, r in called_drop_paths(copy.deepcopy(native), x).items() if r > 0}
    if report.rates_from == "timm constructor":
        assert ours == theirs
    else:
        assert {k: round(v, 6) for k, v in ours.items()} == {k: round(v, 6) for k, v in theirs.items()}
    assert report.max_abs_diff == 0.0
    # (d) state_dict keys, parameter objects and block types unchanged
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == parameters
    assert type(model) is layout[0][1]
    # (c) eval outputs bitwise equal after add
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # (b) same weights, same seed: the same training-mode outputs as timm's native model
    assert_same_training_output(native, model, x, seed=123)

    pathsurgeon.strip(model)
    # (e) nothing of pathsurgeon left; the module tree is what it was
    assert pathsurgeon_leftovers(model) == []
    assert module_layout(model) == layout
    assert list(model.state_dict()) == keys
    model.eval()
    with torch.no_grad():
        # BatchNorm running stats moved during the training forward above; compare with native's
        native.eval()
        assert torch.equal(model(x), native(x))
    return report


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("swin_tiny_patch4_window7_224", FAMILIES["swin_transformer"][1]),
        ("nest_tiny", FAMILIES["nest"][1]),
        ("focalnet_tiny_srf", FAMILIES["focalnet"][1]),
    ],
)
def test_default_rate_is_re_rated_not_stacked(name, overrides):
    """Families built with a non-zero default rate already carry DropPath; add() replaces, never stacks."""
    default = _build(name, overrides, None)  # timm's own default rate (0.1 for Swin / FocalNet, 0.5 NesT)
    native = _build(name, overrides, RATE)
    x = _inputs(default, 64)
    assert parent_rates(called_drop_paths(default, x)), "expected this family to default to drop path"
    layout = module_layout(default)

    pathsurgeon.add(default, RATE, example_inputs=x)

    assert {(b.block, round(b.rate, 6)) for b in pathsurgeon.find(default) if b.rate > 0} == parent_rates(
        called_drop_paths(copy.deepcopy(native), x)
    )
    # exactly one drop per branch: no timm DropPath left beside ours
    from timm.layers import DropPath as TimmDropPath

    assert not any(isinstance(m, TimmDropPath) for m in default.modules())
    assert_same_training_output(native, default, x, seed=7)

    pathsurgeon.strip(default)
    assert module_layout(default) == layout  # timm's DropPath modules are back
    assert parent_rates(called_drop_paths(default, x)) != set()


@pytest.mark.slow
def test_vit_base_has_24_branches_with_linear_rates():
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    report = pathsurgeon.add(model, 0.1)
    assert len(report.branches) == 24
    assert report.blocks == [f"blocks.{i}" for i in range(12)]
    expected = torch.linspace(0, 0.1, 12).tolist()
    for branch in report.branches:
        assert branch.index == int(branch.block.split(".")[1])
        assert branch.rate == pytest.approx(expected[branch.index], abs=1e-9)
    assert report.max_abs_diff == 0.0
