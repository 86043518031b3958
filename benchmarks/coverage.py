"""Coverage sweep: does pathsurgeon give exactly what the library builds, on every model it has?

Not a test (hours on 2 cores). For every timm model whose constructor takes ``drop_path_rate``, every
torchvision classification builder and every Hugging Face class in transformers' image-classification
and backbone auto-mappings, it builds the model twice with the same weights — natively at rate R
(the library's own stochastic depth) and at rate 0, which pathsurgeon then surgers at R — and checks:

- placement and rates: the drop-path slots pathsurgeon fills, with their rates, are exactly the
  library's drop-path modules that a training forward calls (with a rate > 0), bitwise;
- ``set_rate`` to another rate gives the rates a library build at that rate has, bitwise;
- eval outputs bitwise equal after ``add``; train-mode outputs equal the native model's under one seed
  (atol 1e-6); ``strip`` gives back the module tree, ``state_dict`` keys and class.

A library drop-path site that is not a residual branch (its output is not added to a shortcut) is a
row with that reason, not a failure. timm and torchvision models are built small where the
constructor allows it (``img_size``; inputs of 64 to 224 pixels); Hugging Face models from their
default config with a small ``image_size`` where they take one; torchvision and Hugging Face models
are surgered without ``example_inputs`` (their default inputs are part of what is checked).

    .venv/bin/python benchmarks/coverage.py --library timm --shard 1/8      # resumable: reruns skip done rows
    .venv/bin/python benchmarks/coverage.py --library torchvision
    .venv/bin/python benchmarks/coverage.py --write-doc                    # docs/coverage.md from the results

Results are JSON lines in ``benchmarks/coverage_results/<library>-<i>of<n>.jsonl``; each model runs in
a worker process that is replaced after a crash or a timeout.
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
            return _row("timm", name, "no drop path", "the constructor takes no drop_path_rate")
        raise
    cls = type(meta)
    if "drop_path_rate" not in inspect.signature(cls.__init__).parameters and not any(
        type(m).__name__ == "DropPath" for m in meta.modules()
    ):
        return _row("timm", name, "no drop path", "the constructor ignores drop_path_rate")
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
    if small and isinstance(getattr(config, "image_size", None), (int, list, tuple)):
        size = config.image_size
        config.image_size = HF_SMALL_IMAGE if isinstance(size, int) else [HF_SMALL_IMAGE, HF_SMALL_IMAGE]
    if rate is not None:
        config.drop_path_rate = rate
    return cls, config


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
        c.drop_path_rate = rate
        return cls(c)

    native = model
    twin = _twin(build, native)
    return _compare("transformers", name, native, twin, inputs, lambda rate: _meta(lambda: build(rate)),
                    example_inputs=None, parameters=parameters)


def _outputs(model, inputs):
    from pathsurgeon.verify import tensor_leaves

    return tensor_leaves(_call(model, inputs))


def _invariants_only(library: str, name: str, model, why: str) -> dict:
    """A model its library builds without stochastic depth: add (hooks), eval bitwise, strip."""
    import torch

    import pathsurgeon
    from pathsurgeon.inputs import example_inputs

    inputs = example_inputs(model)
    inputs = inputs.kwargs or inputs.args[0]
    model.eval()
    layout = [(n, type(m)) for n, m in model.named_modules()]
    keys = list(model.state_dict())
    with torch.no_grad():
        before = _outputs(model, inputs)
    try:
        report = pathsurgeon.add(model, RATE)
    except pathsurgeon.NoBranchesError:
        return _row(library, name, "no drop path", f"{why}; no residual branch either")
    problems = []
    with torch.no_grad():
        if not all(torch.equal(a, b) for a, b in zip(before, _outputs(model, inputs), strict=True)):
            problems.append("eval outputs changed")
    pathsurgeon.strip(model)
    if [(n, type(m)) for n, m in model.named_modules()] != layout or list(model.state_dict()) != keys:
        problems.append("strip did not restore the module tree")
    held = [s for s in report.left_alone if "is also called off the residual branch" in s.reason]
    status = "differs" if problems else "not residual" if held else "no drop path"
    reason = "; ".join(problems) if problems else f"{why}; pathsurgeon adds it on {len(report.branches)} branches"
    if held and not problems:
        reason = (f"the library calls its drop path off the residual branch too ({held[0].reason.split(' (')[0]}, "
                  f"...): pathsurgeon hooks the {len(report.branches)} residual branches and holds the library's "
                  f"{len(held)} drop paths at rate 0")
    return _row(library, name, status, reason, rates_from=report.rates_from, branches=len(report.branches))


def _compare(library, name, native, model, x, rebuild, example_inputs, parameters=None) -> dict:
    """The parity checks between the library's native model and pathsurgeon on the rate-0 twin."""
    import torch

    import pathsurgeon
    from pathsurgeon.changes import record_of as _record

    native.eval()
    model.eval()
    layout = [(n, type(m)) for n, m in model.named_modules()]
    keys = list(model.state_dict())
    expected = called_drop_paths(native, x)  # a train-mode forward: moves the (shared) BatchNorm statistics
    with torch.no_grad():
        before = _outputs(model, x)
    if not expected:
        return _row(library, name, "no drop path", "the library calls no drop path at this rate")

    text = {"cat": "concatenated features", "output": "an output not added to a shortcut",
            "shortcut": "the input of a shortcut"}
    try:
        report = pathsurgeon.add(model, RATE, example_inputs=example_inputs)
    except pathsurgeon.NoBranchesError:
        kinds = _site_kinds(native, x, list(expected))
        if "add" not in kinds.values():
            shown = ", ".join(text[k] for k in sorted(set(kinds.values())))
            return _row(library, name, "not residual", f"no residual branch; the library drops {len(kinds)} "
                        f"sites that are not residual branches ({shown}; e.g. {sorted(kinds)[0]})")
        raise
    ours = {b.target: b.rate for b in report.branches if b.mechanism == "slot" and b.rate > 0}
    hooked = [b for b in report.branches if b.mechanism == "hook" and b.rate > 0]
    problems, notes = [], []
    missing = {s: r for s, r in expected.items() if s not in ours}
    extra = {s: r for s, r in ours.items() if s not in expected}
    kinds = _site_kinds(native, x, list(missing))
    not_residual = {slot: kind for slot, kind in kinds.items() if kind != "add"}
    missing = {s: r for s, r in missing.items() if s not in not_residual}
    if hooked and len(not_residual) < len(expected):
        problems.append(f"pathsurgeon hooks {len(hooked)} branches of a model whose library drops residual branches")
    elif hooked:
        notes.append(f"pathsurgeon drops {len(hooked)} residual branches (hooks) that the library leaves alone")
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
    # set_rate to another rate: the library's rates at that rate, bitwise
    record = _record(model)
    slot_targets = [c.target for c in record.changes if c.hooked is None]
    for other in OTHER_RATES if slot_targets else ():
        pathsurgeon.set_rate(model, other)
        want = _slot_values(rebuild(other), slot_targets)
        got = {c.target: c.drop.rate for c in record.changes if c.hooked is None}
        if report.rates_from in ("timm constructor", "torchvision builder", "transformers config") and got != want:
            s = next(s for s in slot_targets if got[s] != want[s])
            problems.append(f"set_rate({other}) gives {s} {got[s]!r}, the library {want[s]!r}")
            break
    pathsurgeon.set_rate(model, RATE)
    laws = record.library.laws if record.library is not None else {}
    if laws and not all(laws.values()):
        notes.append(f"{sum(1 for v in laws.values() if v is None)} slots fit no rate law (set_rate replays)")
    # training outputs under one seed
    if hooked:
        training = "not compared: pathsurgeon drops branches the library leaves alone"
    else:
        native.train()
        model.train()
        with torch.no_grad(), _rate_zero(native, not_residual):
            torch.manual_seed(123)
            reference = _outputs(native, x)
            torch.manual_seed(123)
            got = _outputs(model, x)
        worst = max((float((a - b).abs().max()) for a, b in zip(reference, got, strict=True) if a.numel()),
                    default=0.0)
        training = f"{worst:.1e}"
        if not worst <= 1e-6:
            problems.append(f"train-mode outputs differ by {worst:.2e} under one seed")
    native.eval()
    model.eval()
    pathsurgeon.strip(model)
    if [(n, type(m)) for n, m in model.named_modules()] != layout:
        problems.append("strip did not restore the module tree")
    if list(model.state_dict()) != keys:
        problems.append("state_dict keys changed")
    leftovers = [n for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)]
    if leftovers:
        problems.append(f"DropPath left after strip at {leftovers[0]}")
    if not_residual:
        kinds = sorted(set(not_residual.values()))
        notes.insert(0, f"the library also drops {len(not_residual)} sites that are not residual branches "
                        f"({', '.join(text[k] for k in kinds)}; e.g. {sorted(not_residual)[0]})")
    if problems:
        status = "differs"
    elif not_residual:
        status = "not residual"
    else:
        status = "agrees"
    return _row(library, name, status, "; ".join(problems + notes), rates_from=report.rates_from,
                branches=len(report.branches), library_sites=len(expected), training=training,
                method=report.method, rates_note=report.rates_note, parameters=parameters)


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


