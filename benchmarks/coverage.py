"""Coverage sweep: does pathsurgeon give exactly what the library builds, on every model it has?

Not a test (hours on 2 cores). For every timm model whose constructor takes ``drop_path_rate``, every
torchvision classification builder and every Hugging Face class in transformers' image-classification
and backbone auto-mappings, it builds the model twice with the same weights — natively at rate R
(the library's own stochastic depth) and at rate 0, which pathsurgeon then surgers at R — and checks:

- placement and rates: the drop-path slots pathsurgeon fills, with their rates, are exactly the
  library's drop-path modules that a training forward calls (with a rate > 0), bitwise;
- eval outputs bitwise equal after ``add``; train-mode outputs equal the native model's under each of
  three seeds (atol 1e-6), on *livened* weights (:func:`liven`: timm zero-inits the last BatchNorm of ResNet-style
  branches and starts layer scales at 1e-6, which would let a model with no drop path pass) and only
  where the seeds move the native output (else the comparison has no power: a problem);
- ``set_rate`` to other rates gives the rates a library build at that rate has, bitwise, whatever the
  rates came from, and the training outputs of the library's model re-rated to them;
- ``strip`` gives back the module tree, ``state_dict`` keys and class, leaves no DropPath, hook or
  record, and leaves eval outputs bitwise unchanged (and equal to the native model's);
- timm: ``add`` with no ``example_inputs`` on ``timm.create_model(name)`` at its default input size.

A library drop-path site that is not a residual branch (its output is not added to a shortcut) is a
row with that reason, not a failure, once confirmed without the finder (zeroed, its block's output no
longer depends on the block input); timm ResNeSt drops the block input instead of the branch and has a
status of its own. Models the library builds without stochastic depth are surgered too (eval outputs
and ``strip``), timm's at their default size with no ``example_inputs``. timm and torchvision models
are built small where the constructor allows it (``img_size``; inputs of 64 to 224 pixels); Hugging
Face models from their default config with a small ``image_size`` where they take one; torchvision
and Hugging Face models are surgered without ``example_inputs`` (their default inputs are part of
what is checked).

    .venv/bin/python benchmarks/coverage.py --library timm --shard 1/8      # resumable: reruns skip done rows
    .venv/bin/python benchmarks/coverage.py --library torchvision
    .venv/bin/python benchmarks/coverage.py --library timm --models resnet26d,tresnet_m   # a re-check
    .venv/bin/python benchmarks/coverage.py --write-doc                    # docs/coverage.md from the results

Results are JSON lines in ``benchmarks/coverage_results/<library>-<i>of<n>.jsonl`` (``--models``:
``<library>-recheck.jsonl``, whose rows replace the shards' in the doc); each row records its commit and
the version of the checks it ran under (``checks``); each model runs in a worker process that is
replaced after a crash or a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

RATE = 0.2
OTHER_RATES = (0.4567, 0.0123, 0.8765)  # set_rate targets; none is a rate-law probe
MAX_PARAMETERS = 1.5e9  # two float32 copies would not leave room on a shared 24 GB machine
TIMEOUT_S = 900
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "coverage_results"
DOC = ROOT / "docs" / "coverage.md"
LIBRARIES = ("timm", "torchvision", "transformers")


# --- model lists ---------------------------------------------------------------------------------------

def model_names(library: str) -> list[str]:
    if library == "timm":
        import timm

        return sorted(timm.list_models())
    if library == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models(module=torchvision.models))
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES):
        for key, classes in mapping.items():
            for cls in classes if isinstance(classes, tuple) else (classes,):
                names.add(f"{key}:{cls}")
    return sorted(names)


def shard_of(names: list[str], shard: tuple[int, int]) -> list[str]:
    index, count = shard
    return names[index - 1::count]


# --- building ------------------------------------------------------------------------------------------

def _meta(build):
    from pathsurgeon.libraries import meta_build

    return meta_build(build)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_works(model, inputs) -> str | None:
    import torch

    try:
        with torch.no_grad():
            model.eval()
            if isinstance(inputs, dict):
                model(**inputs)
            else:
                model(inputs)
        return None
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {_line(error)}"


def _line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _share_weights(target, source) -> None:
    """Give ``target`` (same architecture) ``source``'s parameters and buffers, the very tensors."""
    import torch

    for name, parameter in source.named_parameters(remove_duplicate=False):
        owner, _, attribute = name.rpartition(".")
        target.get_submodule(owner)._parameters[attribute] = parameter
    for name, buffer in source.named_buffers(remove_duplicate=False):
        owner, _, attribute = name.rpartition(".")
        target.get_submodule(owner)._buffers[attribute] = buffer
    left = [n for n, t in (*target.named_parameters(), *target.named_buffers()) if t.device == torch.device("meta")]
    if left:
        raise RuntimeError(f"meta tensors left after sharing: {left[:3]}")


def _twin(build_at, source):
    """The model built at rate 0 with ``source``'s tensors: on meta then shared, else built for real."""
    import copy

    try:
        twin = _meta(lambda: build_at(0.0))
        _share_weights(twin, source)
        # attributes computed from tensors at init (caches) are not shared: compare on a forward later
        return twin
    except Exception:  # noqa: BLE001 - some constructors cannot run on meta; build for real
        twin = build_at(0.0)
        twin.load_state_dict(copy.deepcopy(source.state_dict()))
        return twin


# --- what the library does ------------------------------------------------------------------------------

def called_drop_paths(model, inputs) -> dict[str, float]:
    """{slot name: rate} of the drop-path modules a train-mode forward calls, with a rate > 0."""
    import torch

    from pathsurgeon import slots as slot_lib

    calls: dict[str, float] = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, slot_lib.existing_rate(m)))
        for name, module in model.named_modules()
        if slot_lib.is_drop_path_module(module)
    ]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return {name: rate for name, rate in calls.items() if rate > 0}


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _site_kinds(model, inputs, slots) -> dict[str, str]:
    """What the library does with each drop-path slot's output, judged on the captured graph.

    See :func:`_follow`; only 'add' is a residual branch (one pathsurgeon missed, if it did).
    """
    from pathsurgeon.capture import capture
    from pathsurgeon.inputs import example_inputs

    if not slots:
        return {}
    view = capture(model, example_inputs(model, inputs)).view
    kinds: dict[str, set[str]] = {slot: set() for slot in slots}
    for node, name in view.slot_calls.items():
        if name in kinds:
            kinds[name].add(_follow(view, node, name.rpartition(".")[0]))
    return {slot: "add" if "add" in k else "cat" if "cat" in k else "output" for slot, k in kinds.items()}


