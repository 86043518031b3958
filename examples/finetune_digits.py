"""A real fine-tuning run, offline: scikit-learn's handwritten digits, a small timm ViT, three ways.

1. "Pre-train" the ViT on digits 0-4 without drop path (it stands in for a downloaded checkpoint).
2. Fine-tune those weights on a few labelled examples of digits 5-9, the same seeds for every variant:
   - ``rate 0``: plain fine-tuning, no pathsurgeon;
   - ``sample``: ``pathsurgeon.add(model, rate)``, timm's per-sample drop path;
   - ``skip``: ``pathsurgeon.add(model, rate, mode="skip")``, the same drops without computing them.
3. Plot test accuracy against epochs and against training wall time (median over seeds, band from
   the lowest to the highest seed) into ``docs/finetune_digits.png``; the numbers go to
   ``docs/finetune_digits.json``.

    python examples/finetune_digits.py                 # the README's figure: 5 seeds, a few minutes on 2 cores
    python examples/finetune_digits.py --seeds 1 --epochs 2 --pretrain-epochs 1 --out /tmp/digits   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy
import timm
import torch
import torch.nn.functional as F
from torch import nn

import pathsurgeon

VARIANTS = ("rate 0", "sample", "skip")
IMAGE, PATCH = 32, 8  # the 8x8 digits upsampled 4x: 16 patches of 2x2 digit pixels


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 images of scikit-learn's digits (shipped with the package), as 1x32x32 in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(images, size=IMAGE, mode="bilinear", align_corners=False), torch.tensor(data.target)


def vit(classes: int, args) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH, in_chans=1, num_classes=classes,
        embed_dim=args.width, depth=args.depth, num_heads=4,
    )


def epoch_batches(count: int, batch: int, generator: torch.Generator):
    order = torch.randperm(count, generator=generator)
    return [order[i:i + batch] for i in range(0, count, batch)]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def train(model, images, labels, epochs, args, generator, test=None) -> list[dict]:
    """AdamW, one-cycle schedule; every ``eval_every`` epochs: training seconds so far and test accuracy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = epochs * len(epoch_batches(len(images), args.batch, torch.Generator()))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    curve, seconds = [], 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for index in epoch_batches(len(images), args.batch, generator):
            loss = F.cross_entropy(model(images[index]), labels[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds += time.perf_counter() - start
        if test is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs):
            curve.append({"epoch": epoch + 1, "seconds": seconds, "accuracy": accuracy(model, *test)})
    return curve


def pretrain(images, labels, args) -> nn.Module:
    """Digits 0-4, no drop path: the checkpoint every fine-tuning run starts from."""
    torch.manual_seed(1234)
    model = vit(5, args)
    upstream = (labels < 5).nonzero().flatten()
    if args.pretrain_images:  # a subset, for quick runs of this code path
        upstream = upstream[: args.pretrain_images]
    train(model, images[upstream], labels[upstream], args.pretrain_epochs, args, torch.Generator().manual_seed(1234))
    return model


def split(images, labels, per_class: int, seed: int):
    """Digits 5-9 as classes 0-4: ``per_class`` labelled training images each, the rest is the test set."""
    generator = torch.Generator().manual_seed(seed)
    train_index, test_index = [], []
    for digit in range(5, 10):
        index = (labels == digit).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        train_index.append(index[:per_class])
        test_index.append(index[per_class:])
    train_index, test_index = torch.cat(train_index), torch.cat(test_index)
    return (images[train_index], labels[train_index] - 5), (images[test_index], labels[test_index] - 5)


def finetune(pretrained: nn.Module, variant: str, seed: int, data, args) -> list[dict]:
    (train_images, train_labels), test = data
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)  # the same new head and the same drop decisions for every variant
    model.reset_classifier(5)
    if variant != "rate 0":
        pathsurgeon.add(model, args.rate, mode=variant, example_inputs=train_images[:2])
    curve = train(model, train_images, train_labels, args.epochs, args, torch.Generator().manual_seed(seed), test)
    pathsurgeon.strip(model)
    return curve


def summarize(runs: dict[str, list[list[dict]]]) -> dict:
    """Per variant and evaluated epoch: median, lowest and highest accuracy and training seconds over seeds."""
    summary = {}
    for variant, curves in runs.items():
        rows = []
        for epoch in range(len(curves[0])):
            accuracies = [c[epoch]["accuracy"] for c in curves]
            seconds = [c[epoch]["seconds"] for c in curves]
            rows.append({
                "epoch": curves[0][epoch]["epoch"],
                "accuracy": [statistics.median(accuracies), min(accuracies), max(accuracies)],
                "seconds": [statistics.median(seconds), min(seconds), max(seconds)],
            })
        summary[variant] = rows
    return summary


