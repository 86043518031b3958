"""Strip before export: the exported graph is the graph of a model that was never touched."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch

pytest.importorskip("onnxruntime")
from conftest import ONNX_EXPORT, pathsurgeon_leftovers, timm_model  # noqa: E402

import pathsurgeon  # noqa: E402
from pathsurgeon.export import export_onnx  # noqa: E402


def timm_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4)


def timm_resnet():
    return timm.create_model("resnet18", num_classes=4)


def hf_vit():
    import transformers as T

    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=4)
    return T.ViTForImageClassification(config)


def hf_convnext():
    import transformers as T

    config = T.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32, num_labels=4)
    return T.ConvNextForImageClassification(config)


MODELS = {"timm_vit": timm_vit, "timm_resnet": timm_resnet, "hf_vit": hf_vit, "hf_convnext": hf_convnext}


def logits(output):
    return output.logits if hasattr(output, "logits") else output


def call(model, x):
    return logits(model(pixel_values=x) if "transformers" in type(model).__module__ else model(x))


def fine_tune(model, steps: int = 2):
    """add -> a few SGD steps with DropPath active -> strip; returns the stripped model."""
    pathsurgeon.add(model, 0.3, schedule="uniform")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(steps):
        torch.manual_seed(step)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        loss = torch.nn.functional.cross_entropy(call(model, x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pathsurgeon.strip(model)
    return model.eval()


def aten_ops(model, x):
    if "transformers" in type(model).__module__:
        program = torch.export.export(model, (), {"pixel_values": x}, strict=False)
    else:
        program = torch.export.export(model, (x,), strict=False)
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


@pytest.mark.slow
@ONNX_EXPORT
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fine_tuned_and_stripped_model_exports_like_a_fresh_one(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    fine_tune(model)
    assert pathsurgeon_leftovers(model) == []
    fresh = MODELS[name]().eval()  # never surgered, given the fine-tuned weights
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(call(model, x), call(fresh, x))

    inputs = {"pixel_values": x} if "transformers" in type(model).__module__ else x
    ours = export_onnx(model, tmp_path / "stripped.onnx", example_inputs=inputs)
    reference = export_onnx(fresh, tmp_path / "fresh.onnx", example_inputs=inputs)
    assert ours.op_types == reference.op_types
    assert ours.max_abs_diff < 1e-4
    assert aten_ops(model, x) == aten_ops(fresh, x)


@pytest.mark.slow
@ONNX_EXPORT
def test_surgered_model_in_eval_exports_the_clean_graph(tmp_path):
    torch.manual_seed(0)
    model = timm_vit().eval()
    clean = export_onnx(copy.deepcopy(model), tmp_path / "clean.onnx", example_inputs=torch.randn(2, 3, 32, 32))
    pathsurgeon.add(model, 0.2)
    model.train()  # export switches to eval itself and gives the training flags back
    surgered = export_onnx(model, tmp_path / "surgered.onnx", example_inputs=torch.randn(2, 3, 32, 32))
    assert surgered.op_types == clean.op_types
    assert model.training and pathsurgeon.is_surgered(model)


@pytest.mark.slow
@ONNX_EXPORT
def test_cli_export_strips_on_the_way(tmp_path):
    out, onnx_file = tmp_path / "dp", tmp_path / "model.onnx"
    name = timm_model("test_resnet")  # timm's tiny ResNet (batch norms, residual adds): resnet18 proves no more
    subprocess.run([sys.executable, "-m", "pathsurgeon.cli", "add", "--model", name, "--rate", "0.1",
                    "--out", str(out)], check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "pathsurgeon.cli", "export", "--in", str(out), "--onnx",
                             str(onnx_file), "--opset", "18"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no random ops; onnxruntime vs PyTorch max |Δ|" in result.stdout
    assert "[torch.onnx]" not in result.stdout
    import onnx

    model = onnx.load(str(onnx_file))
    assert model.opset_import[0].version == 18
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging file left


class RandomInEval(torch.nn.Module):
    """A drop decision baked into the eval forward: what export must never ship."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x) * torch.rand(x.shape[0], 1).ge(0.5)


@ONNX_EXPORT
def test_a_graph_with_a_random_op_is_refused_and_not_written(tmp_path):
    with pytest.raises(pathsurgeon.PathSurgeonError, match="random ops"):
        export_onnx(RandomInEval(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []


def run_file(file, **feeds):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in feeds.items()})


def io_shapes(file):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return ({i.name: i.shape for i in session.get_inputs()}, {o.name: o.shape for o in session.get_outputs()})


@pytest.mark.slow
@ONNX_EXPORT
@pytest.mark.parametrize("name", ["timm_vit", "hf_vit"])
def test_python_export_takes_any_batch_under_sensible_names(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    report = export_onnx(model, tmp_path / "m.onnx")  # made-up inputs, traced at batch 2
    assert report.inputs == {"pixel_values": ["batch", 3, 32, 32]}
    assert report.outputs == {"logits": ["batch", 4]}
    assert report.dynamic_batch and report.checked_batches == (2, 1) and report.max_abs_diff < 1e-4
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = run_file(tmp_path / "m.onnx", pixel_values=x)
        with torch.no_grad():
            want = call(model, x)
        assert got.shape == (batch, 4)
        assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)


