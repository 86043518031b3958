"""The environment pushing back: other programs writing the same path, exports with external data, a full
disk, a closed stdout, sizes that would exhaust memory, signals at awkward moments. Each case is run as it
happens (two processes, a real rlimit, a real pipe, a real signal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ONNX_EXPORT
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@ONNX_EXPORT
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


@pytest.mark.slow
@ONNX_EXPORT
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


# --- a full disk, a closed stdout, sizes that would exhaust memory --------------------------------------

CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over RLIMIT_FSIZE a write then fails with EFBIG, as on a full disk
limit, size = sys.argv[1], int(sys.argv[2])
if size:
    resource.setrlimit(getattr(resource, limit), (size, size))
from pathsurgeon import cli
sys.exit(cli.main(sys.argv[3:]))
"""


def run_limited(tmp_path: Path, limit: str, size: int, *argv, **popen) -> subprocess.CompletedProcess:
    script = tmp_path / "limited.py"
    script.write_text(CLI)
    return subprocess.run([sys.executable, str(script), limit, str(size), *map(str, argv)], text=True,
                          capture_output="stdout" not in popen, timeout=300, **popen)


@pytest.mark.slow
def test_a_full_disk_while_writing_exits_2_and_removes_the_folders_it_made(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = run_limited(tmp_path, "RLIMIT_FSIZE", 20_000, "add", "--model", MODEL, "--rate", "0.1",
                       "--out", work / "a" / "b" / "c")
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "File too large" in line and "nothing was written" in line
    assert list(work.iterdir()) == []  # a/b made for --out a/b/c are gone too


def test_no_space_left_reported_by_a_library_exits_2(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):  # what safetensors' Rust writer raises on ENOSPC
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert cli.main(["add", "--model", MODEL, "--rate", "0.1", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on the device holding" in line and "nothing was written" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_closed_stdout_is_not_an_internal_error_and_the_outputs_are_written_first(tmp_path):
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is printed (| head -1 that already finished)
    try:
        done = run_limited(tmp_path, "RLIMIT_FSIZE", 0, "add", "--model", MODEL, "--rate", "0.1",
                           "--out", tmp_path / "o", stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr  # as a shell reports a command its reader left
    assert "error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
    with open("/dev/full", "w") as full:
        done = run_limited(tmp_path, "RLIMIT_FSIZE", 0, "add", "--model", MODEL, "--rate", "0.1",
                           "--out", tmp_path / "p", stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 2, done.stderr
    assert "p was written completely" in one_error_line(done.stderr)
    assert (tmp_path / "p" / "model.safetensors").is_file()


def convnext_dir(folder: Path, image_size: int) -> Path:
    import transformers

    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32,
                                         num_labels=3)
    transformers.ConvNextForImageClassification(config).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "image_size": image_size}))
    return folder


@pytest.mark.slow
def test_an_image_size_no_weight_checks_is_bounded_before_any_input_is_made(tmp_path):
    """ConvNeXt's weights do not depend on image_size: 16384 asked for a 6 GB input and more in the forward.
    Under a memory cap below that, the run must refuse with one line, not die or exit 3."""
    folder = convnext_dir(tmp_path / "convnext", 16384)
    for command in (["inspect", "--model", folder], ["add", "--model", folder, "--rate", "0.1"]):
        done = run_limited(tmp_path, "RLIMIT_AS", 5_500 << 20, *command)
        assert done.returncode == 2, done.stderr
        assert "3x16384x16384, over the 12,582,912 values per image" in one_error_line(done.stderr)


def test_an_image_size_no_image_has_exits_2(tmp_path, capsys):
    folder = convnext_dir(tmp_path / "convnext", -32)
    assert cli.main(["inspect", "--model", str(folder)]) == 2
    assert "3x-32x-32, which no image has" in one_error_line(capsys.readouterr().err)


def test_a_marker_nested_past_the_parsers_limit_is_not_ours(tmp_path):
    from pathsurgeon import files

    look_alike = tmp_path / ".out.pathsurgeon-1-x"
    look_alike.mkdir()
    (look_alike / files.MARKER).write_text("[" * 3000)
    assert files.remove_stale_staging(tmp_path / "out") == []
    assert look_alike.is_dir()


# --- signals -------------------------------------------------------------------------------------------

# Makes a staging directory with the marker write held, so that the process can be killed in between.
BEFORE_MARKER = """
import sys, time
from pathlib import Path
from pathsurgeon import files
def held(directory):
    Path({ready!r}).write_text(str(directory))
    time.sleep(120)
files._write_marker = held
files._make_staging_dir(Path(sys.argv[1]))
"""


def test_a_run_killed_before_its_marker_is_written_leaves_nothing_the_next_run_keeps(tmp_path):
    import signal

    from pathsurgeon import files

    work, ready = tmp_path / "work", tmp_path / "ready"
    work.mkdir()
    script = tmp_path / "before_marker.py"
    script.write_text(BEFORE_MARKER.format(ready=str(ready)))
    process = subprocess.Popen([sys.executable, str(script), str(work / "out")])
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    (stale,) = work.iterdir()
    assert list(stale.iterdir()) == []  # a staging directory without its marker
    look_alike = work / f"{stale.name[:-3]}zzz"  # same name pattern, but holding a user's file: never touched
    look_alike.mkdir()
    (look_alike / "notes.txt").write_text("mine")
    assert files.remove_stale_staging(work / "out") == [stale]
    assert [p.name for p in work.iterdir()] == [look_alike.name]


def test_a_signal_after_the_outputs_are_in_place_says_they_were_written(tmp_path, capsys, monkeypatch):
    from pathsurgeon import report

    def interrupted(self):  # the table is printed after the outputs are written: Ctrl-C there
        raise KeyboardInterrupt

    monkeypatch.setattr(report.Report, "__str__", interrupted)
    assert cli.main(["add", "--model", MODEL, "--rate", "0.1", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "o was written completely" in err and "nothing was written" not in err
    assert (tmp_path / "o" / "model.safetensors").is_file()


# Runs the CLI with the checkpoint write blocked once the staging directory holds the weights; with
# GATE set, the clean-up of a staging directory also waits (after writing CLEANING) until the GATE file
# appears, so that a second signal can be sent while the clean-up runs.
TWICE = """
import os, shutil, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, even under `pytest &`
import safetensors.torch
real_save, real_rmtree = safetensors.torch.save_file, shutil.rmtree
def slow_save(state, path, metadata=None):
    real_save(state, path, metadata=metadata)
    Path({ready!r}).write_text("staged")
    time.sleep(120)
def gated_rmtree(path, *args, **kwargs):
    gate = os.environ.get("GATE")
    if gate and ".pathsurgeon-" in Path(path).name and not Path(gate).exists():
        Path({cleaning!r}).write_text("cleaning")
        deadline = time.monotonic() + 30
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_rmtree(path, *args, **kwargs)
safetensors.torch.save_file, shutil.rmtree = slow_save, gated_rmtree
from pathsurgeon import cli
sys.exit(cli.main())  # as the console script runs it
"""


def wait_for(path: Path, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"the run never reached {what}"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("first, second, exit_code", [("SIGINT", "SIGINT", 130), ("SIGTERM", "SIGHUP", 143)])
def test_a_second_signal_during_the_clean_up_is_held_until_it_is_done(tmp_path, first, second, exit_code):
    """Ctrl-C twice, or SIGTERM then SIGHUP, while a checkpoint is written: the second signal lands during
    the clean-up (held there until it is done) or just before or after it. Each time the run exits with
    the first signal's code, without a traceback, and leaves neither staging directories nor the output."""
    import signal

    first_signal, second_signal = getattr(signal, first), getattr(signal, second)
    # None: the second signal is sent once the run is inside the clean-up; a number: that many seconds after
    # the first (after the run took it, before or after its clean-up). The runs start together.
    gaps = [None, 0.05]
    runs = []
    for index, gap in enumerate(gaps):
        folder = tmp_path / f"run{index}"
        work = folder / "work"
        work.mkdir(parents=True)
        script = folder / "twice.py"
        script.write_text(TWICE.format(ready=str(folder / "ready"), cleaning=str(folder / "cleaning")))
        env = dict(os.environ, GATE=str(folder / "gate")) if gap is None else dict(os.environ)
        process = subprocess.Popen([sys.executable, str(script), "add", "--model", MODEL, "--rate", "0.1",
                                    "--out", str(work / "D")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env)
        runs.append((gap, folder, work, process))
    for gap, folder, work, process in runs:
        wait_for(folder / "ready", process, "the checkpoint write")
        assert [p.name for p in work.iterdir() if p.name.startswith(".D.pathsurgeon-")]  # staged, not yet in place
        process.send_signal(first_signal)
        if gap is None:
            wait_for(folder / "cleaning", process, "the clean-up")
            process.send_signal(second_signal)
            time.sleep(0.05)  # the second signal is delivered (and held) while the clean-up still waits
            (folder / "gate").write_text("go")
        else:
            time.sleep(gap)
            process.send_signal(second_signal)
        _, err = process.communicate(timeout=120)
        context = f"{first} then {second}, gap {gap}: {err}"
        assert process.returncode == exit_code, context
        assert "Traceback" not in err and "nothing was written" in err, context
        assert list(work.iterdir()) == [], context  # no staging directory, no D