def run_shard(library: str, shard: tuple[int, int], only: str | None, timeout: float, redo: set[str]) -> None:
    names = shard_of(model_names(library), shard)
    if only:
        import fnmatch

        names = [n for n in names if fnmatch.fnmatch(n, only)]
    path = results_file(library, shard)
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
                out.write(json.dumps({"shard": list(shard), "library": library, "models": len(names),
                                      "commit": commit}) + "\n")
            for number, name in enumerate(todo, 1):
                row = {**worker.run(library, name, timeout), "commit": commit}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"[{number}/{len(todo)}] {name}: {row['status']} ({row.get('seconds', '?')} s) "
                      f"{row.get('reason', '')[:150]}", flush=True)
    finally:
        worker.close()


# --- the document ----------------------------------------------------------------------------------------

STATUS_ORDER = ("agrees", "not residual", "no drop path", "differs", "error", "skipped")


def write_doc() -> None:
    rows: dict[str, dict[str, dict]] = {lib: {} for lib in LIBRARIES}
    shards: dict[str, dict[tuple[int, int], tuple[int, int, str]]] = {lib: {} for lib in LIBRARIES}
    for path in sorted(RESULTS.glob("*.jsonl")):
        header, count, commits = None, 0, Counter()
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short when a run was killed
            if "shard" in record:
                header = record
                continue
            rows[record["library"]][record["model"]] = record
            commits[record.get("commit") or (header or {}).get("commit", "not recorded")] += 1
            count += 1
        if header is not None:
            commit = ", ".join(f"{c} ({n} row{'s' if n > 1 else ''})" if len(commits) > 1 else c
                               for c, n in commits.most_common())
            shards[header["library"]][tuple(header["shard"])] = (count, header["models"],
                                                                 commit or header.get("commit", "not recorded"))
    lines = [
        "# Coverage: pathsurgeon against each library's own stochastic depth",
        "",
        "Generated by `benchmarks/coverage.py --write-doc` from `benchmarks/coverage_results/`; "
        f"written {datetime.date.today().isoformat()} with torch {_version('torch')}, timm {_version('timm')}, "
        f"torchvision {_version('torchvision')}, transformers {_version('transformers')} on "
        f"{platform.machine()} CPU. What each row checks: see the docstring of `benchmarks/coverage.py`.",
        "",
        "## What ran",
        "",
    ]
    for library in LIBRARIES:
        total = len(model_names(library))
        ran = sum(done for done, _, _ in shards[library].values())
        if not shards[library]:
            lines.append(f"- **{library}**: not run ({total} models).")
            continue
        parts = []
        for (index, count), (done, size, commit) in sorted(shards[library].items()):
            parts.append(f"shard {index}/{count}: {done} of {size}" + ("" if done >= size else " (incomplete)")
                         + f", commit {commit}")
        complete = ran >= total
        lines.append(f"- **{library}**: {ran} of {total} models{'' if complete else ' — NOT COMPLETE'}; "
                     + "; ".join(parts) + ".")
    lines += ["", "## Summary", "",
              "| library | models | " + " | ".join(STATUS_ORDER) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in STATUS_ORDER) + " |"]
    for library in LIBRARIES:
        counts = {s: 0 for s in STATUS_ORDER}
        for row in rows[library].values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        lines.append(f"| {library} | {len(rows[library])} | " + " | ".join(str(counts[s]) for s in STATUS_ORDER)
                     + " |")
    lines += [
        "",
        "- **agrees**: placement, rates (bitwise), `set_rate`, eval outputs (bitwise), train-mode outputs "
        "(atol 1e-6, where the library draws masks as timm does) and `strip` all match the library.",
        "- **not residual**: everything above holds on the residual branches; the library also drops "
        "sites that are not residual branches (a whole block output, concatenated features), which "
        "pathsurgeon leaves alone by design.",
        "- **no drop path**: the library builds no stochastic depth into this model (its constructor takes "
        "no rate); where it has residual branches pathsurgeon adds DropPath with hooks, checked for eval "
        "outputs and `strip` only.",
        "- **differs** / **error**: a disagreement or a failure; the reason says which.",
        "- **skipped**: not built here; the reason says why.",
        "",
    ]
    for library in LIBRARIES:
        if not rows[library]:
            continue
        lines += [f"## {library}", "", "| model | status | rates from | branches | train Δ | note |",
                  "| --- | --- | --- | ---: | --- | --- |"]
        for name in sorted(rows[library]):
            row = rows[library][name]
            note = row.get("reason", "").replace("|", "\\|")
            if row.get("rates_note") and row.get("rates_from") not in (
                "timm constructor", "torchvision builder", "transformers config"
            ):
                note = (note + "; " if note else "") + "library not asked: " + row["rates_note"].replace("|", "\\|")
            lines.append(f"| `{name}` | {row['status']} | {row.get('rates_from', '')} | {row.get('branches', '')} "
                         f"| {row.get('training', '')} | {note[:300]} |")
        lines.append("")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    staging = DOC.with_name(f".{DOC.name}.{os.getpid()}")
    staging.write_text("\n".join(lines))
    os.replace(staging, DOC)  # a reader never sees half a document
    print(f"wrote {DOC}")


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
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(check_model(args.library, args.one), indent=1))
        return 0
    if args.library:
        index, count = (int(v) for v in args.shard.split("/"))
        run_shard(args.library, (index, count), args.only, args.timeout, set(filter(None, args.redo.split(","))))
    if args.write_doc:
        write_doc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
