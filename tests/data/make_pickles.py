"""Write the surgered models tests/test_old_pickles.py loads: whole models, torch.save(model, path).

Run once, with the release under test installed, from the repository root:
    PYTHONPATH=. python tests/data/make_pickles.py
Each file is a tiny timm model (importable on load: the class is timm's) surgered in one mode; the
hooked one is timm's ConvMixer, which has no drop-path slots (its branches get forward hooks).
"""

from __future__ import annotations

import pathlib
import subprocess

import timm
import torch
from timm.models.convmixer import ConvMixer

import pathsurgeon

HERE = pathlib.Path(__file__).parent
VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2, "num_classes": 4}
MIXER = {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4, "num_classes": 4}


def _inputs(size: int) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    for mode in ("sample", "skip", "batch", "fixed_count"):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()
        report = pathsurgeon.add(model, 0.3, mode=mode, example_inputs=_inputs(16))
        print(mode, report.mode, len(report.branches), [f.target for f in report.fallbacks])
        torch.save(model, HERE / f"vit_{mode}.pt")
    for mode in ("sample", "skip"):
        torch.manual_seed(0)
        model = ConvMixer(**MIXER).eval()
        # its branches hold BatchNorms: kept_rows lets mode 'skip' gather them (Gather with norms)
        config = pathsurgeon.DropPathConfig(0.3, mode=mode, batch_norm="kept_rows")
        report = pathsurgeon.add(model, config, example_inputs=_inputs(16))
        print("convmixer", mode, {b.mechanism for b in report.branches}, len(report.branches),
              [f.target for f in report.fallbacks])
        torch.save(model, HERE / f"convmixer_{mode}.pt")
    print("pathsurgeon", pathsurgeon.__version__, "commit", commit)


if __name__ == "__main__":
    main()