def _follow(view, node, parent: str) -> str:
    """Where a slot's output goes within its parent module (judged without the finder's verdict).

    Through scaling and layout ops only, into an add: 'add' (the end of a residual branch);
    through other compute into an add: 'shortcut' (timm ResNeSt drops the block input, which its
    downsampling shortcut then reads); into a concatenation: 'cat'; otherwise 'output'.
    """
    from pathsurgeon import finder

    current, light = node, True
    for _ in range(finder.MAX_SCALE_HOPS + 4):
        users = list(current.users)
        if len(users) != 1 or (parent and parent not in view.module_stack.get(users[0], ())):
            return "output"
        user = users[0]
        if finder._is_add(user):
            return "add" if light else "shortcut"
        if "cat" in str(user.target):
            return "cat"
        light = light and (finder._is_scale(user) or finder._is_slice(user) or user in view.scale_calls)
        current = user
    return "output"


# --- one model -------------------------------------------------------------------------------------------

def _row(library: str, name: str, status: str, reason: str = "", **extra) -> dict:
    return {"library": library, "model": name, "status": status, "reason": reason, **extra}


def check_model(library: str, name: str) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    start = time.perf_counter()
    try:
        check = {"timm": _check_timm, "torchvision": _check_torchvision, "transformers": _check_transformers}
        row = check[library](name)
    except Exception as error:  # noqa: BLE001 - a row, not a crash
        row = _row(library, name, "error", f"{type(error).__name__}: {_line(error)}",
                   trace=traceback.format_exc(limit=-4)[-1500:])
    row["seconds"] = round(time.perf_counter() - start, 1)
    row.setdefault("checks", CHECKS)
    return row


def _check_timm(name: str) -> dict:
    import inspect

    import timm
    import torch

    def build(rate, **kwargs):
        return timm.create_model(name, pretrained=False, drop_path_rate=rate, **kwargs)

    try:
        meta = _meta(lambda: build(RATE))
    except TypeError as error:
        if "drop_path_rate" in str(error):
            return _no_drop_path_timm(name, "the constructor takes no drop_path_rate")
        raise
    cls = type(meta)
    if "drop_path_rate" not in inspect.signature(cls.__init__).parameters and not any(
        type(m).__name__ == "DropPath" for m in meta.modules()
    ):
        return _no_drop_path_timm(name, "the constructor ignores drop_path_rate")
    parameters = _parameters(meta)
    if parameters > MAX_PARAMETERS:
        return _row("timm", name, "skipped",
                    f"{parameters / 1e9:.1f}B parameters: over the {MAX_PARAMETERS / 1e9:.1f}B this sweep builds "
                    "on a shared 24 GB, 2-core machine",
                    parameters=parameters)
    takes_size = "img_size" in inspect.signature(cls.__init__).parameters
    channels, *default = meta.pretrained_cfg["input_size"]
    attempts = []
    sizes = [64, 96, 128, 160, 192, 224, 256] if takes_size else [64, 96, 128, 224]
    sizes += [tuple(default)]
    chosen = None
    while sizes:
        size = sizes.pop(0)
        hw = (size, size) if isinstance(size, int) else size
        kwargs = {"img_size": hw} if takes_size and isinstance(size, int) else {}
        x = torch.randn(2, channels, *hw, generator=torch.Generator().manual_seed(1))
        try:
            probe = _meta(lambda kwargs=kwargs: build(RATE, **kwargs))
            error = _forward_works(probe, x.to("meta"))
        except Exception as problem:  # noqa: BLE001
            error = f"{type(problem).__name__}: {_line(problem)}"
        if error is not None and "meta" not in error.lower():
            attempts.append(f"{hw}: {error}")
            continue
        if kwargs and not _identifiable(probe):
            # the model keeps no trace of its img_size, so timm cannot be asked; build it at its default
            attempts.append(f"{hw}: built at this img_size timm cannot rebuild it")
            sizes = sizes[-1:]
            continue
        torch.manual_seed(0)
        native = build(RATE, **kwargs)
        error = _forward_works(native, x)
        if error is None:
            chosen = (kwargs, x, native)
            break
        attempts.append(f"{hw}: {error}")
        del native
    if chosen is None:
        return _row("timm", name, "error", f"no input size works: {attempts[-1] if attempts else '?'}")
    kwargs, x, native = chosen
    model = _twin(lambda rate: build(rate, **kwargs), native)
    row = _compare("timm", name, native, model, x, lambda rate: _meta(lambda: build(rate, **kwargs)),
                   example_inputs=x)
    row["size"] = list(x.shape[-2:])
    row["parameters"] = parameters
    if row.get("default_inputs") is None:
        del native, model
        row["default_inputs"], problem = _default_size(lambda: timm.create_model(name, pretrained=False), parameters)
        if problem:
            row["status"] = "differs"
            row["reason"] = "; ".join(filter(None, [problem, row["reason"]]))
    return row


def _no_drop_path_timm(name: str, why: str) -> dict:
    """A timm model built without stochastic depth: add (hooks), eval outputs and strip, at its default
    input size with no example_inputs (the inputs pathsurgeon makes from what timm states)."""
    import timm
    import torch

    parameters = _parameters(_meta(lambda: timm.create_model(name, pretrained=False)))
    if parameters > DEFAULT_SIZE_MAX_PARAMETERS:
        return _row("timm", name, "skipped", f"{why}; {parameters / 1e6:.0f}M parameters, over the "
                    f"{DEFAULT_SIZE_MAX_PARAMETERS / 1e6:.0f}M this sweep builds at the default size",
                    parameters=parameters, checks=CHECKS)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    row = _invariants_only("timm", name, model, why)
    row["parameters"] = parameters
    return row


def _identifiable(model) -> bool:
    from pathsurgeon.libraries import RebuildError, identify_constructor

    try:
        identify_constructor(model)
        return True
    except RebuildError:
        return False


