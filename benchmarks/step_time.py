"""Training-step time of pathsurgeon's DropPath against timm's own, in one run (not a test).

For each model, three variants share the same weights: untouched (no drop path), timm native
(`create_model(name, drop_path_rate=r)`), and pathsurgeon (`add(model, r)` on the rate-0 build).
Steps are interleaved (A B C, A B C, ...) so drift in machine load hits all three alike; the report is
the median of the per-round ratios.

    .venv/bin/python benchmarks/step_time.py [--rounds 20] [--batch 32] [--rate 0.1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

import pathsurgeon

MODELS = {"vit_tiny_patch16_224": {}, "convnext_atto": {}}


def step(model, optimizer, images, labels) -> float:
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, rate {args.rate}, {args.rounds} rounds")
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        native = timm.create_model(name, drop_path_rate=args.rate, **kwargs)
        untouched = timm.create_model(name, drop_path_rate=0.0, **kwargs)
        untouched.load_state_dict(native.state_dict())
        surgered = timm.create_model(name, drop_path_rate=0.0, **kwargs)
        surgered.load_state_dict(native.state_dict())
        pathsurgeon.add(surgered, args.rate)
        variants = {"untouched": untouched, "timm native": native, "pathsurgeon": surgered}
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in variants.items()}
        size = native.pretrained_cfg["input_size"]
        images, labels = torch.randn(args.batch, *size), torch.randint(0, 1000, (args.batch,))
        times: dict[str, list[float]] = {k: [] for k in variants}
        for model in variants.values():
            model.train()
        for round_index in range(args.rounds + 2):
            for key, model in variants.items():
                elapsed = step(model, optimizers[key], images, labels)
                if round_index >= 2:  # two warm-up rounds
                    times[key].append(elapsed)
        native_times = times["timm native"]
        print(f"\n{name}: median step {statistics.median(native_times) * 1e3:.0f} ms (timm native)")
        for key in ("untouched", "pathsurgeon"):
            ratios = [a / b for a, b in zip(times[key], native_times, strict=True)]
            print(f"  {key:<12} / timm native: median ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
