"""Strip before export: the exported graph is the graph of a model that was never touched."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch

pytest.importorskip("onnxruntime")
from conftest import pathsurgeon_leftovers  # noqa: E402

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


def test_surgered_model_in_eval_exports_the_clean_graph(tmp_path):
    torch.manual_seed(0)
    model = timm_vit().eval()
    clean = export_onnx(copy.deepcopy(model), tmp_path / "clean.onnx", example_inputs=torch.randn(2, 3, 32, 32))
    pathsurgeon.add(model, 0.2)
    model.train()  # export switches to eval itself and gives the training flags back
    surgered = export_onnx(model, tmp_path / "surgered.onnx", example_inputs=torch.randn(2, 3, 32, 32))
    assert surgered.op_types == clean.op_types
    assert model.training and pathsurgeon.is_surgered(model)


def test_cli_export_strips_on_the_way(tmp_path):
    out, onnx_file = tmp_path / "dp", tmp_path / "model.onnx"
    subprocess.run([sys.executable, "-m", "pathsurgeon.cli", "add", "--model", "resnet18", "--rate", "0.1",
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


def test_a_graph_with_a_random_op_is_refused_and_not_written(tmp_path):
    with pytest.raises(pathsurgeon.PathSurgeonError, match="random ops"):
        export_onnx(RandomInEval(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []
