"""Training-step time and memory of each pathsurgeon mode against timm's own drop path, in one run.

Not a test. For each model, five variants share the same weights:

- untouched: ``drop_path_rate=0``, no stochastic depth at all;
- timm native: ``create_model(name, drop_path_rate=r)`` (the reference every ratio is taken against);
- pathsurgeon sample / skip / batch: ``add(model, r, mode=...)`` on the rate-0 build.

Steps are interleaved (A B C D E, A B C D E, ...) so drift in machine load hits all variants alike;
the report is the median of the per-round ratios to timm native. Memory, the median of 3 separate
untimed steps: on CUDA the peak allocated memory of a step; on CPU the bytes autograd saves for the
backward pass (the activations, which is what skipping changes; parameters and optimizer state are
the same for every variant).

    .venv/bin/python benchmarks/step_time.py [--models vit_tiny_patch16_224 convnext_atto]
        [--rounds 12] [--batch 32] [--rate 0.5] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import timm
import torch

import pathsurgeon

MODES = ("sample", "skip", "batch")


def step(model, optimizer, images, labels) -> None:
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed_step(model, optimizer, images, labels) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, optimizer, images, labels)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@contextlib.contextmanager
def saved_bytes_counter():
    """Count the bytes of distinct storages autograd saves for backward while the block runs."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


def step_memory(model, optimizer, images, labels) -> int:
    """Peak bytes of one training step (CUDA), or bytes saved for backward (CPU)."""
    if images.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, images, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    loss = None
    with saved_bytes_counter() as storages:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return sum(storages.values())


def variants(name: str, rate: float, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    native = timm.create_model(name, drop_path_rate=rate).to(device)
    built = {"untouched": None, "timm native": native}
    for key in ("untouched", *(f"pathsurgeon {mode}" for mode in MODES)):
        model = timm.create_model(name, drop_path_rate=0.0).to(device)
        model.load_state_dict(native.state_dict())
        if key != "untouched":
            report = pathsurgeon.add(model, rate, mode=key.split()[1])
            if report.fallbacks:
                print(f"  {key}: {len(report.fallbacks)} of {len(report.branches)} branches computed in full "
                      f"({report.fallbacks[0].reason})")
        built[key] = model
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "convnext_atto"])
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, after 2 warm-up rounds")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.5, help="drop-path rate, timm's default schedule")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    memory_kind = "peak allocated" if device.type == "cuda" else "saved for backward"
    print(f"torch {torch.__version__}, timm {timm.__version__}, pathsurgeon {pathsurgeon.__version__}, {where}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, rate {args.rate}, "
          f"{args.rounds} rounds + 2 warm-up")
    for name in args.models:
        print(f"\n{name}")
        models = variants(name, args.rate, device)
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
        size = models["timm native"].pretrained_cfg["input_size"]
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, *size, generator=generator).to(device)
        labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
        for model in models.values():
            model.train()
        memory = {  # median of 3 steps: in modes skip and batch it depends on how many samples were kept
            k: statistics.median(step_memory(m, optimizers[k], images, labels) for _ in range(3))
            for k, m in models.items()
        }
        times: dict[str, list[float]] = {k: [] for k in models}
        for round_index in range(args.rounds + 2):
            for key, model in models.items():
                elapsed = timed_step(model, optimizers[key], images, labels)
                if round_index >= 2:
                    times[key].append(elapsed)
        reference = times["timm native"]
        print(f"  {'variant':<20} {'median step':>11} {'ratio to native':>15} {'speed-up':>8} "
              f"{'memory (' + memory_kind + ')':>30}")
        for key in models:
            ratio = statistics.median(a / b for a, b in zip(times[key], reference, strict=True))
            print(f"  {key:<20} {statistics.median(times[key]) * 1e3:>9.0f}ms {ratio:>15.3f} {1 / ratio:>7.2f}x "
                  f"{memory[key] / 2**20:>21.0f} MiB ({memory[key] / memory['timm native']:.2f}x)")


if __name__ == "__main__":
    main()
