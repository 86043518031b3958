"""torch.fx and TorchScript on surgered models: the checks timm's own tests/test_models.py runs.

``_create_fx_model`` is timm's helper (tests/test_models.py) word for word: torchvision's feature
extraction with timm's leaf registries, tracing the model in train and in eval mode. Each check is run on
a model with slots (timm ViT: pathsurgeon's DropPath in timm's Identity slots) and on models with hooks
(torchvision ResNet: hooks on a leaf module, BatchNorm; torchvision MobileNetV3: hooks on a Sequential,
which torch.fx traces through), in every mode.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from conftest import pathsurgeon_leftovers, supported_from

try:  # timm's registries of what torch.fx must not trace into (before 1.0.10 or so: in timm.models)
    from timm.layers import get_notrace_functions, get_notrace_modules
except ImportError:
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import pathsurgeon
from pathsurgeon import changes, skipping

MODES = ("sample", "skip", "batch")
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                     param_shapes_constant=True)


def _create_fx_model(model, train=False):
    """timm's tests/test_models.py ``_create_fx_model``, unchanged."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER_KWARGS)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = NodePathTracer(**TRACER_KWARGS)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=TRACER_KWARGS)


def _outputs(fx_model, x):
    return torch.cat(tuple(fx_model(x).values()))


BUILDERS = {
    # slots: timm puts nn.Identity where DropPath goes; a Gather pre-hook on each branch's first (leaf) module
    # in modes 'skip' and 'batch'
    "timm-vit": lambda **kw: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                               **kw),
    # hooks on the last BatchNorm of each branch: a leaf, so the hook runs when the traced module calls it
    "tv-resnet18": lambda **kw: torchvision.models.resnet18(**kw),
    # hooks on a Sequential (the whole branch): torch.fx traces through it and the drop goes into the graph
    "tv-mobilenet_v3_small": lambda **kw: torchvision.models.mobilenet_v3_small(**kw),
}
MECHANISM = {"timm-vit": "slot", "tv-resnet18": "hook", "tv-mobilenet_v3_small": "hook"}


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _pair(name, mode, x, rate=0.5, **kw):
    """(untouched, surgered): the same weights, the second surgered at ``rate`` in ``mode``."""
    torch.manual_seed(0)
    untouched = BUILDERS[name](**kw).eval()
    torch.manual_seed(0)
    model = BUILDERS[name](**kw).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so a wrong drop shows
        for a, b in zip(untouched.buffers(), model.buffers(), strict=True):
            if a.is_floating_point():
                a.uniform_(0.5, 1.5)
                b.copy_(a)
    report = pathsurgeon.add(model, rate, mode=mode, example_inputs=x[:2])
    assert {b.mechanism for b in report.branches} == {MECHANISM[name]}
    return untouched, model