def _check_torchvision(name: str) -> dict:
    import inspect

    import torch
    import torchvision

    from pathsurgeon.inputs import example_inputs

    builder = torchvision.models.get_model_builder(name)
    meta = _meta(builder)
    cls = type(meta)
    if "stochastic_depth_prob" not in inspect.signature(cls.__init__).parameters:
        # no stochastic depth in torchvision: pathsurgeon adds it with hooks; check the invariants only
        torch.manual_seed(0)
        model = builder(num_classes=10)
        return _invariants_only("torchvision", name, model, "torchvision builds no stochastic depth into it")
    from pathsurgeon.libraries.torchvision import _class_call

    args, kwargs = _class_call(builder, {"num_classes": 10}, cls)

    def build(rate):
        return cls(*args, **{**kwargs, "stochastic_depth_prob": rate})

    torch.manual_seed(0)
    native = build(RATE)
    model = _twin(build, native)
    x = example_inputs(model).args[0]
    return _compare("torchvision", name, native, model, x, lambda rate: _meta(lambda: build(rate)),
                    example_inputs=None)


# Hugging Face classes whose default config does not build or is far too big for CPU: a config that does.
HF_CONFIGS = {
    "ConvNextBackbone": {"out_indices": [1, 2, 3, 4]},
    "ConvNextV2Backbone": {"out_indices": [1, 2, 3, 4]},
    "FocalNetBackbone": {"out_indices": [1, 2, 3, 4]},
    # transformers' defaults give 261 / 322 query channels for 8 cross-attention heads
    "PerceiverForImageClassificationConvProcessing": {"num_cross_attention_heads": 1},
    "PerceiverForImageClassificationFourier": {"num_cross_attention_heads": 1},
}
HF_SMALL_IMAGE = 64


def _hf_build(key: str, class_name: str, rate: float | None, small: bool):
    import transformers
    from transformers.models.auto import configuration_auto

    cls = getattr(transformers, class_name)
    config_cls = getattr(transformers, configuration_auto.CONFIG_MAPPING_NAMES[key])
    config = config_cls(**HF_CONFIGS.get(class_name, {}))
    for key_ in ("hidden_sizes", "depths"):  # a tuple default breaks some backbones' list arithmetic
        if isinstance(getattr(config, key_, None), tuple):
            setattr(config, key_, list(getattr(config, key_)))
    for part in (config, getattr(config, "vision_config", None)):  # a combined config's tower too (tipsv2)
        if small and isinstance(getattr(part, "image_size", None), (int, list, tuple)):
            size = part.image_size
            part.image_size = HF_SMALL_IMAGE if isinstance(size, int) else [HF_SMALL_IMAGE, HF_SMALL_IMAGE]
    if rate is not None:
        _set_config_rate(config, rate)
    return cls, config


