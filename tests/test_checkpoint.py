"""pathsurgeon.save / pathsurgeon.load: what fine-tuners build round-trips, what cannot be rebuilt is
refused at save, and a checkpoint whose branches a pathsurgeon would find elsewhere is refused at load."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import assert_same_training_output, module_layout, pathsurgeon_leftovers
from safetensors.torch import load_file
from torch import nn

import pathsurgeon
from pathsurgeon import finder
from pathsurgeon.changes import record_of


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def fine_tuned_vit():
    """What a fine-tuner builds: another head, another image size, fewer input channels."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, in_chans=1)


def test_a_surgered_timm_model_round_trips_with_its_rates(tmp_path):
    model = fine_tuned_vit()
    pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.2, mode="skip", exclude=["blocks.0"]))
    pathsurgeon.set_rate(model, 0.4)  # the rates in effect when saved are the ones load restores
    pathsurgeon.save(model, tmp_path / "run")

    manifest = json.loads((tmp_path / "run" / "pathsurgeon.json").read_text())
    assert manifest["source"]["kwargs"] == {"num_classes": 10, "in_chans": 1, "img_size": 64}
    assert sorted(load_file(tmp_path / "run" / "model.safetensors")) == sorted(fine_tuned_vit().state_dict())

    loaded = pathsurgeon.load(tmp_path / "run")
    assert type(loaded) is type(model) and state_equal(loaded, model)
    assert record_of(loaded).config == record_of(model).config
    assert record_of(loaded).targets == record_of(model).targets
    assert pathsurgeon.find(loaded) == pathsurgeon.find(model)
    assert_same_training_output(model, loaded, torch.randn(4, 1, 64, 64), seed=3)

    plain = pathsurgeon.load(tmp_path / "run", surgery=False)
    assert not pathsurgeon.is_surgered(plain) and state_equal(plain, model)


def test_torchvision_and_hugging_face_models_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    transformers = pytest.importorskip("transformers")
    resnet = torchvision.models.resnet18(num_classes=7)
    pathsurgeon.add(resnet, 0.1, example_inputs=torch.randn(2, 3, 64, 64))
    pathsurgeon.save(resnet, tmp_path / "resnet")
    manifest = json.loads((tmp_path / "resnet" / "pathsurgeon.json").read_text())
    assert manifest["source"] == {"library": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 7}}
    loaded = pathsurgeon.load(tmp_path / "resnet", verify=False)  # its default inputs are 224 px: skip the check
    assert state_equal(loaded, resnet) and record_of(loaded).targets == record_of(resnet).targets

    config = transformers.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, num_labels=3)
    beit = transformers.BeitForImageClassification(config).eval()
    pathsurgeon.add(beit, 0.2)
    pathsurgeon.save(beit, tmp_path / "beit")
    assert (tmp_path / "beit" / "config.json").is_file()  # save_pretrained's layout: plain transformers loads it
    loaded = pathsurgeon.load(tmp_path / "beit")
    assert type(loaded) is type(beit) and state_equal(loaded, beit)
    assert pathsurgeon.find(loaded) == pathsurgeon.find(beit)


def test_an_architecture_that_cannot_be_rebuilt_is_refused_at_save(tmp_path):
    shrunk = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)  # depth is no plain argument
    own = nn.Sequential(nn.Linear(4, 4))
    for model, words in ((shrunk, "cannot save VisionTransformer"), (own, "cannot save Sequential")):
        with pytest.raises(pathsurgeon.RebuildError, match=words) as caught:
            pathsurgeon.save(model, tmp_path / "out")
        assert "state_dict" in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists()


def test_load_refuses_when_the_branches_it_finds_are_not_the_saved_ones(tmp_path, monkeypatch):
    model = fine_tuned_vit()
    pathsurgeon.add(model, 0.1)
    pathsurgeon.save(model, tmp_path / "run")
    real = finder.find_residual_adds

    def finds_fewer(view):  # a finder that no longer sees the last block's branches
        return [a for a in real(view) if a.block != "blocks.11"]

    monkeypatch.setattr(pathsurgeon.surgery, "find_residual_adds", finds_fewer)
    with pytest.raises(pathsurgeon.SavedBranchesMovedError, match="blocks.11") as caught:
        pathsurgeon.load(tmp_path / "run")
    assert "surgery=False" in str(caught.value)
    # surgery=False still gives the model and its weights
    assert state_equal(pathsurgeon.load(tmp_path / "run", surgery=False), model)


def test_a_checkpoint_written_by_pathsurgeon_0_1_still_loads(tmp_path):
    model = fine_tuned_vit()
    pathsurgeon.add(model, 0.1, schedule="uniform")
    pathsurgeon.save(model, tmp_path / "run")
    current = json.loads((tmp_path / "run" / "pathsurgeon.json").read_text())
    old = {  # format 1: rate, schedule, mode and branches; kwargs were never written
        "format": 1,
        "source": current["source"],
        "surgery": {"rate": 0.1, "schedule": "uniform", "mode": "sample",
                    "branches": [{k: b[k] for k in ("block", "index", "rate", "mechanism", "target", "mode", "entry")}
                                 for b in current["surgery"]["branches"]]},
    }
    (tmp_path / "run" / "pathsurgeon.json").write_text(json.dumps(old))
    loaded = pathsurgeon.load(tmp_path / "run")
    assert pathsurgeon.find(loaded) == pathsurgeon.find(model)


def test_the_manifest_names_its_writer_and_format_2_still_loads(tmp_path):
    model = fine_tuned_vit()
    pathsurgeon.add(model, 0.1)
    pathsurgeon.save(model, tmp_path / "run")
    path = tmp_path / "run" / "pathsurgeon.json"
    current = json.loads(path.read_text())
    assert (current["format"], current["pathsurgeon"]) == (3, pathsurgeon.__version__)
    # format 2 (pathsurgeon 0.2): the same fields, no writer
    path.write_text(json.dumps({**{k: v for k, v in current.items() if k != "pathsurgeon"}, "format": 2}))
    assert pathsurgeon.find(pathsurgeon.load(tmp_path / "run")) == pathsurgeon.find(model)


def test_a_manifest_from_a_newer_release_names_the_release_that_reads_it(tmp_path):
    model = fine_tuned_vit()
    pathsurgeon.save(model, tmp_path / "run")
    path = tmp_path / "run" / "pathsurgeon.json"
    newer = {**json.loads(path.read_text()), "format": 4, "pathsurgeon": "1.2.0", "surprise": {"x": 1}}
    path.write_text(json.dumps(newer))
    with pytest.raises(pathsurgeon.ManifestError) as caught:
        pathsurgeon.load(tmp_path / "run")
    message = str(caught.value)
    assert "written by pathsurgeon 1.2.0 (manifest format 4)" in message
    assert f"pathsurgeon {pathsurgeon.__version__} reads formats up to 3" in message
    assert "pip install 'pathsurgeon>=1.2.0'" in message and "\n" not in message


def test_save_of_a_stripped_model_has_no_surgery_and_the_original_tree(tmp_path):
    model = fine_tuned_vit()
    layout = module_layout(model)
    pathsurgeon.add(model, 0.1)
    pathsurgeon.strip(model)
    pathsurgeon.save(model, tmp_path / "clean")
    assert json.loads((tmp_path / "clean" / "pathsurgeon.json").read_text())["surgery"] is None
    loaded = pathsurgeon.load(tmp_path / "clean")
    assert module_layout(loaded) == layout and pathsurgeon_leftovers(loaded) == []
    with pytest.raises(pathsurgeon.OutputPathError, match="already exists"):
        pathsurgeon.save(model, tmp_path / "clean")
