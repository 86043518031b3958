"""pathsurgeon.manifest: a ``pathsurgeon.json`` written by save reads back as written, and a file that
strays from the schema is refused in one line naming the field (the file is untrusted input)."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch

import pathsurgeon
from pathsurgeon.changes import record_of
from pathsurgeon.choices import MODES, SCHEDULES
from pathsurgeon.config import DropPathConfig
from pathsurgeon.manifest import FORMAT_VERSION, MANIFEST, read_manifest, validate_manifest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A manifest written by pathsurgeon.save for a surgered tiny timm ViT, and the model's record."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    pathsurgeon.add(model, DropPathConfig(0.2, mode="skip", exclude=["blocks.0"], batch_norm="kept_rows"))
    pathsurgeon.set_rate(model, 0.3)
    directory = tmp_path_factory.mktemp("saved") / "run"
    pathsurgeon.save(model, directory)
    return directory, record_of(model)


def write(directory, data) -> None:
    directory.mkdir(exist_ok=True)
    (directory / MANIFEST).write_text(json.dumps(data))


def test_a_saved_manifest_reads_back_with_the_surgery_as_recorded(saved):
    directory, record = saved
    data = read_manifest(directory)
    assert (data["format"], data["pathsurgeon"]) == (FORMAT_VERSION, pathsurgeon.__version__)
    assert data["source"] == {"library": "timm", "name": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                              "kwargs": {"num_classes": 5, "img_size": 32}}
    surgery = data["surgery"]
    assert DropPathConfig.from_dict(surgery["config"]) == record.config  # batch_norm and patterns included
    assert (surgery["rate"], surgery["schedule"]) == (0.3, "auto")  # the rate in effect, not add's
    assert surgery["targets"] == record.targets
    assert [b["block"] for b in surgery["branches"]] == [b.block for b in record.branches]


def test_every_mode_and_schedule_name_is_valid_and_no_other_is(saved, tmp_path):
    directory, _ = saved
    data = read_manifest(directory)
    for mode in MODES:
        validate_manifest({**data, "surgery": {**data["surgery"], "config": {**data["surgery"]["config"],
                                                                             "mode": mode}}})
    for schedule in SCHEDULES:
        validate_manifest({**data, "surgery": {**data["surgery"], "schedule": schedule}})
    bad = {**data, "surgery": {**data["surgery"], "config": {**data["surgery"]["config"], "mode": "drop"}}}
    write(tmp_path / "mode", bad)
    with pytest.raises(pathsurgeon.ManifestError) as caught:
        read_manifest(tmp_path / "mode")
    assert "is not a valid pathsurgeon manifest: surgery.config.mode: 'drop' is not one of" in str(caught.value)
    bad = {**data, "surgery": {**data["surgery"], "schedule": "cosine"}}
    with pytest.raises(pathsurgeon.ManifestError, match="surgery.schedule"):
        validate_manifest(bad)


@pytest.mark.parametrize(("change", "field"), [
    # a free-form constructor argument would let a file make timm open any checkpoint_path
    (lambda d: d["source"]["kwargs"].update(checkpoint_path="/etc/passwd"), "source.kwargs"),
    # JSON's 5.0 is an integer to the standard, a float to the constructor: refused
    (lambda d: d["source"]["kwargs"].update(num_classes=5.0), "source.kwargs.num_classes: must be of type integer"),
    (lambda d: d["surgery"]["branches"][0].update(rate=1.0), "surgery.branches.0.rate"),
    (lambda d: d.update(extra=1), "the top level"),
])
def test_a_manifest_off_the_schema_is_refused_naming_the_field(saved, tmp_path, change, field):
    data = read_manifest(saved[0])
    change(data)
    write(tmp_path / "run", data)
    with pytest.raises(pathsurgeon.ManifestError) as caught:
        read_manifest(tmp_path / "run")
    message = str(caught.value)
    assert f"is not a valid pathsurgeon manifest: {field}" in message
    assert message.endswith("rewrite it with pathsurgeon.save") and "\n" not in message


def test_unreadable_manifests_are_refused_before_parsing(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_text("{not json")
    with pytest.raises(pathsurgeon.ManifestError, match=r"cannot read .*pathsurgeon.json \(Expecting"):
        read_manifest(tmp_path / "broken")
    (tmp_path / "folder" / MANIFEST).mkdir(parents=True)
    with pytest.raises(pathsurgeon.ManifestError, match="is not a regular file"):
        read_manifest(tmp_path / "folder")
    with pytest.raises(pathsurgeon.ManifestError, match="cannot read"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MANIFEST).write_text(json.dumps({"format": 0}))
    with pytest.raises(pathsurgeon.ManifestError, match="has manifest format 0; this pathsurgeon reads formats 1, 2"):
        read_manifest(tmp_path / "old")
    assert os.listdir(tmp_path / "old") == [MANIFEST]  # reading writes nothing