def _set_config_rate(config, rate: float) -> None:
    """The rate on the config and on each sub-config a part reads it from: Tipsv2VisionBackbone builds
    from a combined config's ``vision_config`` and never reads the combined config's rate."""
    config.drop_path_rate = rate
    for key in ("vision_config", "backbone_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "drop_path_rate"):
            sub.drop_path_rate = rate


def _check_transformers(name: str) -> dict:
    import torch

    from pathsurgeon.inputs import example_inputs

    key, class_name = name.split(":")
    try:
        cls, config = _hf_build(key, class_name, None, small=False)
        meta = _meta(lambda: cls(config))
    except ImportError as error:  # a model that needs another package (natten for DiNAT)
        return _row("transformers", name, "skipped", f"needs a package not installed here: {_line(error)[:120]}")
    except Exception as error:  # noqa: BLE001 - transformers' own default config does not build
        if "backbone is not set" in str(error):
            return _row("transformers", name, "skipped", "wraps a timm model named in its config (the timm rows)")
        return _row("transformers", name, "skipped",
                    f"its default config does not build in transformers: {type(error).__name__}: {_line(error)}")
    from pathsurgeon.libraries.transformers import candidates

    constructor = candidates(meta)[0]
    takes_rate = constructor.rate_argument is not None
    parameters = _parameters(meta)
    if parameters > MAX_PARAMETERS:
        return _row("transformers", name, "skipped",
                    f"{parameters / 1e9:.1f}B parameters in its smallest default config", parameters=parameters)
    model = None
    for small in (True, False):
        cls, config = _hf_build(key, class_name, RATE if takes_rate else None, small)
        torch.manual_seed(0)
        try:
            candidate = cls(config)
            inputs = example_inputs(candidate).kwargs or example_inputs(candidate).args[0]
            error = _forward_works(candidate, inputs)
        except Exception as problem:  # noqa: BLE001
            error = f"{type(problem).__name__}: {_line(problem)}"
        if error is None:
            model = candidate
            break
    if model is None:
        return _row("transformers", name, "error", f"does not build and run from its default config: {error}")
    if not takes_rate:
        return _invariants_only("transformers", name, model, f"no native drop path ({constructor.why_no_rate})")

    def build(rate):
        c = type(config).from_dict(config.to_dict())
        _set_config_rate(c, rate)
        return cls(c)

    native = model
    twin = _twin(build, native)
    return _compare("transformers", name, native, twin, inputs, lambda rate: _meta(lambda: build(rate)),
                    example_inputs=None, parameters=parameters)


def _outputs(model, inputs):
    from pathsurgeon.verify import tensor_leaves

    return tensor_leaves(_call(model, inputs))


def _invariants_only(library: str, name: str, model, why: str, example_inputs=None) -> dict:
    """A model its library builds without stochastic depth (or calls none at this rate): ``add`` (hooks),
    eval outputs bitwise, ``strip`` (tree, keys, no module / hook / record left, eval outputs), on livened
    weights. Without ``example_inputs``, on the inputs pathsurgeon makes (the model's default size)."""
    import torch

    import pathsurgeon
    from pathsurgeon.inputs import example_inputs as made_inputs

    liven(model)
    made = made_inputs(model, example_inputs)
    inputs = made.kwargs or made.args[0]
    size = _shape_of(made)
    model.eval()
    layout = [(n, type(m)) for n, m in model.named_modules()]
    keys = list(model.state_dict())
    with torch.no_grad():
        before = _outputs(model, inputs)
    try:
        report = pathsurgeon.add(model, RATE, example_inputs=example_inputs)
    except pathsurgeon.NoBranchesError:
        return _row(library, name, "no drop path", f"{why}; no residual branch either (add says so)", size=size,
                    default_inputs=(f"no residual branch at {size}" if example_inputs is None else None),
                    checks=CHECKS)
    except pathsurgeon.PathSurgeonError as error:
        return _row(library, name, "differs", f"{why}; add fails: {type(error).__name__}: {_line(error)}",
                    size=size, checks=CHECKS)
    problems = []
    if report.max_abs_diff != 0.0:
        problems.append(f"eval outputs changed by {report.max_abs_diff:g}")
    with torch.no_grad():
        if not all(torch.equal(a, b) for a, b in zip(before, _outputs(model, inputs), strict=True)):
            problems.append("eval outputs changed")
    _check_strip(model, layout, keys, None, inputs, problems)
    held = [s for s in report.left_alone if "is also called off the residual branch" in s.reason]
    status = "differs" if problems else "not residual" if held else "no drop path"
    reason = "; ".join(problems) if problems else f"{why}; pathsurgeon adds it on {len(report.branches)} branches"
    if held and not problems:
        reason = (f"the library calls its drop path off the residual branch too ({held[0].reason.split(' (')[0]}, "
                  f"...): pathsurgeon hooks the {len(report.branches)} residual branches and holds the library's "
                  f"{len(held)} drop paths at rate 0")
    return _row(library, name, status, reason, rates_from=report.rates_from, branches=len(report.branches),
                size=size, default_inputs=(f"ok at {size}" if example_inputs is None else None), checks=CHECKS)


def _shape_of(made) -> list[int] | None:
    import torch

    first = next((v for v in (*made.args, *made.kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return list(first.shape[1:]) if first is not None else None


DEFAULT_SIZE_MAX_PARAMETERS = 350e6  # a default-size build and two forwards of one sample fit on a shared machine


def _default_size(build, parameters: int) -> tuple[str, str | None]:
    """``add(model, RATE)`` with no ``example_inputs`` on the model as its library builds it by default
    (the size pathsurgeon's made-up inputs take). Returns (what happened, a problem or None)."""
    import gc

    import torch

    import pathsurgeon
    from pathsurgeon.inputs import example_inputs

    if parameters > DEFAULT_SIZE_MAX_PARAMETERS:
        return (f"not run: {parameters / 1e6:.0f}M parameters, over the {DEFAULT_SIZE_MAX_PARAMETERS / 1e6:.0f}M "
                "this shared machine builds a second time", None)
    gc.collect()
    torch.manual_seed(0)
    model = build()
    try:
        size = _shape_of(example_inputs(model))
    except pathsurgeon.PathSurgeonError as error:
        return "no inputs made", f"no default inputs: {_line(error)}"
    try:
        report = pathsurgeon.add(model, RATE)
    except pathsurgeon.NoBranchesError:
        return f"no residual branch at {size} (add says so)", None
    except Exception as error:  # noqa: BLE001 - a row, not a crash
        return (f"fails at {size}",
                f"add without example_inputs fails at the default input size {size}: {type(error).__name__}: "
                f"{_line(error)[:160]}")
    if report.max_abs_diff != 0.0:
        return f"eval Δ at {size}", f"add without example_inputs changes eval outputs at {size}"
    pathsurgeon.strip(model)
    return f"ok at {size}", None


def _compare(library, name, native, model, x, rebuild, example_inputs, parameters=None) -> dict:
    """The parity checks between the library's native model and pathsurgeon on the rate-0 twin."""
    import torch

    import pathsurgeon
    from pathsurgeon.changes import record_of as _record

    shared = _shares_tensors(native, model)
    liven(native)  # before anything: eval and training outputs are compared on branches that compute
    if not shared:
        liven(model)
    native.eval()
    model.eval()
    layout = [(n, type(m)) for n, m in model.named_modules()]
    keys = list(model.state_dict())
    expected = called_drop_paths(native, x)  # a train-mode forward: moves the (shared) BatchNorm statistics
    with torch.no_grad():
        before = _outputs(model, x)
    if not expected:
        return _invariants_only(library, name, model, "the library calls no drop path at this rate",
                                example_inputs=example_inputs)

    text = {"cat": "concatenated features", "output": "an output not added to a shortcut",
            "shortcut": "the input of a shortcut"}
    try:
        report = pathsurgeon.add(model, RATE, example_inputs=example_inputs)
    except pathsurgeon.NoBranchesError:
        kinds = _site_kinds(native, x, list(expected))
        if "add" not in kinds.values():
            shown = ", ".join(text[k] for k in sorted(set(kinds.values())))
            unconfirmed = _not_independent(native, x, list(kinds))
            if unconfirmed:
                return _row(library, name, "differs", f"no residual branch found, but with the library's site "
                            f"{unconfirmed[0]} zeroed its block's output still depends on the block input "
                            f"({len(unconfirmed)} such sites): a residual branch the finder missed?")
            return _row(library, name, "not residual", f"no residual branch; the library drops {len(kinds)} "
                        f"sites that are not residual branches ({shown}; e.g. {sorted(kinds)[0]}); each confirmed: "
                        "with it zeroed, its block's output no longer depends on the block input")
        raise
    ours = {b.target: b.rate for b in report.branches if b.mechanism == "slot" and b.rate > 0}
    hooked = [b for b in report.branches if b.mechanism == "hook" and b.rate > 0]
    problems, notes = [], []
    missing = {s: r for s, r in expected.items() if s not in ours}
    extra = {s: r for s, r in ours.items() if s not in expected}
    kinds = _site_kinds(native, x, list(missing))
    not_residual = {slot: kind for slot, kind in kinds.items() if kind != "add"}
    missing = {s: r for s, r in missing.items() if s not in not_residual}
    by_design = bool(hooked) and len(not_residual) == len(expected)  # timm ResNeSt: see PLACEMENT_BY_DESIGN
    if hooked and not by_design:
        problems.append(f"pathsurgeon hooks {len(hooked)} branches of a model whose library drops residual branches")
    # each site called not residual, confirmed without the finder: zeroed, its block forgets the block input
    unconfirmed = [s for s in _not_independent(native, x, [s for s, k in not_residual.items() if k == "output"])
                   if not by_design]
    if unconfirmed:
        problems.append(f"the library's site {unconfirmed[0]} was judged not residual, but with it zeroed its "
                        f"block's output still depends on the block input ({len(unconfirmed)} such sites)")
    if missing:
        problems.append(f"library drops {len(missing)} sites pathsurgeon does not (e.g. {sorted(missing)[0]})")
    if extra:
        problems.append(f"pathsurgeon drops {len(extra)} sites the library does not (e.g. {sorted(extra)[0]})")
    wrong = [s for s in ours.keys() & expected.keys() if ours[s] != expected[s]]
    if wrong:
        s = sorted(wrong)[0]
        problems.append(f"{len(wrong)} rates differ (e.g. {s}: {ours[s]!r} vs the library's {expected[s]!r})")
    if report.max_abs_diff != 0.0:
        problems.append(f"eval outputs changed by {report.max_abs_diff:g}")
    with torch.no_grad():
        after = _outputs(model, x)
    if not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        problems.append("eval outputs changed after add")
    # training outputs under one seed, on livened weights, where the seed moves the library's output;
    # placement by design: the library at its own sites against pathsurgeon's, a difference shown, not judged
    training = _training_difference(native, model, x, {} if by_design else not_residual,
                                    [] if by_design else problems, at="")
    if by_design:
        notes.append(f"{PLACEMENT_BY_DESIGN} (the library drops {len(not_residual)} sites that are "
                     f"{', '.join(sorted({text[k] for k in not_residual.values()}))}, e.g. {sorted(not_residual)[0]}; "
                     f"pathsurgeon drops the {len(hooked)} residual branches, e.g. {hooked[0].target}); "
                     f"training outputs differ by {training}")
        training = f"{training} (by design)"
    # set_rate to another rate: the library's rates at that rate, bitwise, and its training outputs
    record = _record(model)
    slot_targets = [c.target for c in record.changes if c.hooked is None]
    set_rate = "not checked: every branch is hooked (the library has no slot to compare)"
    for other in OTHER_RATES if slot_targets else ():
        pathsurgeon.set_rate(model, other)
        want = _slot_values(rebuild(other), slot_targets)
        got = {c.target: c.drop.rate for c in record.changes if c.hooked is None}
        if got != want:
            s = next(s for s in slot_targets if got[s] != want[s])
            problems.append(f"set_rate({other}) gives {s} {got[s]!r}, the library {want[s]!r}"
                            + ("" if report.rates_from in LIBRARY_RATES else f" (rates from {report.rates_from})"))
            break
        set_rate = f"rates at {len(OTHER_RATES)} rates"
    if slot_targets and not by_design and set_rate.startswith("rates"):
        other = OTHER_RATES[0]
        pathsurgeon.set_rate(model, other)
        library_slots = list(expected)
        with _rates_set(native, _slot_values(rebuild(other), library_slots)):
            moved = _training_difference(native, model, x, not_residual, problems, at=f" after set_rate({other})")
        set_rate += f"; training Δ {moved} at {other}"
    pathsurgeon.set_rate(model, RATE)
    laws = record.library.laws if record.library is not None else {}
    if laws and not all(laws.values()):
        notes.append(f"{sum(1 for v in laws.values() if v is None)} slots fit no rate law (set_rate replays)")
    native.eval()
    model.eval()
    _check_strip(model, layout, keys, native if shared else None, x, problems)
    if not_residual and not by_design:
        kinds = sorted(set(not_residual.values()))
        notes.insert(0, f"the library also drops {len(not_residual)} sites that are not residual branches "
                        f"({', '.join(text[k] for k in kinds)}; e.g. {sorted(not_residual)[0]}); each confirmed: "
                        "with it zeroed, its block's output no longer depends on the block input")
    if problems:
        status = "differs"
    elif by_design:
        status = "placement differs by design"
    elif not_residual:
        status = "not residual"
    else:
        status = "agrees"
    return _row(library, name, status, "; ".join(problems + notes), rates_from=report.rates_from,
                branches=len(report.branches), library_sites=len(expected), training=training, set_rate=set_rate,
                method=report.method, rates_note=report.rates_note, parameters=parameters, checks=CHECKS)


LIBRARY_RATES = ("timm constructor", "torchvision builder", "transformers config")
PLACEMENT_BY_DESIGN = "placement differs by design: the library drops the block input, pathsurgeon the branch"
POWER = 1e-4  # a training output the seed moves by less than this cannot tell a drop path from none
SEEDS = (123, 124, 125)  # training outputs compared under each; the power is how far they move the library's
MORE_SEEDS = tuple(range(126, 136))  # then these, one by one, until the seeds move it (a few small rates may
#                                      keep every branch of a batch of 2 under three seeds: cspnext_tiny)
CURRENT = 2  # rows from this version on are "current checks" in the doc
CHECKS = 3  # version of the checks a row ran under (2: issue 18: livened weights, set_rate, strip, ...; 3: three seeds)


def liven(model, seed: int = 0):
    """Give the parameters a fresh model starts at (near) zero real values, in place (as tests/conftest.py).

    timm zero-inits the last BatchNorm of each ResNet / RegNet / ByobNet branch and NFNet's skip gains,
    and starts layer scales at 1e-6: on a fresh model such a branch adds (almost) nothing, and a model
    with no drop path at all would match one with it in training mode. Values come from a generator
    seeded with ``seed`` in ``named_parameters`` order: two models of one architecture get the same.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.is_floating_point() and parameter.numel() and float(parameter.abs().max()) < 1e-3:
                values = torch.empty(parameter.shape).uniform_(0.5, 1.5, generator=generator)
                parameter.copy_(values.to(parameter.dtype))
    return model


def _shares_tensors(native, model) -> bool:
    ours = {id(p) for p in model.parameters()}
    return bool(ours) and all(id(p) in ours for p in native.parameters())


def _training_difference(native, model, x, not_residual, problems: list, at: str) -> str:
    """Max |Δ| of the training outputs under each of :data:`SEEDS`; a problem when above 1e-6 or when
    the seeds do not move the library's own output (the comparison would pass with no drop path at all)."""
    import torch

    native.train()
    model.train()
    try:
        worst, power, first, seeds = 0.0, 0.0, None, 0
        with torch.no_grad(), _rate_zero(native, not_residual):
            for seed in (*SEEDS, *MORE_SEEDS):  # with small rates one seed may keep every branch of a small batch
                if seed in MORE_SEEDS and power > POWER:
                    break
                seeds = seed - SEEDS[0] + 1
                torch.manual_seed(seed)
                reference = _outputs(native, x)
                torch.manual_seed(seed)
                worst = max(worst, _largest_difference(reference, _outputs(model, x)))
                first = reference if first is None else first
                power = max(power, _largest_difference(first, reference))
    finally:
        native.eval()
        model.eval()
    if not power > POWER:
        problems.append(f"training outputs not comparable{at}: {seeds} seeds move the library's output by "
                        f"only {power:.1e} on livened weights")
    elif not worst <= 1e-6:
        problems.append(f"train-mode outputs differ{at} by {worst:.2e} under one seed")
    more = "" if seeds == len(SEEDS) else f", {seeds} seeds"
    return f"{worst:.1e} (seed: {power:.1e}{more})"


def _largest_difference(reference, got) -> float:
    return max((float((a.double() - b.double()).abs().max()) for a, b in zip(reference, got, strict=True)
                if a.numel() and a.is_floating_point()), default=0.0)


@contextlib.contextmanager
def _rates_set(model, rates: dict[str, float]):
    """The library's model with its drop-path modules at ``rates`` (what a build at another rate gives)."""
    saved = []
    for slot, rate in rates.items():
        module = model.get_submodule(slot)
        attribute = next(a for a in ("drop_prob", "p", "rate") if isinstance(getattr(module, a, None), float))
        saved.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, float(rate))
    try:
        yield
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)


def _not_independent(native, x, slots: list[str]) -> list[str]:
    """The sites (of ``slots``) whose block output, with the site's output zeroed, still depends on the
    block input, judged on two eval forwards of different inputs (no use of pathsurgeon's finder).

    A residual branch's block keeps its input through the shortcut when the branch is zeroed; a site
    that is the block's whole output (no shortcut around it) leaves a constant.
    """
    import torch

    if not slots:
        return []
    generator = torch.Generator().manual_seed(7)

    def another(value):
        if torch.is_tensor(value) and value.is_floating_point():
            return torch.randn(value.shape, generator=generator).to(value)
        return value

    other = {k: another(v) for k, v in x.items()} if isinstance(x, dict) else another(x)
    found = []
    for slot in slots:
        parent = slot.rpartition(".")[0]
        outputs: list = []
        zero = native.get_submodule(slot).register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        keep = native.get_submodule(parent).register_forward_hook(
            lambda m, i, o, outputs=outputs: outputs.append(o.detach().clone()) if torch.is_tensor(o) else None
        )
        try:
            native.eval()
            with torch.no_grad():
                _call(native, x)
                calls = len(outputs)
                _call(native, other)
        finally:
            zero.remove()
            keep.remove()
        if not calls or len(outputs) < calls + 1 or not torch.equal(outputs[0], outputs[calls]):
            found.append(slot)
    return found


def _check_strip(model, layout, keys, native, x, problems: list) -> None:
    """``strip``: the module tree, keys and class back; no pathsurgeon module, hook or record left; eval
    outputs bitwise what they were just before (and the native model's, where the two share tensors)."""
    import torch

    import pathsurgeon
    from pathsurgeon import changes, skipping

    with torch.no_grad():
        surgered = _outputs(model, x)
    pathsurgeon.strip(model)
    if [(n, type(m)) for n, m in model.named_modules()] != layout:
        problems.append("strip did not restore the module tree")
    if list(model.state_dict()) != keys:
        problems.append("state_dict keys changed")
    leftovers = [n for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)]
    leftovers += [f"hook on {n}" for n, m in model.named_modules()
                  if any(isinstance(h, changes.BranchHook) for h in m._forward_hooks.values())
                  or any(isinstance(h, skipping.Gather) for h in m._forward_pre_hooks.values())]
    leftovers += [f"record on {n or 'the model'}" for n, m in model.named_modules()
                  if changes.RECORD_ATTRIBUTE in vars(m)]
    if leftovers:
        problems.append(f"left after strip: {leftovers[0]} ({len(leftovers)} in all)")
    model.eval()
    with torch.no_grad():
        stripped = _outputs(model, x)
        reference = _outputs(native, x) if native is not None else stripped
    if not all(torch.equal(a, b) for a, b in zip(surgered, stripped, strict=True)):
        problems.append("eval outputs changed by strip")
    elif not all(torch.equal(a, b) for a, b in zip(reference, stripped, strict=True)):
        problems.append("eval outputs after strip differ from the library's model")


@contextlib.contextmanager
def _rate_zero(model, slots):
    """The library's model with its drop paths off the residual branches at rate 0 (they draw nothing)."""
    saved = []
    for slot in slots:
        module = model.get_submodule(slot)
        attribute = next(a for a in ("drop_prob", "p", "rate") if isinstance(getattr(module, a, None), float))
        saved.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, 0.0)
    try:
        yield
    finally:
        for module, attribute, value in saved:
            setattr(module, attribute, value)


