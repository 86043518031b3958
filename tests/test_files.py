"""Outputs under pressure: other programs writing the same path, exports with external data, a full disk,
signals at awkward moments. Each case is run as it happens (two processes, a real rlimit, a real signal)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pathsurgeon import cli

MODEL = "test_vit"

# Runs the CLI with pathsurgeon.add held after it returns, until the test says go: the window in which a
# long surgery runs and another program may write the output path.
HELD = """
import sys, time
from pathlib import Path

import pytest
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


# --- ONNX over 2 GB -----------------------------------------------------------------------------------


def test_an_export_with_external_data_is_carried_into_place_and_loads_there(tmp_path, monkeypatch):
    """torch writes NAME.onnx.data beside the .onnx for models over 2 GB; lowering its threshold makes a tiny
    model take that path. Both files must end up in place, and the file must load from there."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import torch
    from torch.onnx._internal.exporter import _onnx_program

    from pathsurgeon.export import export_onnx

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    report = export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-5)
    # the same export without external data leaves the earlier weights file alone (it is not ours to delete)
    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 1 << 40)
    export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])


def test_an_export_whose_weights_file_is_missing_in_place_is_put_back(tmp_path, monkeypatch):
    """The check runs on the file in place; when it fails, what was there before is back and nothing is left."""
    import torch
    from torch.onnx._internal.exporter import _onnx_program

    from pathsurgeon import export
    from pathsurgeon.errors import PathSurgeonError

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    monkeypatch.setattr(export, "_carry_external_data", lambda proto, staging, data_staging, target:
                        data_staging.unlink())  # what the old code did: the weights file stays in staging
    (tmp_path / "m.onnx").write_text("the user's earlier export")
    model = torch.nn.Sequential(torch.nn.Linear(8, 64)).eval()  # over the size kept inline
    with pytest.raises(PathSurgeonError, match="missing once in place"):
        export.export_onnx(model, tmp_path / "m.onnx", example_inputs=(torch.randn(2, 8),))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_text() == "the user's earlier export"
