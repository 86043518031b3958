"""Untrusted files and careless use: crafted directories, manifests, weights and paths.

Every case asserts what a user relies on: no foreign code ran (a marker file the crafted code would
create stays absent), nothing of the user's was overwritten, the command exits 2 with one error line,
and nothing half-written is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import export_works, supported_from, timm_model
from safetensors.torch import load_file, save_file

import pathsurgeon
from pathsurgeon import checkpoint, cli, specs
from pathsurgeon.weights import load_weights

transformers = pytest.importorskip("transformers")

MODEL = "test_vit"  # timm's own tiny test model: builds in milliseconds


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, *words: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("pathsurgeon: error")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in errors[0], errors[0]


def digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path``: proves nothing was overwritten."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "pathsurgeon" in p.name and p.name.startswith("."))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A real, loadable Hugging Face directory of a tiny ViT classifier."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def surgered_dir(tmp_path_factory) -> Path:
    """A directory written by ``pathsurgeon add --out`` for a timm model."""
    folder = tmp_path_factory.mktemp("surgered") / "dp"
    assert cli.main(["add", "--model", MODEL, "--rate", "0.1", "--out", str(folder)]) == 0
    return folder


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


# --- foreign code ----------------------------------------------------------------------------------

EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def with_remote_code(hf_dir: Path, folder: Path, marker: Path, nested: bool = False) -> Path:
    """A copy of ``hf_dir`` whose config asks transformers to import the directory's own Python files."""
    copy_dir(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    if nested:
        config["vision_config"] = {"auto_map": auto_map}
    else:
        config["auto_map"] = auto_map
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(EVIL_MODULE.format(marker=str(marker)))
    return folder


@pytest.mark.parametrize("nested", [False, True])
def test_directory_with_its_own_code_is_refused_everywhere(hf_dir, tmp_path, capsys, nested):
    marker = tmp_path / "marker"
    evil = with_remote_code(hf_dir, tmp_path / "evil", marker, nested=nested)
    pathsurgeon_dir = copy_dir(evil, tmp_path / "evil-surgered")
    manifest = {"format": 1, "source": {"library": "transformers", "class": "ViTForImageClassification"},
                "surgery": None}
    (pathsurgeon_dir / "pathsurgeon.json").write_text(json.dumps(manifest))
    before = digest(tmp_path)
    for argv in (
        ["add", "--model", evil, "--rate", "0.1"],
        ["inspect", "--model", evil],
        ["export", "--model", evil, "--onnx", tmp_path / "a.onnx"],
        ["strip", "--in", pathsurgeon_dir, "--out", tmp_path / "clean"],
        ["export", "--in", pathsurgeon_dir, "--onnx", tmp_path / "b.onnx"],
    ):
        if argv[0] == "export" and not export_works():
            continue  # refused for the torch release before the directory is read
        code, _, err = run(capsys, *argv)
        assert_refused(code, err, "auto_map", "never")
    with pytest.raises(pathsurgeon.PathSurgeonError, match="auto_map"):
        pathsurgeon.load(pathsurgeon_dir)
    assert not marker.exists()
    assert digest(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.slow
def test_remote_code_is_refused_even_when_stdin_says_yes(hf_dir, tmp_path):
    """transformers prompts "Do you wish to run the custom code? [y/N]"; a yes on stdin must change nothing."""
    marker = tmp_path / "marker"
    evil = with_remote_code(hf_dir, tmp_path / "evil", marker)
    result = subprocess.run(
        [sys.executable, "-m", "pathsurgeon.cli", "add", "--model", str(evil), "--rate", "0.1"],
        input="y\ny\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "auto_map" in result.stderr
    assert not marker.exists()


def test_cached_hub_repo_with_its_own_code_is_refused(hf_dir, tmp_path, capsys, monkeypatch):
    """The same refusal for a hub id found in the local cache, before transformers reads it."""
    marker = tmp_path / "marker"
    snapshot = tmp_path / "cache" / "models--someone--evil" / "snapshots" / ("0" * 40)
    with_remote_code(hf_dir, snapshot, marker)
    (tmp_path / "cache" / "models--someone--evil" / "refs").mkdir()
    (tmp_path / "cache" / "models--someone--evil" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, "add", "--model", "someone/evil", "--rate", "0.1")
    assert_refused(code, err, "auto_map")
    assert not marker.exists()


class _Boom:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_pickles_are_never_run(hf_dir, tmp_path, capsys):
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"weight": _Boom(str(marker))}}, tmp_path / "evil.pth")
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--weights", tmp_path / "evil.pth")
    assert_refused(code, err, "weights_only=True")
    # an HF directory whose only weights file is such a pickle
    folder = copy_dir(hf_dir, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"vit.embeddings.cls_token": _Boom(str(marker))}, folder / "pytorch_model.bin")
    code, _, err = run(capsys, "add", "--model", folder, "--rate", "0.1")
    assert code == 2, err
    assert not marker.exists()