def _slot_values(rebuilt, slots: list[str]) -> dict[str, float]:
    from pathsurgeon.libraries import slot_rates

    return slot_rates(rebuilt, slots)


# --- the worker and the shard loop -----------------------------------------------------------------------

def _worker(connection) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    while True:
        job = connection.recv()
        if job is None:
            return
        connection.send(check_model(*job))


class Worker:
    def __init__(self) -> None:
        self.process = None
        self.connection = None

    def run(self, library: str, name: str, timeout: float) -> dict:
        if self.process is None or not self.process.is_alive():
            context = multiprocessing.get_context("spawn")
            self.connection, child = context.Pipe()
            self.process = context.Process(target=_worker, args=(child,), daemon=True)
            self.process.start()
        self.connection.send((library, name))
        if self.connection.poll(timeout):
            try:
                return self.connection.recv()
            except EOFError:
                pass
        code = self.process.exitcode
        self.process.kill()
        self.process.join()
        self.process = None
        if code is None:
            return _row(library, name, "error", f"timed out after {timeout:.0f} s", seconds=timeout)
        return _row(library, name, "error", f"the worker died (exit code {code}; out of memory?)")

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.connection.send(None)
            self.process.join(10)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_file(library: str, shard: tuple[int, int]) -> Path:
    return RESULTS / f"{library}-{shard[0]}of{shard[1]}.jsonl"


