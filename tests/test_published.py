"""Published fine-tuning rates: well-formed data that names real models, the same answer by name and by
model object, and the command line's ``--rate published`` and ``inspect`` built on it.

The numbers themselves are data with a permalink each (recipes/published.toml); the tests check that
every entry can be traced and used, not the numbers.
"""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from conftest import supported_from

import pathsurgeon
from pathsurgeon import cli, published

PERMALINK = re.compile(r"^https://github\.com/[\w.-]+/[\w.-]+/blob/[0-9a-f]{40}/\S+#L\d+$")


def test_every_entry_is_traceable_and_usable():
    entries = published._entries()
    assert entries
    for entry in entries:
        assert PERMALINK.match(entry["source"]), entry["source"]
        assert PERMALINK.match(entry["schedule_source"]), entry["schedule_source"]
        assert pathsurgeon.config.validate_rate(entry["rate"]) == entry["rate"]
        assert entry["schedule"] in ("auto", "uniform")
        assert entry.get("timm") or entry.get("hf"), entry["setting"]


def test_every_timm_pattern_names_a_pretrained_timm_model():
    known = timm.list_models(pretrained=True)
    for entry in published._entries():
        for pattern in entry.get("timm", []):
            assert timm.list_models(pattern, pretrained=True), f"{pattern} matches no timm weights"
            assert all(name in known for name in timm.list_models(pattern, pretrained=True))


@supported_from("timm", "1.0.31", "timm 1.0.8 lists pretrained names without their tags")
def test_a_bare_timm_name_means_its_default_pretrained_tag():
    for entry in published._entries():
        for name in timm.list_models(entry.get("timm", []), pretrained=True):
            architecture, tag = name.split(".", 1)
            if timm.models.get_pretrained_cfg(architecture).tag == tag:
                assert published.published_rates(architecture) == published.published_rates(name)


def test_model_objects_are_looked_up_like_their_names():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)  # pretrained_cfg even without weights
    by_model = pathsurgeon.published_rate(model)
    assert by_model == pathsurgeon.published_rate("deit_tiny_patch16_224.fb_in1k")
    assert by_model.matched == "deit_tiny_patch16_224.fb_in1k"
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    hf_model = transformers.ViTMAEModel(config)
    hf_model.config._name_or_path = "facebook/vit-mae-large"  # what from_pretrained records
    assert pathsurgeon.published_rate(hf_model) == pathsurgeon.published_rate("facebook/vit-mae-large")


def test_unknown_model_raises_one_line_naming_the_model():
    with pytest.raises(pathsurgeon.NoPublishedRateError, match=r"resnet18\.a1_in1k") as caught:
        pathsurgeon.published_rate("resnet18")
    assert "\n" not in str(caught.value)
    assert pathsurgeon.published_rates(torch.nn.Linear(2, 2)) == []


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_published_refuses_before_loading_where_none_is_recorded(capsys, monkeypatch):
    from pathsurgeon import specs

    monkeypatch.setattr(specs, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, out, err = run(capsys, "add", "--model", "resnet18", "--rate", "published")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no published fine-tuning rate" in err


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit3_small_patch16_224.fb_in22k_ft_in1k"])
def test_cli_add_published_uses_the_rate_and_its_schedule(capsys, tmp_path, name):
    expected = pathsurgeon.published_rate(name)
    report = tmp_path / "plan.json"
    code, out, err = run(capsys, "add", "--model", name, "--rate", "published", "--json", str(report))
    assert code == 0, err
    assert expected.source in out
    data = json.loads(report.read_text())
    assert data["rate"] == expected.rate and data["schedule"] == expected.schedule
    model = timm.create_model(name, pretrained=False)
    want = pathsurgeon.preview(model, expected.rate, schedule=expected.schedule)
    assert [b["rate"] for b in data["branches"]] == [b.rate for b in want]


def test_cli_inspect_shows_the_published_rate_with_its_source(capsys):
    code, out, err = run(capsys, "inspect", "--model", "deit_tiny_patch16_224")
    assert code == 0, err
    entry = pathsurgeon.published_rate("deit_tiny_patch16_224")
    assert f"published fine-tuning rate for {entry.matched}: {entry.rate:g}" in out and entry.source in out
    code, out, err = run(capsys, "inspect", "--model", "resnet18")
    assert code == 0 and "published fine-tuning rate for resnet18.a1_in1k: none recorded" in out


def test_timm_hub_ids_are_looked_up_as_timm_names():
    for spec in ("timm/convnext_base.fb_in22k", "hf-hub:timm/convnext_base.fb_in22k"):
        assert pathsurgeon.published_rate(spec) == pathsurgeon.published_rate("convnext_base.fb_in22k")
