"""Outputs under pressure: other programs writing the same path, exports with external data, a full disk,
signals at awkward moments. Each case is run as it happens (two processes, a real rlimit, a real signal)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from safetensors.torch import load_file

from pathsurgeon import cli

MODEL = "test_vit"

# Runs the CLI with pathsurgeon.add held after it returns, until the test says go: the window in which a
# long surgery runs and another program may write the output path.
HELD = """
import sys, time
from pathlib import Path
import pathsurgeon.surgery as surgery
real = surgery.add
def held_add(*args, **kwargs):
    report = real(*args, **kwargs)
    Path({ready!r}).write_text("ready")
    deadline = time.monotonic() + 120
    while not Path({go!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return report
surgery.add = held_add
from pathsurgeon import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def start_held(tmp_path: Path, *argv) -> tuple[subprocess.Popen, Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = tmp_path / "held.py"
    script.write_text(textwrap.dedent(HELD.format(ready=str(ready), go=str(go))))
    process = subprocess.Popen([sys.executable, str(script), *map(str, argv)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the held run never reached its surgery"
        time.sleep(0.05)
    return process, go


def finish(process: subprocess.Popen, go: Path) -> tuple[int, str]:
    go.write_text("go")
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pathsurgeon: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_directory_another_run_wrote_at_a_file_output_is_never_deleted(tmp_path, capsys):
    """`add --json D` runs while another run writes its checkpoint directory at D: the first refuses."""
    work = tmp_path / "work"
    work.mkdir()
    target = work / "D"
    process, go = start_held(tmp_path, "add", "--model", MODEL, "--rate", "0.1", "--json", target)
    assert cli.main(["add", "--model", MODEL, "--rate", "0.1", "--out", str(target)]) == 0
    capsys.readouterr()
    code, err = finish(process, go)
    assert code == 2, err
    assert "changed while pathsurgeon ran" in one_error_line(err)
    assert sorted(load_file(target / "model.safetensors"))  # the other run's checkpoint is intact
    assert sorted(p.name for p in work.iterdir()) == ["D"]  # and no staging left over


def test_a_file_another_run_wrote_at_an_output_is_not_replaced(tmp_path, capsys):
    """Two runs write the same --json path; the one that commits second refuses instead of replacing."""
    target = tmp_path / "plan.json"
    process, go = start_held(tmp_path, "add", "--model", MODEL, "--rate", "0.1", "--json", target)
    assert cli.main(["add", "--model", MODEL, "--rate", "0.2", "--json", str(target)]) == 0
    capsys.readouterr()
    code, err = finish(process, go)
    assert code == 2, err
    assert "changed while pathsurgeon ran" in one_error_line(err)
    assert json.loads(target.read_text())["rate"] == 0.2


def test_an_output_file_that_was_there_when_checked_is_replaced(tmp_path, capsys):
    target = tmp_path / "plan.json"
    target.write_text("old")
    assert cli.main(["add", "--model", MODEL, "--rate", "0.1", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["rate"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
