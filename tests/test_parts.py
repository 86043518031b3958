"""pathsurgeon.parts: the library models inside a model, found, selected and scheduled part by part, on
real timm models inside a user's module (no mocks: the graphs are captured from the real forward)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import pathsurgeon
from pathsurgeon import parts
from pathsurgeon.capture import capture
from pathsurgeon.config import matches, selected
from pathsurgeon.finder import find_residual_adds


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TwoTowersAndANeck(nn.Module):
    """Two timm models (depth 2 and 3) side by side and a neck of residual blocks no library built."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=0)
        self.other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=0)
        self.neck = nn.Sequential(Residual(192), Residual(192))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.image(x) + self.other(x))


@pytest.fixture(scope="module")
def composite():
    model = TwoTowersAndANeck().eval()
    view = capture(model, None).view
    return model, view, find_residual_adds(view)


def test_a_timm_model_is_one_part_itself_and_timm_models_inside_a_module_are_parts_at_their_paths():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    assert parts.library_parts(vit) == [parts.Part("", "timm", "the model")]
    found = parts.library_parts(TwoTowersAndANeck())
    assert [(p.path, p.library, p.source) for p in found] == [("image", "timm", "timm model"),
                                                             ("other", "timm", "timm model")]
    assert parts.part_of("other.blocks.1", found).path == "other" and parts.part_of("neck.0", found) is None


def test_a_region_is_left_alone_with_the_include_that_brings_it_in(composite):
    model, view, adds = composite
    selection = parts.select_by_part(view, adds, parts.library_parts(model))
    assert [(p.path, len(chosen)) for p, chosen in selection.groups] == [("image", 4), ("other", 6)]
    region = next(p for p in selection.parts if p.is_region)
    assert (region.path, region.default) == ("neck", False)
    reasons = {k.block: k.reason for k in selection.left_alone}
    assert set(reasons) == {"neck.0", "neck.1"} and "include=['neck.*'] brings it in" in reasons["neck.0"]

    brought_in = parts.select_by_part(view, adds, parts.library_parts(model), include=("neck.*",))
    assert [p.path for p, _ in brought_in.groups] == ["image", "other", "neck"]
    assert brought_in.left_alone == []
    # an exclude pattern that names every block of the region keeps it out, include or not
    excluded = parts.select_by_part(view, adds, parts.library_parts(model), include=("neck.*",), exclude=("neck.*",))
    assert [p.path for p, _ in excluded.groups] == ["image", "other"]


def test_include_and_exclude_patterns_match_one_way_everywhere():
    assert matches("stages.1.blocks.0", ["stages.*"])  # * spans dots
    assert not matches("Blocks.0", ["blocks.*"])  # case-sensitive on every platform
    assert selected("blocks.3", (), ())  # no include: every block
    assert not selected("blocks.3", (), (), no_include_selects=False)  # a region needs a pattern that names it
    assert not selected("blocks.3", ["blocks.*"], ["blocks.3"])  # exclude wins
    config = pathsurgeon.DropPathConfig(0.1, include=["blocks.*"], exclude=["blocks.3"])
    assert [config.selects(b) for b in ("blocks.2", "blocks.3", "head")] == [True, False, False]


def test_a_list_schedule_is_split_over_the_parts_in_execution_order(composite):
    model, view, adds = composite
    selection = parts.select_by_part(view, adds, parts.library_parts(model))
    assert parts.split_schedule(model, selection.groups, [0.1, 0.2, 0.3, 0.4, 0.5]) == [[0.1, 0.2], [0.3, 0.4, 0.5]]
    assert parts.split_schedule(model, selection.groups, "linear") == ["linear", "linear"]
    with pytest.raises(pathsurgeon.InvalidScheduleError) as caught:
        parts.split_schedule(model, selection.groups, [0.1] * 4)
    assert str(caught.value).startswith(
        "schedule has 4 rates but the model's parts have 5 depth units (image: 2, other: 3); pass 5 rates"
    )


def test_set_rate_refuses_a_list_of_the_wrong_length_as_add_does_and_splits_one_that_fits():
    model = TwoTowersAndANeck()
    with pytest.raises(pathsurgeon.InvalidScheduleError) as at_add:
        pathsurgeon.add(model, None, schedule=[0.1] * 4, example_inputs=torch.randn(2, 3, 32, 32))
    assert not pathsurgeon.is_surgered(model)
    pathsurgeon.add(model, 0.1, example_inputs=torch.randn(2, 3, 32, 32))
    with pytest.raises(pathsurgeon.InvalidScheduleError) as at_set_rate:
        pathsurgeon.set_rate(model, None, schedule=[0.1] * 4)
    assert str(at_set_rate.value) == str(at_add.value)
    branches = pathsurgeon.set_rate(model, None, schedule=[0.1, 0.2, 0.3, 0.4, 0.5])
    by_block = {b.block: b.rate for b in branches}
    assert by_block == pytest.approx({"image.blocks.0": 0.1, "image.blocks.1": 0.2, "other.blocks.0": 0.3,
                                      "other.blocks.1": 0.4, "other.blocks.2": 0.5})
