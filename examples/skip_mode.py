"""mode="skip": the same per-sample stochastic depth, without computing the samples that are dropped.

Runs offline on random weights. A ViT skips on every branch; a ResNet's branches contain BatchNorm,
which mixes samples in training, so the report says they are computed in full.
"""

import time

import timm
import torch

import pathsurgeon

images, labels = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))


def train_step(model: torch.nn.Module) -> float:
    model.train()
    start = time.perf_counter()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    return time.perf_counter() - start


for mode in ("sample", "skip"):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    report = pathsurgeon.add(model, rate=0.5, mode=mode)
    train_step(model)  # warm-up
    seconds = min(train_step(model) for _ in range(3))
    print(f"vit_tiny_patch16_224, mode {mode!r}: {report.summary()}")
    print(f"  fastest of 3 training steps at batch 32: {seconds * 1e3:.0f} ms")
    pathsurgeon.strip(model)

resnet = timm.create_model("resnet18", pretrained=False)
report = pathsurgeon.add(resnet, rate=0.1, mode="skip")
print(f"resnet18, mode 'skip': {report.summary()}")
print(f"  e.g. {report.fallbacks[0].target}: {report.fallbacks[0].reason}")