def plot(summary: dict, runs: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, paired, by_time) = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = {"rate 0": ("tab:gray", "-"), "sample": ("tab:blue", "-"), "skip": ("tab:orange", "--")}
    for variant, rows in summary.items():
        color, line = styles[variant]
        label = "rate 0 (no drop path)" if variant == "rate 0" else f"pathsurgeon rate {args.rate}, mode {variant}"
        epochs = [r["epoch"] for r in rows]
        median, low, high = (numpy.array([r["accuracy"][i] for r in rows]) * 100 for i in range(3))
        seconds = [r["seconds"][0] for r in rows]
        by_epoch.plot(epochs, median, color=color, linestyle=line, label=label)
        by_epoch.fill_between(epochs, low, high, color=color, alpha=0.12)
        by_time.plot(seconds, median, color=color, linestyle=line, marker=".", label=label)
        # the same seed's rate-0 run as the baseline: the difference the drop path made, seed by seed
        differences = numpy.array([[(e["accuracy"] - b["accuracy"]) * 100 for e, b in zip(curve, base, strict=True)]
                                   for curve, base in zip(runs[variant], runs["rate 0"], strict=True)])
        paired.plot(epochs, numpy.median(differences, 0), color=color, linestyle=line, label=label)
        if variant != "rate 0":
            paired.fill_between(epochs, differences.min(0), differences.max(0), color=color, alpha=0.12)
    seeds = len(runs["rate 0"])
    by_epoch.set(xlabel="fine-tuning epoch", ylabel="test accuracy (%), digits 5-9",
                 title=f"test accuracy ({seeds} seeds: median, band min-max)")
    paired.set(xlabel="fine-tuning epoch", ylabel="accuracy minus rate 0, same seed (points)",
               title="difference to rate 0, seed by seed (median, min-max)")
    by_time.set(xlabel="training wall time (s, median over seeds)", ylabel="test accuracy (%), median",
                title="accuracy against training time")
    by_epoch.legend(loc="lower right")
    for axis in (by_epoch, paired, by_time):
        axis.grid(alpha=0.3)
    threads = torch.get_num_threads()
    figure.suptitle(
        f"timm ViT (depth {args.depth}, width {args.width}, {IMAGE}x{IMAGE} input, {PATCH}x{PATCH} patches) "
        f"pre-trained on digits 0-4 without drop path, fine-tuned on {args.per_class} images per class of digits "
        f"5-9; rate {args.rate} on timm's linear schedule; torch {torch.__version__}, "
        f"{threads} thread{'s' * (threads != 1)}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning runs per variant (seeds 0..N-1)")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--pretrain-images", type=int, default=0, help="pre-train on the first N only (0: all)")
    parser.add_argument("--per-class", type=int, default=20, help="labelled fine-tuning images per digit")
    parser.add_argument("--rate", type=float, default=0.2, help="drop-path rate (timm's linear schedule)")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=3, help="epochs between test evaluations")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine two threads fight other processes for cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    images, labels = digits()
    pretrained = pretrain(images, labels, args)
    upstream = labels < 5
    fit = accuracy(pretrained, images[upstream], labels[upstream])
    print(f"pre-trained on digits 0-4: accuracy on its training images {fit:.3f}")
    runs: dict[str, list[list[dict]]] = {variant: [] for variant in VARIANTS}
    for seed in range(args.seeds):
        data = split(images, labels, args.per_class, seed)
        for variant in VARIANTS:  # interleaved, so a busy moment on the machine hits every variant alike
            curve = finetune(pretrained, variant, seed, data, args)
            runs[variant].append(curve)
            print(f"seed {seed} {variant:>6}: test accuracy {curve[-1]['accuracy']:.3f} "
                  f"after {curve[-1]['seconds']:.1f} s of training")
    summary = summarize(runs)
    result = {
        # the output folder is where the results went, not a setting; a machine's path does not belong in them
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
        "summary": summary, "runs": runs, "total_seconds": time.perf_counter() - started,
    }
    (args.out / "finetune_digits.json").write_text(json.dumps(result, indent=1))
    plot(summary, runs, args, args.out / "finetune_digits.png")
    for variant, rows in summary.items():
        accuracy_, seconds = rows[-1]["accuracy"], rows[-1]["seconds"]
        print(f"{variant:>6}: final test accuracy median {accuracy_[0]:.3f} (min {accuracy_[1]:.3f}, max "
              f"{accuracy_[2]:.3f}); training time median {seconds[0]:.1f} s ({seconds[1]:.1f}-{seconds[2]:.1f})")
    print(f"wrote {args.out / 'finetune_digits.png'} and finetune_digits.json in {result['total_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