@pytest.mark.slow
@ONNX_EXPORT
def test_a_batch_of_one_is_traced_as_two_and_static_fixes_the_batch(tmp_path):
    torch.manual_seed(0)
    model = timm_vit().eval()
    report = export_onnx(model, tmp_path / "dynamic.onnx", example_inputs=torch.randn(1, 3, 32, 32))
    assert report.inputs == {"pixel_values": ["batch", 3, 32, 32]} and report.checked_batches == (2, 1)
    report = export_onnx(model, tmp_path / "static.onnx", dynamic_batch=False, batch_size=3)
    assert report.inputs == {"pixel_values": [3, 3, 32, 32]} and report.checked_batches == (3,)
    assert io_shapes(tmp_path / "static.onnx") == ({"pixel_values": [3, 3, 32, 32]}, {"logits": [3, 4]})
    with pytest.raises(pathsurgeon.ExampleInputsError, match="pass dynamic_batch=False"):
        export_onnx(model, tmp_path / "refused.onnx", batch_size=3)
    assert not (tmp_path / "refused.onnx").exists()


class BatchOfTwo(torch.nn.Module):
    """Code that fixes the batch: the exporter keeps a symbolic axis and writes a graph that only runs at 2."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x).reshape(2, -1)


@pytest.mark.slow
@ONNX_EXPORT
def test_a_model_that_fixes_its_batch_is_refused_with_the_fix(tmp_path):
    with pytest.raises(pathsurgeon.PathSurgeonError, match=r"at batch 1 .*pass dynamic_batch=False and batch_size=N"):
        export_onnx(BatchOfTwo(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []
    report = export_onnx(BatchOfTwo(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 3), dynamic_batch=False)
    assert report.checked_batches == (2,)


@pytest.mark.slow
@ONNX_EXPORT
def test_cli_export_of_a_timm_and_an_hf_model_runs_at_batch_1_and_5(tmp_path, capsys):
    from pathsurgeon import cli

    torch.manual_seed(0)
    hf = hf_vit().eval()
    hf.save_pretrained(tmp_path / "hf")
    for spec, model in (("test_vit", None), (str(tmp_path / "hf"), hf)):
        file = tmp_path / f"{len(list(tmp_path.iterdir()))}.onnx"
        assert cli.main(["export", "--model", spec, "--onnx", str(file)]) == 0
        out = capsys.readouterr().out
        assert "-> logits [batch, " in out and "at batch 2 and 1" in out
        inputs, outputs = io_shapes(file)
        ((name, shape),) = inputs.items()
        assert name == "pixel_values" and shape[0] == "batch" and list(outputs) == ["logits"]
        for batch in (1, 5):
            x = torch.randn(batch, *shape[1:])
            (got,) = run_file(file, pixel_values=x)
            assert got.shape[0] == batch
            if model is not None:  # the timm model was built with random weights in the CLI's process
                with torch.no_grad():
                    assert torch.allclose(torch.from_numpy(got), call(model, x), atol=1e-4)


@pytest.mark.slow
@ONNX_EXPORT
def test_cli_export_input_size_and_static(tmp_path, capsys):
    from pathsurgeon import cli

    file = tmp_path / "m.onnx"
    argv = ["export", "--model", "test_vit", "--onnx", str(file), "--input-size", "3,64,64", "--static", "--batch", "4"]
    assert cli.main(argv) == 0
    assert "pixel_values [4, 3, 64, 64] -> logits [4, 1000]" in capsys.readouterr().out
    assert io_shapes(file) == ({"pixel_values": [4, 3, 64, 64]}, {"logits": [4, 1000]})
    for bad, message in ((["--input-size", "3,64"], "not C,H,W"), (["--batch", "4"], "pass --static too"),
                         (["--input-size", "3,65,65"], "does not run at --input-size 3,65,65")):
        assert cli.main(["export", "--model", "test_vit", "--onnx", str(tmp_path / "x.onnx"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()[-1:]) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_export_is_reachable_from_the_package_without_importing_it_first():
    code = (
        "import sys, pathsurgeon\n"
        "assert 'pathsurgeon.export' not in sys.modules and 'torch' not in sys.modules\n"
        "assert 'export' in dir(pathsurgeon) and 'export_onnx' in pathsurgeon.__all__\n"
        "function = pathsurgeon.export.export_onnx  # the README's spelling\n"
        "assert pathsurgeon.export_onnx is function and pathsurgeon.OnnxReport is pathsurgeon.export.OnnxReport\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class WithFlag(torch.nn.Module):
    """A keyword input that is no tensor (as HF's use_cache=False): the exporter then names the axis s77."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, scale=None, flag=False):
        return self.fc(x) * scale if flag else self.fc(x)


@pytest.mark.slow
@ONNX_EXPORT
def test_the_batch_axis_is_called_batch_whatever_the_inputs(tmp_path):
    inputs = {"x": torch.randn(3, 4), "scale": torch.randn(3, 1), "flag": True}
    report = export_onnx(WithFlag(), tmp_path / "m.onnx", example_inputs=inputs, input_names=["x", "scale"],
                         output_names=["y"])
    assert report.inputs == {"x": ["batch", 4], "scale": ["batch", 1]} and report.outputs == {"y": ["batch", 4]}
    assert report.checked_batches == (3, 1) and report.max_abs_diff < 1e-5
    with pytest.raises(pathsurgeon.PathSurgeonError, match="output_names must be 1 distinct"):
        export_onnx(WithFlag(), tmp_path / "n.onnx", example_inputs=inputs, output_names=["y", "z"])