# --- pathsurgeon.json is input, not instructions ---------------------------------------------------


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "pathsurgeon.json").read_text())


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: [m], "top level"),
        (lambda m: {**m, "source": {"library": "timm"}}, "source"),
        (lambda m: {**m, "extra": 1}, "extra"),
        (lambda m: {**m, "source": {**m["source"], "kwargs": {"checkpoint_path": "{evil}"}}}, "checkpoint_path"),
        (lambda m: {**m, "source": {**m["source"], "kwargs": {"num_classes": "{evil}"}}}, "num_classes"),
        (lambda m: {**m, "source": {**m["source"], "pretrained_cfg_overlay": {"file": "{evil}"}}}, "source"),
        (lambda m: {**m, "source": {"library": "pickle", "name": "x"}}, "source"),
        (lambda m: {**m, "source": {"library": "timm", "name": "not_a_model_anywhere"}}, "not_a_model_anywhere"),
        (lambda m: {**m, "format": 4}, "format 4"),
        (lambda m: {**m, "format": 0}, "format 0"),
        (lambda m: {**m, "pathsurgeon": "1.0; rm -rf /"}, "pathsurgeon"),
        (lambda m: {**m, "surgery": {**m["surgery"], "rate": 7}}, "surgery.rate"),
        (lambda m: {**m, "surgery": {**m["surgery"], "config": {**m["surgery"]["config"], "mode": "fast"}}},
         "surgery.config.mode"),
        (lambda m: {**m, "surgery": {**m["surgery"], "targets": [{"target": "x"}]}}, "surgery.targets.0"),
        (lambda m: {**m, "surgery": {**m["surgery"], "branches": [{"block": "x"}]}}, "surgery.branches.0"),
    ],
)
def test_crafted_manifest_is_refused(surgered_dir, tmp_path, capsys, edit, words):
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "marker"
    torch.save({"w": _Boom(str(marker))}, evil)
    folder = copy_dir(surgered_dir, tmp_path / "crafted")
    text = json.dumps(edit(_manifest(folder))).replace("{evil}", str(evil))
    (folder / "pathsurgeon.json").write_text(text)
    with pytest.raises(pathsurgeon.PathSurgeonError) as caught:
        pathsurgeon.load(folder)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    code, _, err = run(capsys, "strip", "--in", folder, "--out", tmp_path / "clean")
    assert_refused(code, err, words)
    assert not (tmp_path / "clean").exists() and not marker.exists()


def test_manifest_class_must_be_a_listed_transformers_model(hf_dir, tmp_path, capsys):
    for class_name, words in (("ViTModel", "does not list"), ("AutoTokenizer", "does not list")):
        folder = copy_dir(hf_dir, tmp_path / class_name)
        manifest = {"format": 1, "source": {"library": "transformers", "class": class_name}, "surgery": None}
        (folder / "pathsurgeon.json").write_text(json.dumps(manifest))
        command = ("export", "--in", folder, "--onnx", tmp_path / f"{class_name}.onnx") if export_works() else (
            "strip", "--in", folder, "--out", tmp_path / f"{class_name}-clean")
        code, _, err = run(capsys, *command)
        assert_refused(code, err, words)
    folder = copy_dir(hf_dir, tmp_path / "not-a-model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["pipeline"]}))
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, "not a model class")


# --- weights that do not fit -------------------------------------------------------------------------


def test_bad_weights_files_are_refused_with_one_line(tmp_path, capsys):
    state = timm.create_model(MODEL).state_dict()
    save_file(state, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    wrong = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "head.weight" else v) for k, v in state.items()}
    save_file(wrong, str(tmp_path / "shapes.safetensors"))
    torch.save({"model": {k: v for k, v in state.items() if k != "head.bias"}}, tmp_path / "partial.pth")
    (tmp_path / "a-directory").mkdir()
    for name, words in (
        ("truncated.safetensors", "truncated"),
        ("empty.safetensors", "truncated"),
        ("shapes.safetensors", "head.weight has shape"),
        ("partial.pth", "1 missing keys"),
        ("a-directory", "is a directory"),
        ("missing.safetensors", "does not exist"),
    ):
        code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--weights", tmp_path / name)
        assert_refused(code, err, words)


