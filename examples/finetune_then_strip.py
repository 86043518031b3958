"""The Python API, offline: put stochastic depth on a ViT-B/16, check it, train a step, strip it.

Runs on random weights (no network here); with a pretrained checkpoint the calls are the same.
"""

import timm
import torch

import pathsurgeon

model = timm.create_model("vit_base_patch16_224", pretrained=False)
print("model: vit_base_patch16_224 (random init, offline)")

report = pathsurgeon.add(model, rate=0.1)
print(report)
print(f"captured with {report.method}; schedule {report.schedule!r} ({report.formula})")

model.train()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
images, labels = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))
loss = torch.nn.functional.cross_entropy(model(images), labels)
loss.backward()
optimizer.step()
print(f"one training step with DropPath: loss {loss.item():.3f}")

pathsurgeon.strip(model)
left = [name for name, module in model.named_modules() if isinstance(module, pathsurgeon.DropPath)]
print(f"stripped: {len(left)} pathsurgeon modules left; type {type(model).__name__}; ready to export")
