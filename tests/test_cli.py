"""The command line, run as a user runs it: exit codes, one-line errors, files other tools can load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import export_works, pathsurgeon_leftovers, supported_from
from safetensors.torch import load_file, save_file

import pathsurgeon
from pathsurgeon import cli

MODEL = "resnet18"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_answers_without_importing_torch():
    code = "import sys, pathsurgeon.cli as c; c._parser().format_help(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    for command in ([], ["add"], ["inspect"], ["strip"]):
        result = subprocess.run(
            [sys.executable, "-m", "pathsurgeon.cli", *command, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage: pathsurgeon" in result.stdout


@pytest.mark.slow
def test_add_end_to_end_in_a_subprocess(tmp_path):
    out, report = tmp_path / "surgered", tmp_path / "plan.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pathsurgeon.cli", "add", "--model", MODEL, "--rate", "0.1",
         "--out", str(out), "--json", str(report)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "8 branches in 8 blocks; rates from timm constructor; eval check passed with max |Δ| = 0" in result.stdout
    assert "continuing with random initialisation" in result.stderr  # offline, no cache
    data = json.loads(report.read_text())
    assert {"model", "rate", "schedule", "branches", "max_abs_diff"} <= data.keys()
    assert data["max_abs_diff"] == 0.0
    assert data["rates_from"] == "timm constructor"  # timm's own numbers, read from a meta-device rebuild
    assert [b["block"] for b in data["branches"]][:2] == ["layer1.0", "layer1.1"]
    assert {"block", "index", "rate"} <= data["branches"][0].keys()
    # the weights are a plain safetensors file with the original model's keys
    assert sorted(load_file(out / "model.safetensors")) == sorted(timm.create_model(MODEL).state_dict())
    model = pathsurgeon.load(out)
    assert pathsurgeon.is_surgered(model)
    assert [b.block for b in pathsurgeon.find(model)] == [b["block"] for b in data["branches"]]


def test_strip_writes_a_clean_checkpoint(tmp_path, capsys):
    surgered, clean = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "add", "--model", MODEL, "--rate", "0.2", "--out", str(surgered))[0] == 0
    code, out, _ = run(capsys, "strip", "--in", str(surgered), "--out", str(clean))
    assert code == 0
    python = f"pathsurgeon.load({str(clean)!r}) ({clean}/model.safetensors holds timm's own keys)"
    after = (f"pathsurgeon export --in {clean} --onnx model.onnx, or in Python {python}" if export_works()
             else f"in Python {python}; ONNX export (pathsurgeon export) needs torch >= 2.9")
    assert out.strip() == f"wrote {clean}: ResNet with no pathsurgeon plan; next: {after}"
    manifest = json.loads((clean / "pathsurgeon.json").read_text())
    assert manifest["surgery"] is None
    model = pathsurgeon.load(clean)
    assert not pathsurgeon.is_surgered(model) and pathsurgeon_leftovers(model) == []
    a, b = load_file(surgered / "model.safetensors"), load_file(clean / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_changes_nothing_and_shows_planned_rates(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "inspect", "--model", MODEL, "--rate", "0.7", "--schedule", "uniform")
    assert code == 0
    assert "rates for --rate 0.7 --schedule uniform" in out
    assert out.count("0.7000") == 8
    assert "rates from uniform schedule; nothing was changed" in out
    code, out, _ = run(capsys, "inspect", "--model", MODEL, "--rate", "0.2")
    assert "rates from timm constructor; nothing was changed" in out
    assert list(tmp_path.iterdir()) == []


def test_weights_file_is_loaded_safely(tmp_path, capsys):
    reference = timm.create_model(MODEL)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "ckpt.pth")
    save_file(reference.state_dict(), str(tmp_path / "ckpt.safetensors"))
    for name in ("ckpt.pth", "ckpt.safetensors"):
        code, out, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--weights", str(tmp_path / name),
                             "--out", str(tmp_path / f"out-{name}"))
        assert code == 0, err
        saved = load_file(tmp_path / f"out-{name}" / "model.safetensors")
        assert torch.equal(saved["fc.weight"], reference.state_dict()["fc.weight"])
    # a pickle with arbitrary objects is refused (weights_only=True), not executed
    torch.save({"state_dict": reference.state_dict(), "extra": object}, tmp_path / "unsafe.pth")
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--weights", str(tmp_path / "unsafe.pth"))
    assert code == 2 and "weights_only=True" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["add", "--model", "resnet_18", "--rate", "0.1"], "did you mean resnet18"),
        (["add", "--model", MODEL, "--rate", "1.5"], "--rate must be in [0, 1)"),
        (["add", "--model", MODEL, "--rate", "nan"], "got nan; pass e.g. --rate 0.1"),  # the CLI's syntax
        (["inspect", "--model", MODEL, "--rate", "2"], "got 2.0; pass e.g. --rate 0.1"),
        (["add", "--model", MODEL, "--rate", "0.1", "--require-pretrained"], "no local pretrained weights"),
        (["add", "--model", MODEL, "--rate", "0.1", "--weights", "missing.pt"], "does not exist"),
        (["add", "--model", "nobody/no-such-model", "--rate", "0.1"], "not in the local Hugging Face cache"),
        (["strip", "--in", "nowhere", "--out", "x"], "no pathsurgeon.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_library_names_its_keyword_arguments_and_the_command_line_its_options(tmp_path, capsys):
    """A Python caller is told the keyword argument, a command-line user the option, for the same fix."""
    from pathsurgeon.specs import load_model
    from pathsurgeon.weights import load_weights

    state = timm.create_model(MODEL).state_dict()
    headless = str(tmp_path / "headless.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    (tmp_path / "empty").mkdir()
    cases = [  # the Python call, the command, what each of them says
        (lambda: load_model(MODEL, require_pretrained=True),
         ["add", "--model", MODEL, "--rate", "0.1", "--require-pretrained"],
         ["pass weights=FILE", "or pass require_pretrained=False"],
         ["pass --weights FILE", "or drop --require-pretrained"]),
        (lambda: load_model(headless), ["inspect", "--model", headless],  # the weights file given as the model
         [f"the file as weights={headless!r}"], [f"--model NAME and the file with --weights {headless}"]),
        (lambda: load_weights(timm.create_model(MODEL), headless), ["inspect", "--model", MODEL, "--weights", headless],
         ["check that the model is the checkpoint's"], ["check that --model names the checkpoint's"]),
        (lambda: pathsurgeon.load(tmp_path / "empty"), ["strip", "--in", tmp_path / "empty", "--out", tmp_path / "o"],
         ["written by pathsurgeon.save"], ["written by pathsurgeon add --out"]),
    ]
    for call, argv, python_words, cli_words in cases:
        with pytest.raises(pathsurgeon.PathSurgeonError) as caught:
            call()
        assert all(words in str(caught.value) for words in python_words), caught.value
        assert " --" not in str(caught.value)
        code, _, err = run(capsys, *map(str, argv))
        assert code == 2 and all(words in err for words in cli_words), err
        assert not any(words in err for words in python_words), err


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", str(tmp_path / "taken"))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pathsurgeon.DropPath, "forward", lambda self, x: x + 1.0)
    code, _, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--out", str(tmp_path / "o"))
    assert code == 1 and "rolled back" in err
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "--debug", "add", "--model", MODEL, "--rate", "1.5")
    assert code == 2 and "Traceback" in err


def test_pretrained_weights_come_from_the_local_cache(tmp_path, capsys, monkeypatch):
    """A timm model whose weights sit in the Hugging Face cache is loaded from there, offline."""
    reference = timm.create_model(MODEL)
    hub_id = timm.models.get_pretrained_cfg(MODEL).hf_hub_id
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(reference.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out, err = run(capsys, "add", "--model", MODEL, "--rate", "0.1", "--require-pretrained",
                         "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "random initialisation" not in err
    saved = load_file(tmp_path / "o" / "model.safetensors")
    assert torch.equal(saved["conv1.weight"], reference.state_dict()["conv1.weight"])


@supported_from("transformers", "5.0", "HF ViT adds its MLP residual inside ViTOutput: a block of its own")
def test_hugging_face_directory_round_trip(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    code, out, err = run(capsys, "add", "--model", str(tmp_path / "hf"), "--rate", "0.1", "--out", str(tmp_path / "dp"))
    assert code == 0, err
    assert "4 branches in 2 blocks" in out
    assert (tmp_path / "dp" / "config.json").is_file()  # save_pretrained layout: loads with plain transformers
    plain = transformers.ViTForImageClassification.from_pretrained(tmp_path / "dp")
    assert pathsurgeon_leftovers(plain) == []
    surgered = pathsurgeon.load(tmp_path / "dp")
    assert type(surgered) is type(plain) and pathsurgeon.is_surgered(surgered)


def test_add_in_skip_mode_reports_fallbacks_and_round_trips(tmp_path, capsys):
    out, report = tmp_path / "skip", tmp_path / "plan.json"
    code, text, _ = run(capsys, "add", "--model", MODEL, "--rate", "0.2", "--mode", "skip",
                        "--out", str(out), "--json", str(report))
    assert code == 0
    assert "mode 'skip': 0 branches skip dropped compute, 8 compute in full" in text
    assert "computed in full: layer1.0.drop_path: layer1.0.bn1 is a BatchNorm" in text
    data = json.loads(report.read_text())
    assert data["mode"] == "skip" and len(data["computed_in_full"]) == 8
    model = pathsurgeon.load(out)
    assert [b.mode for b in pathsurgeon.find(model)] == ["sample"] * 8  # what the BatchNorm branches run in
    assert pathsurgeon.changes.record_of(model).mode == "skip"


def test_add_on_a_directory_written_by_add_says_it_replaces_the_saved_surgery(tmp_path, capsys):
    out = tmp_path / "surgered"
    assert run(capsys, "add", "--model", "test_vit", "--rate", "0.1", "--mode", "skip", "--out", str(out))[0] == 0
    code, printed, err = run(capsys, "add", "--model", str(out), "--rate", "0.2", "--json", str(tmp_path / "p.json"))
    assert code == 0
    notices = [line for line in err.splitlines() if "holds a model saved with DropPath" in line]
    assert notices == [f"pathsurgeon: {out} holds a model saved with DropPath (rate 0.1, mode skip); this add drops "
                       "it and applies --rate 0.2 to the saved weights"]
    assert json.loads((tmp_path / "p.json").read_text())["branches"][-1]["rate"] == pytest.approx(0.2)
    code, printed, err = run(capsys, "inspect", "--model", str(out))
    assert code == 0 and "the rates shown are the model's without it" in err


def test_strip_suggests_no_export_where_this_torch_cannot_export(tmp_path, capsys, monkeypatch):
    from pathsurgeon import versions

    surgered, clean = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "add", "--model", MODEL, "--rate", "0.2", "--out", str(surgered))[0] == 0
    monkeypatch.setattr(versions, "ONNX_EXPORT_TORCH", (99,))
    code, out, _ = run(capsys, "strip", "--in", str(surgered), "--out", str(clean))
    assert code == 0
    assert out.strip() == (f"wrote {clean}: ResNet with no pathsurgeon plan; next: in Python "
                           f"pathsurgeon.load({str(clean)!r}) ({clean}/model.safetensors holds timm's own keys); "
                           "ONNX export (pathsurgeon export) needs torch >= 99")
    assert "pathsurgeon export --in" not in out