def recheck_file(library: str) -> Path:
    return RESULTS / f"{library}-recheck.jsonl"


def run_shard(library: str, shard: tuple[int, int], only: str | None, timeout: float, redo: set[str],
              models: list[str] | None = None) -> None:
    """Run a shard (or, with ``models``, those models into ``<library>-recheck.jsonl``), resumably."""
    names = shard_of(model_names(library), shard) if models is None else models
    if only:
        import fnmatch

        names = [n for n in names if fnmatch.fnmatch(n, only)]
    path = results_file(library, shard) if models is None else recheck_file(library)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short when a run was killed: that model runs again
            if "model" in record and (record["status"] in redo and record["model"] in names):
                continue  # run again: its row is replaced
            kept.append(line)
            if "model" in record:
                done.add(record["model"])
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text("".join(line + "\n" for line in kept))
        os.replace(staging, path)
    todo = [n for n in names if n not in done]
    print(f"{library} shard {shard[0]}/{shard[1]}: {len(names)} models, {len(done)} done, {len(todo)} to run",
          flush=True)
    worker = Worker()
    commit = _commit()
    try:
        with path.open("a") as out:
            if path.stat().st_size == 0:
                out.write(json.dumps({"shard": list(shard) if models is None else "recheck", "library": library,
                                      "models": len(names), "commit": commit}) + "\n")
            for number, name in enumerate(todo, 1):
                row = {**worker.run(library, name, timeout), "commit": commit}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"[{number}/{len(todo)}] {name}: {row['status']} ({row.get('seconds', '?')} s) "
                      f"{row.get('reason', '')[:150]}", flush=True)
    finally:
        worker.close()