def test_weights_that_do_not_fit_leave_the_model_untouched(tmp_path):
    model = timm.create_model(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = timm.create_model(MODEL).state_dict()
    state["head.weight"] = torch.zeros(7, state["head.weight"].shape[1])  # the last key in load order is wrong
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(pathsurgeon.CheckpointError, match="head.weight"):
        load_weights(model, tmp_path / "w.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _headless_classifier_folder(tmp_path):
    """A Hugging Face directory whose config names a classifier but whose weights are a bare ViTModel."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    folder = tmp_path / "backbone"
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "architectures": ["ViTForImageClassification"]}))
    return folder


def test_hugging_face_checkpoint_missing_its_head_is_refused_unless_allowed(tmp_path, capsys):
    folder = _headless_classifier_folder(tmp_path)
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, "missing keys", "classifier", "--allow-missing-keys")
    code, out, err = run(capsys, "inspect", "--model", folder, "--allow-missing-keys")
    assert code == 0, err
    assert "randomly initialised" in err


# --- output paths --------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Output paths are checked before anything is loaded: loading at all fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(specs, "load_model", forbidden)
    monkeypatch.setattr(checkpoint, "load", forbidden)


def test_outputs_may_not_overwrite_inputs_or_each_other(surgered_dir, tmp_path, capsys, no_loading):
    source = copy_dir(surgered_dir, tmp_path / "in")
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(MODEL).state_dict(), str(weights))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    before = digest(tmp_path)
    for argv, words in (
        (["export", "--in", source, "--onnx", source / "model.safetensors"], "input --in"),
        (["export", "--in", source, "--onnx", source / "new.onnx"], "inside the input --in"),
        (["export", "--model", MODEL, "--weights", weights, "--onnx", weights], "input --weights"),
        (["add", "--model", MODEL, "--rate", "0.1", "--out", tmp_path / "o", "--json", tmp_path / "o" / "p.json"],
         "inside --out"),
        (["add", "--model", MODEL, "--rate", "0.1", "--out", tmp_path / "o", "--json", tmp_path / "o"],
         "is the same path as"),
        (["add", "--model", source, "--rate", "0.1", "--json", source / "pathsurgeon.json"], "input --model"),
        (["add", "--model", MODEL, "--rate", "0.1", "--json", tmp_path / "taken"], "is a directory"),
        (["add", "--model", MODEL, "--rate", "0.1", "--out", tmp_path / "taken"], "already exists"),
        (["strip", "--in", source, "--out", source], "already exists"),
        (["add", "--model", MODEL, "--rate", "0.1", "--out", ""], "--out is empty"),
        (["add", "--model", MODEL, "--rate", "0.1", "--json", ""], "--json is empty"),
    ):
        code, _, err = run(capsys, *argv)
        assert_refused(code, err, words)
    assert digest(tmp_path) == before
    assert leftovers(tmp_path) == [] and leftovers(source) == []


def test_unwritable_output_locations_are_refused_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        (tmp_path / "file" / "out", "which is a file"),
        (tmp_path / "dangling" / "out", "broken symbolic link"),
        (tmp_path / "dangling", "symbolic link"),
    ]
    if os.geteuid() != 0:  # root may write anywhere; a read-only directory only stops other users
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases.append((tmp_path / "read-only" / "out", "cannot write"))
    for out, words in cases:
        code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", out)
        assert_refused(code, err, words)
        code, _, err = run(capsys, "export", "--model", MODEL, "--onnx", out)
        assert_refused(code, err, words)


def test_a_failure_writing_the_second_output_leaves_neither(tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == "p.json" and ".p.json.pathsurgeon-" in self.parent.name:  # the staged --json file
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", tmp_path / "o",
                       "--json", tmp_path / "p.json")
    assert_refused(code, err, "no space left on the device", "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset, words", [("0", "opset 0"), ("17", "between 18"), ("999", "opset 999"),
                                          ("newest+1", "between 18 and {newest}")])
def test_unsupported_opset_is_refused_before_exporting(tmp_path, capsys, opset, words, no_loading):
    from pathsurgeon.export import supported_opsets

    newest = supported_opsets()[-1]  # what the installed onnx and exporter can write
    opset, words = opset.replace("newest+1", str(newest + 1)), words.format(newest=newest)
    code, _, err = run(capsys, "export", "--model", MODEL, "--onnx", tmp_path / "m.onnx", "--opset", opset)
    assert_refused(code, err, words)
    assert list(tmp_path.iterdir()) == []


# --- interrupted runs ------------------------------------------------------------------------------------

# Runs the CLI with the checkpoint writer blocked half-way, so that a signal arrives while the staging
# directory holds part of the checkpoint.
HARNESS = """
import signal, sys, time
from pathlib import Path
# Ctrl-C as in a terminal: a run started in the background by a non-interactive shell (pytest under
# `cmd &`) inherits SIGINT ignored, and the CLI rightly keeps that disposition
signal.signal(signal.SIGINT, signal.default_int_handler)
import safetensors.torch
real = safetensors.torch.save_file
def slow_save(state, path, metadata=None):
    real(state, path, metadata=metadata)
    Path({ready!r}).write_text("staged")
    time.sleep(120)
safetensors.torch.save_file = slow_save
from pathsurgeon import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _start_blocked_add(tmp_path: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    script = tmp_path / "harness.py"
    script.write_text(textwrap.dedent(HARNESS.format(ready=str(ready))))
    process = subprocess.Popen(
        [sys.executable, str(script), "add", "--model", MODEL, "--rate", "0.1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the harness never reached the checkpoint write"
        time.sleep(0.1)
    return process, ready


@pytest.mark.slow
@pytest.mark.parametrize("how, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_during_write_leaves_nothing_behind(tmp_path, how, exit_code):
    work = tmp_path / "work"
    work.mkdir()
    process, _ = _start_blocked_add(tmp_path, work / "out")
    assert leftovers(work) != []  # the staging directory exists while the checkpoint is written
    process.send_signal(how)
    _, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err
    assert "nothing was written" in err
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_staging_left_by_a_killed_run_is_removed_by_the_next(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    process, _ = _start_blocked_add(tmp_path, work / "out")
    process.kill()
    process.communicate(timeout=60)
    stale = leftovers(work)
    assert len(stale) == 1 and (work / stale[0] / "content" / "model.safetensors").exists()
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", work / "out")
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert sorted(load_file(work / "out" / "model.safetensors")) == sorted(timm.create_model(MODEL).state_dict())


def test_outputs_get_ordinary_permissions(tmp_path, capsys):
    """Staging paths are private while written; the outputs get the permissions of any new file."""
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", tmp_path / "o",
                       "--json", tmp_path / "p.json")
    assert code == 0, err
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~umask
    for file in (tmp_path / "p.json", tmp_path / "o" / "model.safetensors", tmp_path / "o" / "pathsurgeon.json"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_cli_leaves_the_environment_as_it_found_it(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    before = dict(os.environ)
    code, _, _ = run(capsys, "inspect", "--model", MODEL)
    assert code == 0
    assert dict(os.environ) == before


# --- issue 17: nothing lost, nothing hangs -----------------------------------------------------------


def fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> tuple[Path, dict[str, Path]]:
    """A Hugging Face cache laid out as huggingface_hub writes it: snapshot links to content-named blobs."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("a" * 40)
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    blobs = {}
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        blobs[name] = blob
    return snapshot, blobs


def test_outputs_may_not_overwrite_the_cached_files_a_hub_id_or_timm_name_reads(hf_dir, tmp_path, capsys,
                                                                                 monkeypatch, no_loading):
    cache = tmp_path / "cache"
    files = {name: (hf_dir / name).read_bytes() for name in ("config.json", "model.safetensors")}
    snapshot, blobs = fake_hub_cache(cache, "acme/tiny-vit", files)
    weights = timm.create_model(MODEL).state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    timm_id = timm.models.get_pretrained_cfg(MODEL).hf_hub_id
    _, timm_blobs = fake_hub_cache(cache, timm_id, {"model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = digest(cache)
    for model, target in (
        ("acme/tiny-vit", blobs["model.safetensors"]),  # the blob the snapshot's link points to
        ("acme/tiny-vit", blobs["config.json"]),
        ("acme/tiny-vit", snapshot / "new.json"),  # inside the repository's snapshot
        (MODEL, timm_blobs["model.safetensors"]),  # a timm name reads its pretrained file from the cache
    ):
        code, _, err = run(capsys, "add", "--model", model, "--rate", "0.1", "--json", target)
        assert_refused(code, err, "the input --model")
    assert digest(cache) == before


def test_outputs_that_are_not_regular_files_are_refused(tmp_path, capsys, no_loading):
    os.mkfifo(tmp_path / "fifo")
    cases = [(tmp_path / "fifo", "FIFO")]
    if Path("/dev/null").exists():
        cases.append((Path("/dev/null"), "character device"))
    for target, words in cases:
        for argv in (["add", "--model", MODEL, "--rate", "0.1", "--json", target],
                     ["export", "--model", MODEL, "--onnx", target]):
            code, _, err = run(capsys, *argv)
            assert_refused(code, err, words, "not a regular file")
    assert (tmp_path / "fifo").is_fifo()


def test_stale_staging_cleanup_removes_only_what_pathsurgeon_made(surgered_dir, tmp_path, capsys):
    """A path named like staging is removed only if its marker says this host and namespace made it, its
    process is gone, and it is not an input."""
    from pathsurgeon import files

    work = tmp_path / "work"
    work.mkdir()
    source = copy_dir(surgered_dir, work / ".clean.pathsurgeon-99999-x")  # an input with a staging-like name
    (work / ".clean.pathsurgeon-99999-y").write_text("a user's file")
    elsewhere = work / ".clean.pathsurgeon-99998-z"  # made in another container sharing the volume
    elsewhere.mkdir()
    marker = {"creator": "pathsurgeon", "pid": 99998, "host": "other-host", "boot_id": "x", "pid_namespace": "pid:[1]",
              "token": "t", "created": 0}
    (elsewhere / files.MARKER).write_text(json.dumps(marker))
    before = digest(source)
    with pytest.warns(UserWarning, match="another PID namespace"):
        code, _, err = run(capsys, "strip", "--in", source, "--out", work / "clean")
    assert code == 0, err
    assert digest(source) == before
    assert (work / ".clean.pathsurgeon-99999-y").read_text() == "a user's file" and elsewhere.is_dir()
    # an input that IS a stale staging directory of this machine is still never removed while read
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (source / files.MARKER).write_text(json.dumps({**files._machine_identity(), "creator": "pathsurgeon",
                                                   "pid": int(dead.stdout), "token": "t", "created": 0}))
    assert files.remove_stale_staging(work / "clean", {"--in": source}) == []
    assert files.remove_stale_staging(work / "clean") == [source]  # not an input: it is stale, and ours


def sharded_hf_dir(hf_dir: Path, folder: Path) -> Path:
    model = transformers.ViTForImageClassification.from_pretrained(hf_dir)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.mark.slow
def test_shards_must_be_regular_files_inside_the_directory(hf_dir, tmp_path, capsys):
    folder = sharded_hf_dir(hf_dir, tmp_path / "sharded")
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert code == 0, err  # the untouched sharded directory loads
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).rename(tmp_path / first)  # the shard now lies outside, one level up
    outside = {k: (f"../{first}" if v == first else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": outside}))
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, "outside the directory")
    os.mkfifo(folder / first)  # a FIFO where the shard was: reading it would block forever
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = subprocess.run([sys.executable, "-m", "pathsurgeon.cli", "inspect", "--model", str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not a regular file" in result.stderr, result.stderr


@pytest.fixture
def builds(monkeypatch):
    """The device every timm / torchvision constructor call builds on: only 'meta' costs no memory."""
    import torchvision

    devices: list[str] = []
    for module, name in ((timm, "create_model"), (torchvision.models, "get_model")):
        real = getattr(module, name)

        def recording(*args, real=real, **kwargs):
            devices.append(torch.empty(0).device.type)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return devices


@supported_from("torch", "2.9", "timm cannot build wholly on meta on 2.4: only parameters and buffers go there")
def test_manifest_sizes_the_weights_do_not_fit_are_refused_before_allocating(surgered_dir, tmp_path, builds):
    folder = copy_dir(surgered_dir, tmp_path / "big")
    manifest = _manifest(folder)
    manifest["source"]["kwargs"] = {"img_size": 4096}  # test_vit: a 65536-row position embedding
    (folder / "pathsurgeon.json").write_text(json.dumps(manifest))
    with pytest.raises(pathsurgeon.ManifestError, match="pos_embed of shape"):
        pathsurgeon.load(folder)
    assert builds and set(builds) == {"meta"}  # never built where memory is allocated
    builds.clear()
    folder = copy_dir(surgered_dir, tmp_path / "empty-weights")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(pathsurgeon.CheckpointError, match="empty"):
        pathsurgeon.load(folder)
    assert builds == []  # the weights file is read before anything is built


@pytest.fixture
def no_hf_build(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built before config.json was checked against the weights")

    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained", forbidden)


@pytest.mark.parametrize("edit, words", [
    (lambda c: {**c, "num_hidden_layers": 10**7}, "layers"),
    (lambda c: {**c, "num_labels": 5 * 10**6, "id2label": None, "label2id": None}, "labels"),
    (lambda c: {**c, "image_size": 8192}, "position_embeddings"),
    (lambda c: {**c, "padding": "x" * (17 * 2**20)}, "larger than 16 MiB"),
])
def test_config_values_the_weights_do_not_fit_are_refused_before_building(hf_dir, tmp_path, capsys, no_hf_build,
                                                                           edit, words):
    folder = copy_dir(hf_dir, tmp_path / "crafted")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, words)


def test_a_second_interrupt_during_rollback_does_not_stop_it(monkeypatch, request):
    from pathsurgeon import changes, surgery

    model = timm.create_model(MODEL).eval()
    before = [(n, type(m)) for n, m in model.named_modules()]
    real, calls = changes.Change.undo, {"n": 0}
    # Ctrl-C as in a terminal, even where the suite was started in the background with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    def undo_interrupted(change):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again while the first rollback step runs
        real(change)

    monkeypatch.setattr(changes.Change, "undo", undo_interrupted)
    monkeypatch.setattr(surgery, "max_abs_diff", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pathsurgeon.add(model, 0.1)
    assert calls["n"] > 1  # every change was undone, after the second interrupt too
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    from conftest import pathsurgeon_leftovers

    assert pathsurgeon_leftovers(model) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("kwargs, name, words", [
    ({"num_classes": 5.0}, MODEL, "num_classes"),
    ({"global_pool": "zzz"}, MODEL, "cannot be built"),
    ({"global_pool": ""}, "test_resnet", "cannot run its own forward"),
    ({"img_size": 64}, "test_resnet", "cannot be built"),
    ({}, "test_vit.zzz", "does not know"),
])
def test_manifest_arguments_a_constructor_rejects_exit_2(surgered_dir, tmp_path, capsys, kwargs, name, words):
    timm_model(name)
    folder = copy_dir(surgered_dir, tmp_path / "crafted")
    manifest = _manifest(folder)
    manifest["source"] = {"library": "timm", "name": name, "kwargs": kwargs}
    manifest["surgery"] = None
    (folder / "pathsurgeon.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "strip", "--in", folder, "--out", tmp_path / "clean")
    assert_refused(code, err, words)


@pytest.mark.parametrize("name, kwargs", [("resnet18", {"image_size": 224}), ("vit_b_16", {"image_size": 223})])
def test_torchvision_manifest_arguments_a_builder_rejects_exit_2(tmp_path, capsys, builds, name, kwargs):
    import torchvision

    folder = tmp_path / "tv"
    pathsurgeon.save(torchvision.models.resnet18(num_classes=3), folder)
    manifest = _manifest(folder)
    manifest["source"] = {"library": "torchvision", "name": name, "kwargs": kwargs}
    (folder / "pathsurgeon.json").write_text(json.dumps(manifest))
    builds.clear()
    code, _, err = run(capsys, "strip", "--in", folder, "--out", tmp_path / "clean")
    assert_refused(code, err, name)
    assert set(builds) == {"meta"}


@pytest.mark.parametrize("edit, words", [
    (lambda c: {**c, "vision_config": json.loads("[" * 900 + "]" * 900)}, "nests deeper"),
    (lambda c: {**c, "hidden_size": "32"}, "hidden_size"),
    (lambda c: {"model_type": "timm_wrapper", "architecture": MODEL, "architectures": ["TimmWrapperModel"],
                "model_args": {"checkpoint_path": "{evil}"}}, "model_args"),
])
@supported_from("transformers", "5.0", "4.50 fails otherwise on the crafted configs")
def test_hugging_face_configs_that_crash_transformers_exit_2(hf_dir, tmp_path, capsys, edit, words):
    marker = tmp_path / "marker"
    torch.save({"w": _Boom(str(marker))}, tmp_path / "evil.pth")
    folder = copy_dir(hf_dir, tmp_path / "crafted")
    config = json.loads((folder / "config.json").read_text())
    text = json.dumps(edit(config)).replace("{evil}", str(tmp_path / "evil.pth"))
    (folder / "config.json").write_text(text)
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, words)
    assert not marker.exists()


def test_weights_of_the_wrong_kind_are_refused_before_the_first_copy(tmp_path):
    model = timm.create_model(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    first, last = next(iter(state)), "head.weight"
    dense = state[last]
    cases = {
        "meta": dense.to("meta"),
        "sparse": dense.to_sparse(),
        "complex": dense.to(torch.complex64),
        "bool": dense.bool(),
        "int": dense.to(torch.int32),
        "fp8": dense.to(torch.float8_e4m3fn),
        "quantized": torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8),
    }
    for name, bad in cases.items():
        crafted = {k: (v + 1 if k == first else v) for k, v in state.items()}  # the first key would be copied
        crafted[last] = bad
        torch.save(crafted, tmp_path / f"{name}.pth")
        with pytest.raises(pathsurgeon.CheckpointError, match=last) as caught:
            load_weights(model, tmp_path / f"{name}.pth")
        assert "\n" not in str(caught.value)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), name
    state16 = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state16, tmp_path / "half.pth")
    load_weights(model, tmp_path / "half.pth")  # a float16 copy of float32 weights is fine


@pytest.mark.parametrize("kind", ["pickle", "truncated", "keys"])
def test_bad_cached_pretrained_weights_of_a_timm_name_exit_2(tmp_path, capsys, monkeypatch, kind):
    marker = tmp_path / "marker"
    state = timm.create_model(MODEL).state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "keys":
        save_file({"not.a.key": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        data = (tmp_path / "w.safetensors").read_bytes()
    cache = tmp_path / "cache"
    timm_id = timm.models.get_pretrained_cfg(MODEL).hf_hub_id
    if kind == "pickle":
        torch.save({"w": _Boom(str(marker))}, tmp_path / "evil.bin")
        fake_hub_cache(cache, timm_id, {"pytorch_model.bin": (tmp_path / "evil.bin").read_bytes()})
    else:
        fake_hub_cache(cache, timm_id, {"model.safetensors": data})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1")
    assert_refused(code, err)
    assert not marker.exists()


def test_path_options_with_a_component_over_255_bytes_exit_2(tmp_path, capsys):
    long = tmp_path / ("x" * 300)
    for argv in (
        ["add", "--model", long, "--rate", "0.1"],
        ["add", "--model", MODEL, "--rate", "0.1", "--weights", long],
        ["add", "--model", MODEL, "--rate", "0.1", "--out", long],
        ["add", "--model", MODEL, "--rate", "0.1", "--json", long],
        ["strip", "--in", long, "--out", tmp_path / "o"],
        ["export", "--model", MODEL, "--onnx", long],
    ):
        code, _, err = run(capsys, *argv)
        assert_refused(code, err, "255 bytes")


def test_set_rate_with_a_meta_tensor_is_refused():
    model = timm.create_model(MODEL).eval()
    pathsurgeon.add(model, 0.1)
    with pytest.raises(pathsurgeon.InvalidRateError, match="meta"):
        pathsurgeon.set_rate(model, torch.tensor(0.2, device="meta"))


def test_every_message_is_one_line(hf_dir, tmp_path, capsys, no_loading):
    with pytest.raises(SystemExit) as exited:
        cli.main(["add", "--model", MODEL, "--rate"])  # argparse
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("pathsurgeon: error"), err
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--weights", tmp_path / "a\nb.pth")
    assert_refused(code, err, "\\n")
    os.mkfifo(tmp_path / "fifo.safetensors")
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--weights", tmp_path / "fifo.safetensors")
    assert_refused(code, err, "not a regular file")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch_cwd = os.getcwd()
    try:
        os.chdir(empty)
        code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", ".")
    finally:
        os.chdir(monkeypatch_cwd)
    assert_refused(code, err, "names no new entry")


def test_refused_hugging_face_directory_prints_only_our_lines(tmp_path, capsys):
    folder = _headless_classifier_folder(tmp_path)
    capsys.readouterr()
    code, out, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, "missing keys")
    assert all(line.startswith("pathsurgeon: ") for line in err.splitlines()), err
    assert out == ""


def test_a_surgered_model_pickles_saves_and_deep_copies(tmp_path):
    import copy
    import io
    import pickle

    model = timm.create_model(MODEL).eval()
    pathsurgeon.add(model, 0.1, schedule="auto")
    x = torch.randn(2, 3, 160, 160)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(copied(x), expected)
        pathsurgeon.set_rate(copied, 0.2)  # the record still drives the copy's own modules
        rates = {round(m.rate, 6) for m in copied.modules() if isinstance(m, pathsurgeon.DropPath)}
        assert max(rates) == pytest.approx(0.2)
        pathsurgeon.strip(copied)
        assert not any(isinstance(m, pathsurgeon.DropPath) for m in copied.modules())
    assert max(m.rate for m in model.modules() if isinstance(m, pathsurgeon.DropPath)) == pytest.approx(0.1)


def test_an_empty_weights_file_is_noticed_before_the_model_is_built(tmp_path, builds):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(pathsurgeon.CheckpointError, match="empty"):
        specs.load_model(MODEL, weights=tmp_path / "empty.safetensors")
    assert builds == []


def zip_bomb(path: Path, declared: int) -> Path:
    """test_vit's state_dict plus a 4-value tensor whose record is stored deflated and declares ``declared``
    bytes unpacked, in both zip headers (a crafted file; torch allocates the declared size before inflating)."""
    import io
    import struct
    import zipfile

    state = timm.create_model(MODEL).state_dict()
    state["bomb"] = torch.zeros(4)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    source = zipfile.ZipFile(buffer)
    target = max((n for n in source.namelist() if "/data/" in n and n.rsplit("/", 1)[1].isdigit()),
                 key=lambda n: int(n.rsplit("/", 1)[1]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as crafted:
        for info in source.infolist():
            crafted.writestr(info.filename, source.read(info),
                             zipfile.ZIP_DEFLATED if info.filename == target else zipfile.ZIP_STORED)
    raw = bytearray(out.getvalue())
    struct.pack_into("<I", raw, zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo(target).header_offset + 22, declared)
    at = raw.find(b"PK\x01\x02")
    while at >= 0:  # the central directory's entry, which zipfile and torch read
        length = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46:at + 46 + length] == target.encode():
            struct.pack_into("<I", raw, at + 24, declared)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))
    assert zipfile.ZipFile(path).getinfo(target).file_size == declared
    return path


LIMITED_CLI = """
import resource, sys
size = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (size, size))
from pathsurgeon import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_zip_declaring_gigabytes_is_refused_before_torch_allocates_them(tmp_path):
    """A 1.5 MB .pth whose deflated record declares 3 GB: refused from the zip's headers, under a memory cap
    that makes a regression fail at once (torch's allocation) instead of eating the machine."""
    bomb = zip_bomb(tmp_path / "bomb.pth", 3 << 30)
    assert bomb.stat().st_size < 4 << 20
    script = tmp_path / "limited.py"
    script.write_text(LIMITED_CLI)
    for command in (["inspect", "--model", MODEL, "--weights", bomb],
                    ["add", "--model", MODEL, "--rate", "0.1", "--weights", bomb, "--out", tmp_path / "out"]):
        done = subprocess.run([sys.executable, str(script), str(5_500 << 20), *map(str, command)],
                              capture_output=True, text=True, timeout=120)
        assert_refused(done.returncode, done.stderr, "declare 3,222,", "archive/data/", "crafted or damaged")
    assert not (tmp_path / "out").exists()


def test_a_zip_declaring_more_than_the_model_could_need_is_refused_before_loading(tmp_path, monkeypatch):
    """Within the bound for a file alone (its size plus 256 MiB), but far over what test_vit's values need."""
    bomb = zip_bomb(tmp_path / "bomb.pth", 200 << 20)
    model = timm.create_model(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on the crafted zip"))
    with pytest.raises(pathsurgeon.CheckpointError, match="what VisionTransformer's .* values could need") as caught:
        load_weights(model, bomb)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("architecture", ["local-dir:{target}", "hf-hub:owner/deep"])
def test_a_timm_wrapper_architecture_naming_a_source_is_refused_before_timm_reads_it(tmp_path, capsys, monkeypatch,
                                                                                      architecture):
    """timm would read the target's config.json and build with its model_args (depth 20000: minutes, GBs)."""
    target = tmp_path / "x"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"architecture": MODEL, "num_classes": 10,
                                                    "model_args": {"depth": 20000}}))
    folder = tmp_path / "wrapper"
    folder.mkdir()
    config = transformers.TimmWrapperConfig(architecture=architecture.format(target=target), num_labels=10)
    config.architectures = ["TimmWrapperForImageClassification"]
    config.save_pretrained(folder)
    state = timm.create_model(MODEL, num_classes=10).state_dict()
    save_file({f"timm_model.{k}": v for k, v in state.items()}, str(folder / "model.safetensors"))

    def create_model(name, *args, **kwargs):
        raise AssertionError(f"timm.create_model({name!r}) ran on a crafted timm_wrapper config")

    monkeypatch.setattr(timm, "create_model", create_model)  # timm never reaches the target's model_args
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, "architecture", architecture.split(":")[0], "name a timm model")


def test_a_shallow_copy_cannot_strip_or_re_rate_the_original_it_shares_its_modules_with():
    import copy

    model = timm.create_model(MODEL).eval()
    pathsurgeon.add(model, 0.1, schedule="auto")
    drops = [m for m in model.modules() if isinstance(m, pathsurgeon.DropPath)]
    shallow = copy.copy(model)  # shares every submodule, and the record, with the original
    for call in (pathsurgeon.strip, lambda m: pathsurgeon.set_rate(m, 0.3), lambda m: pathsurgeon.add(m, 0.1)):
        with pytest.raises(pathsurgeon.PathSurgeonError, match="copy.copy .* copy.deepcopy") as caught:
            call(shallow)
        assert "\n" not in str(caught.value)
    assert [m for m in model.modules() if isinstance(m, pathsurgeon.DropPath)] == drops  # nothing was stripped
    assert pathsurgeon.is_surgered(model) and pathsurgeon.is_surgered(shallow)
    pathsurgeon.set_rate(model, 0.2)  # the original still drives its own modules
    assert max(m.rate for m in model.modules() if isinstance(m, pathsurgeon.DropPath)) == pytest.approx(0.2)
    pathsurgeon.strip(model)
    assert not pathsurgeon.is_surgered(model) and not pathsurgeon.is_surgered(shallow)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparse", "quantized"])
def test_sparse_or_quantized_weights_are_refused_in_one_line_without_torch_warnings(tmp_path, kind):
    import warnings

    state = timm.create_model(MODEL).state_dict()
    head = state["head.weight"]
    state["head.weight"] = (head.to_sparse() if kind == "sparse"
                            else torch.quantize_per_tensor(head, 0.1, 0, torch.qint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(state, tmp_path / "w.pth")
    done = subprocess.run([sys.executable, "-m", "pathsurgeon.cli", "inspect", "--model", MODEL, "--weights",
                           str(tmp_path / "w.pth")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("pathsurgeon: error:"), done.stderr
    assert "sparse or quantized" in done.stderr
    model = timm.create_model(MODEL)
    with warnings.catch_warnings(record=True) as caught:  # the Python API: the refusal, and no warning around it
        warnings.simplefilter("always")
        with pytest.raises(pathsurgeon.CheckpointError, match="head.weight"):
            load_weights(model, tmp_path / "w.pth")
    assert [str(w.message) for w in caught] == []


def test_hugging_face_add_and_strip_print_only_pathsurgeon_lines(hf_dir, tmp_path, capsys):
    """save_pretrained's "Writing model shards: 100%|███|" progress bar is no line of ours."""
    for argv in (["add", "--model", hf_dir, "--rate", "0.1", "--out", tmp_path / "surgered"],
                 ["strip", "--in", tmp_path / "surgered", "--out", tmp_path / "clean"]):
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        assert all(line.startswith("pathsurgeon: ") for line in err.splitlines()), err
    assert (tmp_path / "clean" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["config.json", "pathsurgeon.json"])
def test_a_config_that_is_a_fifo_is_reported_as_not_a_regular_file(tmp_path, capsys, name):
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / name)  # never opened: a read would block forever
    code, _, err = run(capsys, "inspect", "--model", folder)
    assert_refused(code, err, f"{name} {folder / name} is not a regular file")
    assert "without" not in err


def test_load_of_a_directory_whose_manifest_is_a_fifo_says_it_is_not_a_regular_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / "pathsurgeon.json")  # never opened: a read would block forever
    with pytest.raises(pathsurgeon.ManifestError, match="pathsurgeon.json is not a regular file"):
        pathsurgeon.load(folder)


def test_a_peft_adapter_next_to_a_hugging_face_model_is_refused_not_applied(hf_dir, tmp_path, capsys):
    folder = copy_dir(hf_dir, tmp_path / "with-adapter")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(hf_dir), "r": 4, "lora_alpha": 8,
        "target_modules": ["query", "value"], "lora_dropout": 0.0, "bias": "none"}))
    for argv in (["inspect", "--model", folder], ["add", "--model", folder, "--rate", "0.1", "--out", tmp_path / "o"]):
        code, _, err = run(capsys, *argv)
        assert_refused(code, err, "adapter_config.json", "merge")
    assert not (tmp_path / "o").exists()
