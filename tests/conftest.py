"""Shared helpers: ground truth taken from the libraries themselves, never from pathsurgeon."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

# One thread per xdist worker: `pytest -n 2` on 2 cores with 2 threads each oversubscribes the CPU, and
# OpenMP's waiting threads then make a forward pass 100x slower whenever anything else runs.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def called_drop_paths(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """timm's own DropPath modules that run in a training forward: {qualified name: drop_prob}."""
    from timm.layers import DropPath as TimmDropPath

    calls: dict[str, float] = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, m.drop_prob))
        for name, module in model.named_modules()
        if isinstance(module, TimmDropPath)
    ]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags:
            m.training = flag
    return calls


def parent_rates(drop_paths: dict[str, float]) -> set[tuple[str, float]]:
    return {(name.rpartition(".")[0], round(rate, 6)) for name, rate in drop_paths.items() if rate > 0}


def module_layout(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def pathsurgeon_leftovers(model: nn.Module) -> list[str]:
    """Names of pathsurgeon modules, hooks or records still on the model."""
    import pathsurgeon
    from pathsurgeon import changes, skipping

    found = [n for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)]
    for name, module in model.named_modules():
        if any(isinstance(h, changes.BranchHook) for h in module._forward_hooks.values()):
            found.append(f"hook on {name}")
        if any(isinstance(h, skipping.Gather) for h in module._forward_pre_hooks.values()):
            found.append(f"pre-hook on {name}")
    if changes.RECORD_ATTRIBUTE in vars(model):
        found.append("record")
    return found


def supported_from(distribution: str, release: str, failure: str) -> pytest.MarkDecorator:
    """Skip below ``release``: what the test checks is tested from that release on, and fails below it
    (``failure``: what was seen at the floors of .ci/floors.txt). docs/index.md lists them (what needs more
    than the floors)."""
    from pathsurgeon.versions import installed

    wanted = tuple(int(n) for n in release.split("."))
    have = installed(distribution)
    return pytest.mark.skipif(
        have is None or have < wanted, reason=f"tested from {distribution} {release}; older: {failure}"
    )


# what ONNX export needs (pathsurgeon.versions.ONNX_EXPORT_TORCH); below it, export is refused in one line
ONNX_EXPORT = supported_from("torch", "2.9", "export is refused (torch 2.4 has no dynamo exporter; 2.6 fails in it)")


def export_works() -> bool:
    """Whether this torch can export to ONNX (below it, every export is refused before anything else)."""
    from pathsurgeon.versions import ONNX_EXPORT_TORCH, installed

    return (installed("torch") or ()) >= ONNX_EXPORT_TORCH


def timm_model(name: str) -> str:
    """``name``, or a skip where the installed timm predates the model (the floors' timm lacks many)."""
    import timm

    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name!r} (a later timm added it)")
    return name


def transformers_class(name: str):
    """A transformers class, or a skip where the installed transformers predates it."""
    transformers = pytest.importorskip("transformers")
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        pytest.skip(f"transformers {transformers.__version__} has no {name} (a later release added it)")


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Every test starts offline with an empty Hugging Face cache, and gives the environment back as it found it.

    An empty cache makes "no local pretrained weights" true whatever the machine has cached; restoring
    ``os.environ`` stops a test (or an in-process CLI run) from leaking variables into later tests.
    """
    saved = dict(os.environ)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    os.environ.clear()
    os.environ.update(saved)


LIVE = 1e-3  # a parameter whose every value is below this starts a branch at (almost) nothing


def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the parameters a fresh model starts at (near) zero real values, in place; returns the model.

    timm zero-inits the last BatchNorm of each ResNet / RegNet / ByobNet branch and NFNet's skip gains,
    and starts layer scales at 1e-6: on a fresh model such a branch adds (almost) nothing, so a model
    with no drop path at all matches one with it in training mode. Values come from a generator seeded
    with ``seed`` in ``named_parameters`` order: two models of one architecture get the same values.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.is_floating_point() and parameter.numel() and float(parameter.abs().max()) < LIVE:
                values = torch.empty(parameter.shape).uniform_(0.5, 1.5, generator=generator)
                parameter.copy_(values.to(parameter.dtype))
    return model


def assert_same_training_output(
    native: nn.Module, model: nn.Module, x: torch.Tensor, seed: int = 0, *, at_rate_zero: bool = False,
    atol: float = 1e-6,
) -> None:
    """Training-mode outputs of both models from the same RNG state: equal iff masks are drawn alike.

    Compared on livened copies (:func:`liven`), and only after checking that the native model's
    training output depends on the seed: otherwise a model with no drop path at all would pass
    (``at_rate_zero``: a comparison at rate 0, where nothing may depend on the seed). ``atol``: mode
    skip computes a branch on the kept rows only, and a matrix product over fewer rows may round
    differently (seen: 1.3e-6); a wrong mask moves outputs by far more.
    """
    native, model = liven(copy.deepcopy(native)), liven(copy.deepcopy(model))
    native.train()
    model.train()
    first = None
    for draw in range(POWER_SEEDS):  # a few seeds: with small rates one seed may keep every branch
        torch.manual_seed(seed + draw)
        expected = native(x)
        torch.manual_seed(seed + draw)
        torch.testing.assert_close(model(x), expected, atol=atol, rtol=0)
        if first is None:
            first = expected
        elif not torch.allclose(expected, first, atol=1e-4, rtol=0):
            assert not at_rate_zero, "the seed moves the outputs at rate 0"
            return
    if at_rate_zero:
        return
    raise AssertionError(f"drop path changes nothing over {POWER_SEEDS} seeds: a powerless comparison")


POWER_SEEDS = 16  # tiny test models may have one site at a low rate: most seeds keep both samples