# --- the document ----------------------------------------------------------------------------------------

STATUS_ORDER = ("agrees", "not residual", "placement differs by design", "no drop path", "differs", "error",
                "skipped")

CURRENT_DEFINITIONS = [
    "- **agrees**: pathsurgeon's drop-path slots and rates are exactly (bitwise) the library's drop-path "
    "modules a training forward calls with a rate > 0; eval outputs bitwise equal after `add`; training "
    "outputs within 1e-6 of the library's, compared on *livened* weights (every parameter "
    "whose values are all below 1e-3 — timm's zero-init last BatchNorms and NF gains, 1e-6 layer scales — "
    "set to values in [0.5, 1.5], the same in both models), under seeds 123, 124 and 125, then 126 to 135 one by "
    "one until the seeds move the library's output (the column says how many seeds it took where more than 3; rows "
    "with checks 2: "
    "seed 123 only), and only where those seeds (checks 2: seed 124 against 123) move the library's output by "
    "more than 1e-4 (the train Δ column shows the largest Δ, then that power); `set_rate` to 0.4567, 0.0123 and "
    "0.8765 gives bitwise the rates of a library build at that rate (whatever the rates came from), and "
    "training outputs at 0.4567 match the library's model re-rated to its own rates there (1e-6); `strip` "
    "gives back the module tree, class and `state_dict` keys, leaves no pathsurgeon DropPath, hook or record, "
    "leaves eval outputs bitwise unchanged (and equal to the library's model where the two share tensors); "
    "timm rows also: "
    "`add(model, 0.2)` with **no** `example_inputs` on the model as `timm.create_model(name)` builds it "
    "(pathsurgeon's made-up inputs at the size timm states) succeeds with eval outputs bitwise unchanged "
    "(the default inputs column; 'not run' above 350M parameters).",
    "- **not residual**: everything in *agrees* holds on the residual branches; the library also drops sites "
    "that are not residual branches, which pathsurgeon leaves alone by design; each such site is confirmed "
    "without pathsurgeon's finder: with its output zeroed, its block's output no longer depends on the block "
    "input (two eval forwards). For Hugging Face CvT (`_invariants_only`), the library calls one drop-path "
    "module both on and off the residual branch; pathsurgeon hooks the residual branches and holds the "
    "library's at rate 0; eval outputs and `strip` checked.",
    "- **placement differs by design** (timm ResNeSt): timm's drop path acts on the block *input* (used only "
    "by the projection shortcut, where there is one), not on the residual branch; pathsurgeon drops the "
    "residual branches (hooks). Eval outputs, `strip` and the default-size `add` are checked as in *agrees*; "
    "the training outputs differ, and the difference is shown.",
    "- **no drop path**: the library builds no stochastic depth into this model (or calls none at this rate). "
    "`add` ran on it — timm: on the model `timm.create_model(name)` builds, with no `example_inputs` (its "
    "default input size); torchvision / Hugging Face: with pathsurgeon's default inputs — and eval outputs "
    "(bitwise) and `strip` were checked as in *agrees*; or `add` said there is no residual branch.",
    "- **differs** / **error**: a disagreement or a failure; the reason says which.",
    "- **skipped**: not built here; the reason says why.",
]

EARLIER_DEFINITIONS = [
    "Rows marked *earlier* were not re-run under these checks; their status means what the earlier sweep "
    "checked, which is less: training outputs compared on fresh weights (powerless where branches start at "
    "zero: timm ResNet / RegNet / NF / ByobNet last BatchNorms, 1e-6 layer scales), `set_rate` by rates only "
    "and not where rates came from a recipe, `strip` by module tree, `state_dict` keys and DropPath leftovers "
    "only, 'no drop path' rows never surgered, 'not residual' sites judged with pathsurgeon's own finder "
    "helpers, every model at its smallest working input size with inputs the sweep made itself. ResNeSt's "
    "earlier status 'not residual' is *placement differs by design* here wherever it was re-run.",
]


