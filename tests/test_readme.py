"""The README's Python blocks that claim to run do run, offline, as a new user copies them."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pathsurgeon

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.slow
def test_quick_start_runs_offline_as_written(tmp_path):
    """The first two blocks (the quick start and DropPathConfig), run with no network in a fresh folder.

    As written the block builds vit_base_patch16_224 (about a minute here); the test runs it on
    vit_tiny_patch16_224, the same architecture with 12 blocks too, so that every printed claim holds.
    """
    quick_start, config = python_blocks()[:2]
    code_only = "\n".join(line.split("#")[0] for line in quick_start.splitlines())
    assert "pretrained=True" not in code_only  # the comment above the call explains it
    assert re.search(r"create_model\(\"vit_base_patch16_224\", pretrained=False\)", quick_start)
    code = (quick_start + config).replace("vit_base_patch16_224", "vit_tiny_patch16_224")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "24 branches in 12 blocks" in result.stdout  # what the block's comment promises
    assert (tmp_path / "runs" / "vit" / "pathsurgeon.json").is_file()


def _keys(text: str, start: int = 0) -> tuple[dict[str, dict | None], int]:
    """The README's key outline `{"a", "b": [{"c"}]}` as {"a": None, "b": {"c": None}}."""
    keys: dict[str, dict | None] = {}
    position = start + 1  # past "{"
    while text[position] != "}":
        if text[position] == '"':
            end = text.index('"', position + 1)
            name, position = text[position + 1:end], end + 1
            keys[name] = None
            if text.startswith(": [{", position):
                keys[name], position = _keys(text, position + 3)
                position = text.index("]", position) + 1
        else:
            position += 1
    return keys, position + 1


def _outline(value: object) -> dict[str, dict | None]:
    return {key: _outline(item[0]) if isinstance(item, list) and item and isinstance(item[0], dict) else None
            for key, item in value.items()}


def test_json_key_list_is_what_add_json_writes(tmp_path, capsys):
    import json

    from pathsurgeon import cli

    bullet = README.read_text().split("- `--json FILE`", 1)[1].split("\n- ", 1)[0]
    outline = " ".join(bullet.split("`{", 1)[1].split("}`", 1)[0].split())
    documented, _ = _keys("{" + outline + "}")
    assert cli.main(["add", "--model", "test_vit", "--rate", "0.1", "--json", str(tmp_path / "plan.json")]) == 0
    written = _outline(json.loads((tmp_path / "plan.json").read_text()))
    # lists that are empty for this model: their entries are these dataclasses
    for key, kind in (("left_alone", pathsurgeon.LeftAlone), ("computed_in_full", pathsurgeon.Fallback)):
        assert documented.pop(key) == {field.name: None for field in dataclasses.fields(kind)}
        assert written.pop(key) is None
    assert written["parts"]["branches"] == written["branches"]  # a part's branches: the same entries
    written["parts"]["branches"] = None  # which the README does not spell out a second time
    assert documented == written
