"""Surgered models saved whole by an earlier release still load, train, and strip; and a model pickled or
deep-copied by this one strips exactly its own hooks.

tests/data/*.pt were written by pathsurgeon 0.3.0 (commit ff37d16) with tests/data/make_pickles.py (see
tests/data/README.md): timm ViTs with DropPath in their slots (modes sample, skip, batch, fixed_count) and
timm ConvMixers with forward hooks (modes sample, skip: Gathers with BatchNorms). Each is compared with the
same weights surgered by the current code: the same training outputs under one seed mean the same masks.
"""

from __future__ import annotations

import copy
import io
import pathlib
import pickle

import pytest
import timm
import torch
from conftest import pathsurgeon_leftovers, supported_from
from timm.models.convmixer import ConvMixer

import pathsurgeon
from pathsurgeon.changes import record_of
from pathsurgeon.droppath import Gather

DATA = pathlib.Path(__file__).parent / "data"
# the settings tests/data/make_pickles.py built and surgered them with
VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2, "num_classes": 4}
MIXER = {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4, "num_classes": 4}
FILES = ["vit_sample", "vit_skip", "vit_batch", "vit_fixed_count", "convmixer_sample", "convmixer_skip"]
CHECK_ONLY = ("forced_keep", "empty_ok", "replaced")  # what 0.3.0 kept on its DropPath for add's checks


def _inputs() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _rates(model: torch.nn.Module) -> list[float]:
    """Every inserted DropPath's rate, slots and hooks, in module order."""
    return [m.rate for m in model.modules() if isinstance(m, pathsurgeon.DropPath)] + [
        h.drop.rate for m in model.modules() for h in m._forward_hooks.values() if hasattr(h, "drop")]


def _load(name: str) -> torch.nn.Module:
    # weights_only=False: a whole pickled model, the user's own file (never do this with a file from elsewhere)
    return torch.load(DATA / f"{name}.pt", weights_only=False)


def _surgered_now(name: str, state: dict) -> torch.nn.Module:
    """The same model and weights surgered by the current code, as make_pickles.py surgered them."""
    kind, mode = name.split("_", 1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT) if kind == "vit" else ConvMixer(**MIXER)
    model.load_state_dict(state)
    config = pathsurgeon.DropPathConfig(0.3, mode=mode, batch_norm="kept_rows" if kind == "convmixer" else "fallback")
    pathsurgeon.add(model.eval(), config, example_inputs=_inputs())
    return model


def _train_output(model: torch.nn.Module, seed: int) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)
    out = model(_inputs())
    out.sum().backward()  # a training step runs, gradients included
    return out.detach()


# a whole pickled model holds the model library's objects as that release made them: the files load with
# the timm that pickled them (1.0.31) or a later one
WRITERS_TIMM = supported_from("timm", "1.0.31", "timm 1.0.8's ConvMixer / ViT lack attributes 1.0.31 pickled "
                                                "('ConvMixer' object has no attribute 'pooling')")


@WRITERS_TIMM
@pytest.mark.parametrize("name", FILES)
def test_a_model_saved_by_0_3_0_loads_trains_and_strips(name):
    model = _load(name)
    record = record_of(model)
    assert record is not None and record.mode == name.split("_", 1)[1]
    drops = [m for m in model.modules() if isinstance(m, pathsurgeon.DropPath)] + [
        h.drop for m in model.modules() for h in m._forward_hooks.values() if hasattr(h, "drop")]
    assert drops and not any(attr in vars(d) for d in drops for attr in CHECK_ONLY)
    gathers = [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, Gather)]
    assert bool(gathers) == (not name.endswith("sample"))

    fresh = _surgered_now(name, model.state_dict())
    for seed in range(3):  # the masks the current code draws for this model, mode and seed
        assert torch.equal(_train_output(model, seed), _train_output(fresh, seed))
    for surgered in (model, fresh):  # the record 0.3.0 pickled re-rates as today's does
        pathsurgeon.set_rate(surgered, 0.2)
    assert _rates(model) == _rates(fresh) and max(_rates(model)) > 0

    model.eval()
    with torch.no_grad():
        surgered = model(_inputs())
    pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(_inputs()), surgered)


def _hooks(model: torch.nn.Module) -> list[tuple[list, list]]:
    return [(list(m._forward_hooks.values()), list(m._forward_pre_hooks.values())) for m in model.modules()]


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("mode", ["sample", "skip"])
def test_strip_after_a_copy_removes_exactly_its_hooks(copy_by, mode):
    """Hooks go in and out through torch's handles, which travel with the model: a copy strips its own."""
    torch.manual_seed(0)
    model = ConvMixer(**MIXER).eval()
    calls: list[str] = []
    model.blocks[0][0].register_forward_hook(_Record(calls, "before"))  # a user's hooks, around the surgery
    config = pathsurgeon.DropPathConfig(0.3, mode=mode, batch_norm="kept_rows")
    pathsurgeon.add(model, config, example_inputs=_inputs())
    model.blocks[1][0].register_forward_pre_hook(_Record(calls, "after"))
    if copy_by == "deepcopy":
        copied = copy.deepcopy(model)
    elif copy_by == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)  # our own file, just written
    pathsurgeon.strip(copied)
    assert pathsurgeon_leftovers(copied) == [] and pathsurgeon_leftovers(model) != []
    hooks = [[type(h).__name__ for h in hs] for pair in _hooks(copied) for hs in pair]
    assert [h for h in hooks if h] == [["_Record"], ["_Record"]]
    pathsurgeon.strip(model)
    assert [[type(h).__name__ for h in hs] for pair in _hooks(model) for hs in pair] == hooks
    with torch.no_grad():
        assert torch.equal(copied(_inputs()), model(_inputs()))


class _Record:
    """A user's hook (picklable): notes that it ran."""

    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def __call__(self, *args):
        self.calls.append(self.name)


def test_a_0_3_0_drop_path_that_refused_empty_batches_hands_that_to_its_gather():
    """0.3.0 kept ``empty_ok`` on the DropPath; unpickled, it reaches the Gather that now holds it."""
    for empty_ok in (True, False):
        state = {**pathsurgeon.DropPath(0.3, mode="skip").__getstate__(), "empty_ok": empty_ok,
                 "forced_keep": None, "replaced": None}  # what 0.3.0's DropPath pickled
        drop = pathsurgeon.DropPath.__new__(pathsurgeon.DropPath)
        drop.__setstate__(state)
        gather = Gather.__new__(Gather)
        gather.__setstate__({"drop": drop, "norms": ()})  # 0.3.0's Gather: no empty_ok of its own
        assert gather.empty_ok is empty_ok and not any(a in vars(drop) for a in CHECK_ONLY)
        # no sample kept: an empty batch, or (refused) one row multiplied by zero
        assert gather.kept(torch.zeros(4), 4, torch.device("cpu")).index.numel() == (0 if empty_ok else 1)
