"""What ``pathsurgeon.add`` costs next to building the model, and where its time goes.

Interleaves, in one process, ``timm.create_model(name)`` (random initialisation: what a fine-tuner
pays before loading weights) and ``pathsurgeon.add`` on a freshly built model, round after round, and
prints the median and range of each, the median per-round ratio add / build, and the median seconds
of every stage of ``add`` (``Report.timings``). Each round also times one eval forward of the
surgered model (no grad) on one and on two made-up samples, and prints the forwards floor of ``add``: the
forwards it must run to prove what it proves, as a ratio to the build (mode 'sample': observe and
verify, one sample each; modes 'skip' / 'batch' / 'fixed_count' add the whole-model check's three
forwards: every branch in full on two samples, on the kept sample, on none).

    python benchmarks/add_time.py [--model vit_base_patch16_224] [--rounds 7] [--mode sample] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import pathsurgeon
from pathsurgeon.libraries.timm import stated_input_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--mode", default="sample", choices=("sample", "skip", "batch", "fixed_count"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pathsurgeon.add(timm.create_model("test_vit"), 0.1)  # imports and first-call costs out of the way
    builds, adds, ratios, floors = [], [], [], []
    stages: dict[str, list[float]] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        start = time.perf_counter()
        model = timm.create_model(args.model)
        build = time.perf_counter() - start
        start = time.perf_counter()
        report = pathsurgeon.add(model, args.rate, mode=args.mode)
        add = time.perf_counter() - start
        one, two = _forward_seconds(model)  # after add, so that add finds the model as freshly built
        # observe + verify (one sample each); the skip check: full on two, kept ~ one, none kept ~ nothing
        floor = 2 * one + (two + one if args.mode != "sample" else 0.0)
        builds.append(build)
        adds.append(add)
        ratios.append(add / build)
        floors.append(floor / build)
        for stage, seconds in report.timings.items():
            stages.setdefault(stage, []).append(seconds)
        del model
    builds, adds, ratios, floors = builds[1:], adds[1:], ratios[1:], floors[1:]
    stages = {k: v[1:] for k, v in stages.items()}

    print(f"{args.model}, mode {args.mode!r}; torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds after 1 warm-up")
    print(f"  build (timm.create_model):  median {statistics.median(builds):.3f} s  "
          f"(min {min(builds):.3f}, max {max(builds):.3f})")
    print(f"  pathsurgeon.add:            median {statistics.median(adds):.3f} s  "
          f"(min {min(adds):.3f}, max {max(adds):.3f})")
    print(f"  add / build, per round:     median {statistics.median(ratios):.2f}  "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"  forwards floor / build:     median {statistics.median(floors):.2f}  "
          f"(min {min(floors):.2f}, max {max(floors):.2f})")
    print("  stages of add (median s): " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in stages.items()))


def _forward_seconds(model: torch.nn.Module) -> tuple[float, float]:
    """Seconds of one eval forward (no grad) of ``model`` on one and on two random samples."""
    size = stated_input_size(model) or (3, 224, 224)  # what add's made-up inputs take
    seconds = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, *size)
            start = time.perf_counter()
            model(x)
            seconds.append(time.perf_counter() - start)
    model.train(was_training)
    return seconds[0], seconds[1]


if __name__ == "__main__":
    main()