def _read_results() -> tuple[dict[str, dict[str, dict]], list[tuple[str, str, int, int, str]]]:
    """{library: {model: row}} (a re-check's row replaces the shard's) and what each file holds."""
    rows: dict[str, dict[str, dict]] = {lib: {} for lib in LIBRARIES}
    files = []
    # this sweep's files are <library>-*.jsonl; composites.jsonl there is coverage_composites.py's
    ours = [p for p in RESULTS.glob("*.jsonl") if p.name.split("-")[0] in LIBRARIES]
    for path in sorted(ours, key=lambda p: ("recheck" in p.name, p.name)):
        header, count, commits = None, 0, Counter()
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short when a run was killed
            if "shard" in record:
                header = record
                continue
            record.setdefault("checks", 2 if "recheck" in path.name else 1)  # re-checks began at version 2
            record.setdefault("commit", (header or {}).get("commit", "not recorded"))
            previous = rows[record["library"]].get(record["model"])
            if previous is None or record["checks"] >= previous["checks"]:
                rows[record["library"]][record["model"]] = record
            commits[record["commit"]] += 1
            count += 1
        if header is not None:
            commit = ", ".join(f"{c} ({n})" for c, n in commits.most_common()) or header.get("commit", "?")
            files.append((header["library"], path.name, count, header["models"], commit))
    return rows, files


def write_doc() -> None:
    rows, files = _read_results()
    lines = [
        "# Coverage: pathsurgeon against each library's own stochastic depth",
        "",
        "Generated by `benchmarks/coverage.py --write-doc` from `benchmarks/coverage_results/`; "
        f"written {datetime.date.today().isoformat()} with torch {_version('torch')}, timm {_version('timm')}, "
        f"torchvision {_version('torchvision')}, transformers {_version('transformers')} on "
        f"{platform.machine()} CPU. What each status means, for the checks each row ran under: below. "
        "Each row names the commit it ran at and the version of the checks (`checks` in the data).",
        "",
        "Models inside models (open_clip, segmentation_models_pytorch, Hugging Face composites) are swept "
        "part by part by `benchmarks/coverage_composites.py`: [coverage-composites.md](coverage-composites.md).",
        "",
        "## What ran",
        "",
    ]
    for library in LIBRARIES:
        total = len(model_names(library))
        current = [r for r in rows[library].values() if r["checks"] >= CURRENT]
        commits = Counter(r["commit"] for r in current)
        lines.append(f"- **{library}** ({total} models): {len(rows[library])} have a row; **{len(current)} ran "
                     f"under the current checks** (commit {', '.join(commits) or '-'}), "
                     f"{len(rows[library]) - len(current)} only under the earlier checks (*earlier* below).")
        for lib, name, count, size, commit in files:
            if lib == library:
                listed = f" of {size}" if "recheck" not in name else ""  # re-checks append runs: no one size
                lines.append(f"  - `{name}`: {count} rows{listed}, commit {commit}")
    lines += ["", "## Summary", "",
              "| library | checks | models | " + " | ".join(STATUS_ORDER) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in STATUS_ORDER) + " |"]
    for library in LIBRARIES:
        for label, keep in (("current", lambda r: r["checks"] >= CURRENT),
                            ("earlier", lambda r: r["checks"] < CURRENT)):
            chosen = [r for r in rows[library].values() if keep(r)]
            counts = Counter(r["status"] for r in chosen)
            lines.append(f"| {library} | {label} | {len(chosen)} | "
                         + " | ".join(str(counts.get(s, 0)) for s in STATUS_ORDER) + " |")
    lines += ["", "### Under the current checks", "", *CURRENT_DEFINITIONS, "", "### Earlier", "",
              *EARLIER_DEFINITIONS, ""]
    for library in LIBRARIES:
        if not rows[library]:
            continue
        current = sorted(n for n, r in rows[library].items() if r["checks"] >= CURRENT)
        earlier = sorted(n for n, r in rows[library].items() if r["checks"] < CURRENT)
        if current:
            lines += [f"## {library}: current checks", "",
                      "| model | status | commit | rates from | branches | train Δ (seed) | set_rate | "
                      "default inputs | note |",
                      "| --- | --- | --- | --- | ---: | --- | --- | --- | --- |"]
            lines += [_doc_line(rows[library][n], current=True) for n in current]
            lines.append("")
        if earlier:
            lines += [f"## {library}: earlier checks only (not re-run)", "",
                      "| model | earlier status | commit | rates from | branches | train Δ | note |",
                      "| --- | --- | --- | --- | ---: | --- | --- |"]
            lines += [_doc_line(rows[library][n], current=False) for n in earlier]
            lines.append("")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    staging = DOC.with_name(f".{DOC.name}.{os.getpid()}")
    staging.write_text("\n".join(lines))
    os.replace(staging, DOC)  # a reader never sees half a document
    print(f"wrote {DOC}")


def _doc_line(row: dict, current: bool) -> str:
    note = row.get("reason", "")
    if row.get("rates_note") and row.get("rates_from") not in LIBRARY_RATES:
        note = (note + "; " if note else "") + "library not asked: " + row["rates_note"]
    note = note.replace("|", "\\|")[:300]
    cells = [f"`{row['model']}`", row["status"], f"{row['commit']}" + (f" (checks {row['checks']})" if current else ""),
             row.get("rates_from", ""),
             str(row.get("branches", "") or ""), row.get("training", "") or ""]
    if current:
        cells += [row.get("set_rate", "") or "", row.get("default_inputs", "") or ""]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + f" | {note} |"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=LIBRARIES)
    parser.add_argument("--shard", default="1/1", help="i/n: run every n-th model starting at the i-th")
    parser.add_argument("--only", help="glob over model names (for a re-check)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model")
    parser.add_argument("--redo", default="", help="comma-separated statuses to run again (differs,error)")
    parser.add_argument("--write-doc", action="store_true", help="write docs/coverage.md from the results")
    parser.add_argument("--one", metavar="NAME", help="check one model in this process and print the row")
    parser.add_argument("--models", help="comma-separated models (or @FILE, one a line) to run into "
                                         "<library>-recheck.jsonl; their rows replace the shards' in the doc")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(check_model(args.library, args.one), indent=1))
        return 0
    if args.library:
        index, count = (int(v) for v in args.shard.split("/"))
        models = None
        if args.models:
            text = Path(args.models[1:]).read_text() if args.models.startswith("@") else args.models.replace(",", "\n")
            models = [m.strip() for m in text.splitlines() if m.strip()]
        run_shard(args.library, (index, count), args.only, args.timeout, set(filter(None, args.redo.split(","))),
                  models)
    if args.write_doc:
        write_doc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
