"""Fine-tune with stochastic depth, strip it, export the clean model to ONNX.

    python examples/finetune_strip_export.py        # offline: random weights, synthetic data
"""

import tempfile
from pathlib import Path

import timm
import torch

import pathsurgeon
from pathsurgeon.export import export_onnx

model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
report = pathsurgeon.add(model, rate=0.1)
print(report.summary())

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model.train()
for step in range(3):
    images, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.3f}")

pathsurgeon.strip(model)  # the same object, original modules back, fine-tuned weights kept
model.eval()
with tempfile.TemporaryDirectory() as folder:
    result = export_onnx(model, Path(folder) / "vit_tiny.onnx")
    print(f"exported {sum(result.op_types.values())} ONNX nodes; onnxruntime max |Δ| = {result.max_abs_diff:.2g}")
