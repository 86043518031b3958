"""DropPathConfig: the same surgery as the keyword form, checked once, with include / exclude by block."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from conftest import module_layout, pathsurgeon_leftovers

import pathsurgeon
from pathsurgeon.changes import record_of


def vit(rate: float = 0.0):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                             drop_path_rate=rate).eval()


def drop_rates(model) -> dict[str, float]:
    return {n: m.rate for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)}


def test_a_config_does_what_the_keywords_do():
    by_keywords, by_config = vit(), vit()
    expected = pathsurgeon.add(by_keywords, 0.3, schedule="linear", mode="skip")
    config = pathsurgeon.DropPathConfig(0.3, schedule="linear", mode="skip")
    report = pathsurgeon.add(by_config, config)
    assert report.branches == expected.branches
    assert drop_rates(by_config) == drop_rates(by_keywords)
    assert record_of(by_config).config == config  # the record keeps the config it was given


def test_config_and_keywords_together_are_refused():
    model = vit()
    with pytest.raises(pathsurgeon.PathSurgeonError, match="not both") as caught:
        pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.1), mode="skip")
    assert "\n" not in str(caught.value)
    assert pathsurgeon_leftovers(model) == []


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"rate": 1.5}, pathsurgeon.InvalidRateError, "[0, 1)"),
        ({"rate": 0.1, "mode": "fast"}, pathsurgeon.InvalidModeError, "mode must be"),
        ({"rate": 0.1, "schedule": "cosine"}, pathsurgeon.InvalidScheduleError, "unknown schedule"),
        ({"rate": 0.1, "verify": -1}, pathsurgeon.PathSurgeonError, "tolerance >= 0"),
        ({"rate": 0.1, "include": [3]}, pathsurgeon.PathSurgeonError, "glob patterns"),
        ({"rate": None}, pathsurgeon.InvalidScheduleError, "needs a rate"),
    ],
)
def test_a_config_is_checked_when_it_is_made(kwargs, error, words):
    with pytest.raises(error, match=None) as caught:
        pathsurgeon.DropPathConfig(**kwargs)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_exclude_leaves_blocks_alone_and_moves_no_other_rate():
    full, partial = vit(), vit()
    pathsurgeon.add(full, 0.3)
    report = pathsurgeon.add(partial, pathsurgeon.DropPathConfig(0.3, exclude=["blocks.3"]))
    assert report.blocks == ["blocks.0", "blocks.1", "blocks.2"]
    assert [s.block for s in report.left_alone if "excluded" in s.reason] == ["blocks.3"]
    expected = {n: r for n, r in drop_rates(full).items() if not n.startswith("blocks.3.")}
    assert drop_rates(partial) == expected  # the schedule is still over all four blocks
    assert type(partial.blocks[3].drop_path1) is torch.nn.Identity  # untouched: timm's own empty slot
    # set_rate keeps to the configured blocks
    pathsurgeon.set_rate(partial, 0.6)
    pathsurgeon.set_rate(full, 0.6)
    assert drop_rates(partial) == {n: r for n, r in drop_rates(full).items() if not n.startswith("blocks.3.")}


def test_include_selects_blocks_by_glob_and_strip_restores_everything():
    model = vit()
    layout = module_layout(model)
    report = pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.3, include=["blocks.[23]"]))
    assert report.blocks == ["blocks.2", "blocks.3"]
    assert set(drop_rates(model)) == {f"blocks.{i}.drop_path{j}" for i in (2, 3) for j in (1, 2)}
    pathsurgeon.strip(model)
    assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []


def test_patterns_that_select_nothing_are_refused():
    model = vit()
    with pytest.raises(pathsurgeon.PathSurgeonError, match="leave none of the 4 blocks"):
        pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.1, include=["stages.*"]))
    assert pathsurgeon_leftovers(model) == []


def test_excluding_a_block_keeps_the_drop_path_its_library_built():
    """A model built with a drop path rate keeps it where the config excludes pathsurgeon."""
    model = vit(0.2)
    theirs = model.blocks[3].drop_path1
    pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.3, exclude=["blocks.3"]))
    assert model.blocks[3].drop_path1 is theirs and not isinstance(theirs, pathsurgeon.DropPath)


def test_a_pattern_that_matches_no_block_warns_with_the_closest_names():
    model = vit()
    config = pathsurgeon.DropPathConfig(0.1, include=["blocks.*", "stage.*"], exclude=["block.3"])
    with pytest.warns(UserWarning) as caught:
        report = pathsurgeon.add(model, config)
    messages = sorted(str(w.message) for w in caught if "matches no block" in str(w.message))
    assert len(messages) == 2
    assert messages[0].startswith("exclude pattern 'block.3' matches no block with residual branches (closest: "
                                  "blocks.3, ")
    assert messages[1].startswith("include pattern 'stage.*' matches no block")
    assert all(w.filename == __file__ for w in caught if "matches no block" in str(w.message))  # the caller's line
    assert len({b.block for b in report.branches}) == 4  # the typo excluded nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pathsurgeon.strip(model)
        pathsurgeon.add(model, pathsurgeon.DropPathConfig(0.1, exclude=["blocks.3"]))  # matches: no warning
