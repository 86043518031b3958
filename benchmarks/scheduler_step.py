"""What one RateScheduler step costs, next to a training step of the same model.

A step goes through ``pathsurgeon.set_rate`` (rates over depth from the plan, then Python floats on the
inserted modules); this prints the median over many steps of a warm-up (a new rate every step, the
expensive case) and of a constant phase (no change: the scheduler skips set_rate), per model.

    python benchmarks/scheduler_step.py [--models vit_base_patch16_224 convnext_tiny] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import pathsurgeon


def median_microseconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["vit_base_patch16_224", "convnext_tiny", "swin_tiny_patch4_window7_224"]
    )
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.steps} steps")
    print(f"{'model':<32} {'branches':>8} {'new rate':>12} {'same rate':>12}")
    for name in args.models:
        model = timm.create_model(name, pretrained=False)
        report = pathsurgeon.add(model, 0.1, verify=False)
        warmup = pathsurgeon.RateScheduler.warmup(model, 0.1, steps=10 * args.steps)
        changing = median_microseconds(warmup.step, args.steps)
        constant = pathsurgeon.RateScheduler(model, lambda step: 0.1)
        same = median_microseconds(constant.step, args.steps)
        print(f"{name:<32} {len(report.branches):>8} {changing:>10.0f}µs {same:>10.1f}µs")


if __name__ == "__main__":
    main()
