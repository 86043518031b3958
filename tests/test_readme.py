"""The README's Python blocks that claim to run do run, offline, as a new user copies them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


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