def _train_output(module, x, seed=1):
    module.train()
    torch.manual_seed(seed)
    return module(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_timm_fx_forward_check_and_drop_kept_in_the_traced_module(name, mode, x):
    untouched, model = _pair(name, mode, x)
    # timm's test_model_forward_fx: the eval graph's output equals the model's, bitwise
    with torch.inference_mode():
        fx_model = _create_fx_model(model.eval())
        assert torch.equal(_outputs(fx_model, x), model(x))
        assert torch.equal(_outputs(fx_model, x), untouched(x))
    # the train graph drops as the eager surgered model does: the same masks under one seed
    eager = _train_output(model, x)
    traced = torch.cat(tuple(_train_output(fx_model, x).values()))
    assert torch.equal(traced, eager)
    assert not torch.equal(eager, _train_output(untouched, x))  # the drop is really there
    # strip of the original still works after tracing, and leaves nothing behind
    pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
    untouched.load_state_dict(model.state_dict())  # the training forwards moved BatchNorm statistics
    with torch.no_grad():
        assert torch.equal(model.eval()(x), untouched.eval()(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_timm_fx_backward_check(name, mode, x):
    """timm's test_model_backward_fx: every parameter of the traced train graph gets a gradient."""
    _, model = _pair(name, mode, x, num_classes=42)
    fx_model = _create_fx_model(model.train(), train=True)
    outputs = torch.cat(tuple(fx_model(x[:2]).values()))
    outputs.mean().backward()
    num_params = sum(p.numel() for p in fx_model.parameters())
    assert all(p.grad is not None for p in fx_model.parameters())
    assert num_params == sum(p.grad.numel() for p in fx_model.parameters())
    assert outputs.shape[-1] == 42
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("draw", ["bernoulli", "uniform_floor"])
@pytest.mark.parametrize("mode", MODES)
def test_a_hook_traced_through_draws_what_eager_draws(mode, draw):
    """A hook on a module torch.fx traces through writes the drop into the graph: the same draws as the
    eager hook, in every mode and with both mask draws, and nothing in eval."""
    branch = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    drop = pathsurgeon.DropPath(0.4, mode=mode, draw=draw)
    branch.register_forward_hook(changes.BranchHook(drop))
    model = torch.nn.Sequential(branch)  # torch.fx calls the root's forward, not its hooks
    x = torch.randn(16, 3, 4)
    traced = torch.fx.symbolic_trace(model.train())
    assert any(n.target == "bernoulli_" or n.target == "uniform_" for n in traced.graph.nodes)
    for seed in range(4):
        assert torch.equal(_train_output(traced, x, seed), _train_output(model, x, seed)), seed
    assert torch.equal(torch.fx.symbolic_trace(model.eval())(x), branch[1](branch[0](x)))


def test_symbolic_trace_in_eval_keeps_the_slot_drop_for_training(x):
    """A slot DropPath is one call_module node in any graph, so a module traced in eval mode still drops
    once put in training mode, and follows set_rate."""
    _, model = _pair("timm-vit", "sample", x)
    graph_module = torch.fx.symbolic_trace(model.eval())
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_module" and "drop_path" in n.target] == [
        "blocks.0.drop_path1", "blocks.0.drop_path2", "blocks.1.drop_path1", "blocks.1.drop_path2"]
    assert torch.equal(_train_output(graph_module, x), _train_output(model, x))
    pathsurgeon.set_rate(model, 0.0)
    graph_module.eval()
    with torch.no_grad():
        assert torch.equal(_train_output(graph_module, x), model.eval()(x))


def test_torchvision_feature_extraction_on_a_surgered_backbone(x):
    """torchvision's own API (default tracer, no timm leaves) on a surgered torchvision ResNet backbone:
    intermediate features equal the eager model's, in eval and, under one seed, in training."""
    untouched, model = _pair("tv-resnet18", "sample", x)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == get_graph_node_names(untouched)[0] and eval_nodes == get_graph_node_names(untouched)[1]
    extractor = create_feature_extractor(model, return_nodes={"layer2": "c3", "layer4": "c5"})
    reference = create_feature_extractor(untouched, return_nodes={"layer2": "c3", "layer4": "c5"})
    with torch.no_grad():
        got, want = extractor.eval()(x), reference.eval()(x)
        assert all(torch.equal(got[k], want[k]) for k in ("c3", "c5"))
    seen = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("c5", o))
    try:
        _train_output(model, x)
    finally:
        handle.remove()
    assert torch.equal(_train_output(extractor, x)["c5"], seen["c5"])
    assert not torch.equal(seen["c5"], _train_output(reference, x)["c5"])


@pytest.mark.parametrize("mode", [
    pytest.param(mode, marks=supported_from("torch", "2.14", "TorchScript meets the Python hooks of skip and batch"))
    if mode in ("skip", "batch") else mode for mode in MODES
])
def test_timm_torchscript_checks_on_slots(mode, x):
    """timm's test_model_forward_torchscript and test_model_forward_fx_torchscript on the slot model:
    eval outputs equal the untouched model's; in training the scripted DropPath drops with the eager
    model's masks (mode 'sample'; in modes 'skip' and 'batch' the Python pre-hooks refuse, by name)."""
    untouched, model = _pair("timm-vit", mode, x)
    fx_scripted = torch.jit.script(_create_fx_model(model.eval()))
    with torch.inference_mode():
        assert torch.equal(_outputs(fx_scripted, x), untouched(x))
    if mode != "sample":
        with pytest.raises(pathsurgeon.ScriptingError, match="mode='sample'"):
            torch.jit.script(model)
        return
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        assert torch.equal(scripted.eval()(x), untouched(x))
    assert torch.equal(_train_output(scripted, x), _train_output(model, x))
    pathsurgeon.set_rate(model, 0.0)  # a scripted module is a copy: its rate stays what it was scripted with
    assert not torch.equal(_train_output(scripted, x), _train_output(model, x))


def test_scripted_drop_path_matches_timms_in_every_mode():
    """The TorchScript forward draws as the eager one: per sample in modes 'sample' and 'skip' (timm's
    draw), once per batch on the CPU generator in mode 'batch'."""
    x = torch.randn(8, 5, 3)
    for mode in MODES:
        drop = pathsurgeon.DropPath(0.4, mode=mode).train()
        scripted = torch.jit.script(drop)
        for seed in range(6):
            torch.manual_seed(seed)
            eager = drop(x)
            torch.manual_seed(seed)
            assert torch.equal(scripted(x), eager), (mode, seed)
    assert torch.equal(torch.jit.script(pathsurgeon.DropPath(0.4).eval())(x), x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv-resnet18", "tv-mobilenet_v3_small"])
def test_torchscript_refuses_hooks_by_name_and_scripting_works_after_strip(name, x):
    untouched, model = _pair(name, "sample", x)
    with pytest.raises(pathsurgeon.ScriptingError, match=r"pathsurgeon\.strip\(model\)"):
        torch.jit.script(model)
    # the failed attempt changed nothing: the model still drops, and strip leaves a scriptable model
    assert pathsurgeon.is_surgered(model)
    assert torch.equal(_train_output(torch.fx.symbolic_trace(model.train()), x), _train_output(model, x))
    pathsurgeon.strip(model)
    untouched.load_state_dict(model.state_dict())  # the training forwards moved BatchNorm statistics
    with torch.inference_mode():
        assert torch.equal(torch.jit.script(model).eval()(x), untouched.eval()(x))


@pytest.mark.slow
def test_a_failed_script_leaves_later_scripting_working(x):
    """After a refusal, scripting a surgered slot model in the same process still works (no half-compiled
    DropPath properties: "Can't redefine method: __drop_prob_getter")."""
    _, hooked = _pair("tv-resnet18", "sample", x)
    with pytest.raises(pathsurgeon.ScriptingError):
        torch.jit.script(hooked)
    _, skipping_model = _pair("timm-vit", "skip", x)
    with pytest.raises(pathsurgeon.ScriptingError):
        torch.jit.script(skipping_model)
    for _ in range(2):
        untouched, model = _pair("timm-vit", "sample", x)
        with torch.inference_mode():
            assert torch.equal(torch.jit.script(model).eval()(x), untouched(x))


def test_scripting_error_is_an_attribute_error_for_probes():
    """Code probing a hook with getattr(hook, "__name__", default) keeps getting its default."""
    drop = pathsurgeon.DropPath(0.1)
    for hook in (changes.BranchHook(drop), skipping.Gather(drop)):
        assert getattr(hook, "__name__", "default") == "default"


@pytest.mark.slow
def test_timm_torchscript_with_features_fx(x):
    """timm's test_model_forward_torchscript_with_features_fx, on a surgered features_only fx model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("regnetx_002", pretrained=False, features_only=True,
                                  feature_cfg={"feature_cls": "fx"}).eval()
    pathsurgeon.add(model, 0.2, example_inputs=x[:2])
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        outputs = scripted(x)
        reference = model(x)
    assert isinstance(outputs, list)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
