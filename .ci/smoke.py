"""First steps of a user, on an installed pathsurgeon (not the source tree): run from outside the repository.

    python .ci/smoke.py README.md

Checks that the package imported is the installed one and that its version is the metadata's; adds and
strips on timm, torchvision and Hugging Face models with the rates their own libraries build; runs the
README's Python quick start (its first ``python`` block) as written, offline. Exits non-zero on the
first failure, with what failed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}")


def main(readme: Path) -> None:
    import timm
    import torch
    import torchvision

    import pathsurgeon

    location = Path(pathsurgeon.__file__).resolve()
    check("site-packages" in location.parts, f"pathsurgeon is imported from an install ({location})")
    check(pathsurgeon.__version__ == version("pathsurgeon"), f"__version__ {pathsurgeon.__version__} is the metadata's")
    print(f"smoke: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")

    for name in ("test_vit", "resnet18", "convnext_atto"):
        model = timm.create_model(name, pretrained=False).eval()
        before = model(torch.randn(1, 3, 224, 224) if name != "test_vit" else torch.randn(1, 3, 160, 160))
        report = pathsurgeon.add(model, rate=0.1)
        check(report.rates_from == "timm constructor" and len(report.branches) > 0,
              f"timm {name}: {len(report.branches)} branches, rates from {report.rates_from}")
        pathsurgeon.strip(model)
        check(not pathsurgeon.is_surgered(model), f"timm {name}: stripped")
        del before

    model = torchvision.models.convnext_tiny(weights=None)
    report = pathsurgeon.add(model, rate=0.1)
    check(report.rates_from == "torchvision builder", f"torchvision convnext_tiny: rates from {report.rates_from}")
    pathsurgeon.strip(model)

    try:
        import transformers
    except ImportError:
        print("smoke: transformers not installed, Hugging Face steps skipped")
    else:
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1],
                                         window_size=4, drop_path_rate=0.0)
        model = transformers.SwinForImageClassification(config).eval()
        report = pathsurgeon.add(model, rate=0.1)
        check(report.rates_from == "transformers config",
              f"transformers {transformers.__version__} Swin: rates from {report.rates_from}")
        pathsurgeon.strip(model)

    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)
    check(bool(blocks), "the README has a Python quick start")
    with tempfile.TemporaryDirectory() as directory:
        os.chdir(directory)
        exec(compile(blocks[0], f"{readme} (quick start)", "exec"), {"__name__": "__quickstart__"})
    check(True, "the README quick start runs as written")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
