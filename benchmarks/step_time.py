"""Training-step time and memory of every pathsurgeon mode next to the methods it is measured against.

Not a test. Every variant of one model shares the same weights and is stepped in the same process,
interleaved (A B C ..., A B C ..., ...) so that drift in machine load hits all variants alike. Every
variant of a round starts from the same seed: the block-wise method and mode ``batch`` draw one number
per block in forward order, so they drop the same blocks in the same round (a paired comparison; with
independent draws, which blocks a few rounds happen to drop moves a ratio by several percent).

For a timm model (``--models vit_tiny_patch16_224 convnext_atto``):

- untouched: ``drop_path_rate=0``, no stochastic depth at all;
- timm native: ``create_model(name, drop_path_rate=r)`` (timm's own per-sample drop path);
- DINOv2 (ViT-style blocks only): the blocks train as DINOv2's ``Block`` does, with
  ``drop_add_residual_stochastic_depth`` (written here from its formula) at timm's per-block rates;
- pathsurgeon sample / skip / batch / fixed_count: ``add(model, r, mode=...)`` on the rate-0 build.

For ``torchvision:resnet50`` (rates ``r * (i + 1) / N`` over the N blocks, Composer's linear
distribution, given to pathsurgeon as an explicit list):

- untouched; block-wise: Huang et al. / Composer's block-wise stochastic depth, written here from its
  documented semantics (one draw per block per step; a dropped block computes ``relu(shortcut(x))``
  and nothing else);
- pathsurgeon sample / skip / batch / fixed_count, and skip / fixed_count with
  ``batch_norm="kept_rows"`` (the BatchNorms see the kept samples only).

Each run reports, per variant, the median step time and the median of the per-round ratios to
``untouched`` and to the library's own method (timm native; block-wise). With ``--runs N`` the run is
repeated N times and the table gives the median of the N ratios and their range. Memory, the median
of 3 untimed steps: on CUDA the peak allocated memory of a step; on CPU the bytes autograd saves for
the backward pass (the activations, which is what skipping changes).

``--device cuda`` synchronises around every timed step; ``--compile`` runs every variant under
``torch.compile`` (``--compile both``: eager and compiled variants side by side).

    .venv/bin/python benchmarks/step_time.py [--models vit_tiny_patch16_224 torchvision:resnet50]
        [--rounds 12] [--runs 1] [--batch 32] [--size 224] [--rate 0.5] [--device cpu] [--compile no|yes|both]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time
import types

import timm
import torch
import torchvision

import pathsurgeon

MODES = ("sample", "skip", "batch", "fixed_count")


def step(model, optimizer, images, labels) -> None:
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed_step(model, optimizer, images, labels) -> float:
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    step(model, optimizer, images, labels)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
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
        torch.cuda.synchronize(images.device)
        torch.cuda.reset_peak_memory_stats(images.device)
        step(model, optimizer, images, labels)
        torch.cuda.synchronize(images.device)
        return torch.cuda.max_memory_allocated(images.device)
    loss = None
    with saved_bytes_counter() as storages:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return sum(storages.values())


# --- the methods pathsurgeon is measured against, written from their documented semantics -------------


def drop_add_residual_stochastic_depth(x: torch.Tensor, residual_func, sample_drop_ratio: float) -> torch.Tensor:
    """DINOv2 (dinov2/layers/block.py): the branch on k = max(int(b(1-p)), 1) random rows, added back at
    those rows scaled by b / k."""
    b = x.shape[0]
    count = max(int(b * (1 - sample_drop_ratio)), 1)
    rows = torch.randperm(b, device=x.device)[:count]
    residual = residual_func(x[rows])
    added = torch.index_add(x.flatten(1), 0, rows, residual.flatten(1).to(x.dtype), alpha=b / count)
    return added.view_as(x)


def dinov2_blocks(model: torch.nn.Module, rates: list[float]) -> torch.nn.Module:
    """Give every timm ViT block DINOv2's training forward (efficient stochastic depth at its rate)."""

    def forward(self, x):
        attn = lambda t: self.ls1(self.attn(self.norm1(t)))  # noqa: E731
        mlp = lambda t: self.ls2(self.mlp(self.norm2(t)))  # noqa: E731
        if self.training and self.sample_drop_ratio > 0.0:
            x = drop_add_residual_stochastic_depth(x, attn, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, mlp, self.sample_drop_ratio)
        x = x + attn(x)
        return x + mlp(x)

    for block, rate in zip(model.blocks, rates, strict=True):
        block.sample_drop_ratio = rate
        block.forward = types.MethodType(forward, block)
    return model


def block_wise(model: torch.nn.Module, rates: list[float]) -> torch.nn.Module:
    """Huang et al. 2016 / Composer's block-wise stochastic depth on torchvision ResNet blocks: one draw per
    block per step; a kept block runs as usual (branch scaled by 1/(1-p) here, where Composer scales by
    1-p at eval: the same expectation); a dropped block runs its shortcut only."""

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.training and self.drop_rate > 0.0 and not bool(torch.empty(1).bernoulli_(1.0 - self.drop_rate)):
            return shortcut if self.downsample is None else self.relu(shortcut)
        out = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "conv3"):
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        if self.training and self.drop_rate > 0.0:
            out = out * (1.0 / (1.0 - self.drop_rate))
        return self.relu(out + shortcut)

    blocks = [m for m in model.modules() if isinstance(m, (torchvision.models.resnet.Bottleneck,
                                                             torchvision.models.resnet.BasicBlock))]
    for block, rate in zip(blocks, rates, strict=True):
        block.drop_rate = rate
        block.forward = types.MethodType(forward, block)
    return model


# --- the variants ---------------------------------------------------------------------------------------


def _surgered(model, key: str, report_to: list[str], size: int | None, **settings) -> torch.nn.Module:
    inputs = torch.randn(2, 3, size, size) if size else None  # add's checks at the benchmark's image size
    report = pathsurgeon.add(model, pathsurgeon.DropPathConfig(**settings), example_inputs=inputs)
    if report.fallbacks:
        report_to.append(f"  {key}: {len(report.fallbacks)} of {len(report.branches)} branches computed in full "
                         f"({report.fallbacks[0].reason})")
    return model


def timm_variants(name: str, rate: float, notes: list[str], size: int | None) -> tuple[dict, str]:
    torch.manual_seed(0)
    native = timm.create_model(name, drop_path_rate=rate)
    weights = native.state_dict()

    def fresh():
        model = timm.create_model(name, drop_path_rate=0.0)
        model.load_state_dict(weights)
        return model

    built = {"untouched": fresh(), "timm native": native}
    blocks = getattr(native, "blocks", None)
    if blocks is not None and all(hasattr(b, "ls1") and hasattr(b, "mlp") for b in blocks):
        built["DINOv2"] = dinov2_blocks(fresh(), [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in blocks])
    for mode in MODES:
        built[f"pathsurgeon {mode}"] = _surgered(fresh(), f"pathsurgeon {mode}", notes, size, rate=rate, mode=mode)
    return built, "timm native"


def torchvision_variants(name: str, rate: float, notes: list[str], size: int | None) -> tuple[dict, str]:
    torch.manual_seed(0)
    untouched = getattr(torchvision.models, name)()
    count = len(pathsurgeon.find(untouched))
    rates = [rate * (i + 1) / count for i in range(count)]  # Composer's linear distribution

    def fresh():
        return copy.deepcopy(untouched)

    built = {"untouched": untouched, "block-wise": block_wise(fresh(), rates)}
    for mode in MODES:
        built[f"pathsurgeon {mode}"] = _surgered(fresh(), f"pathsurgeon {mode}", notes, size, schedule=rates, mode=mode)
    for mode in ("skip", "fixed_count"):
        key = f"pathsurgeon {mode} kept_rows"
        built[key] = _surgered(fresh(), key, notes, size, schedule=rates, mode=mode, batch_norm="kept_rows")
    return built, "block-wise"


# --- measuring --------------------------------------------------------------------------------------------


def measure(models, images, labels, rounds: int) -> dict[str, list[float]]:
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for round_index in range(rounds + 2):
        for key, model in models.items():
            # every variant of a round starts from one seed: block-wise and mode 'batch' draw one number per
            # block in forward order, so they drop the same blocks (a paired comparison, not draw luck)
            torch.manual_seed(round_index)
            elapsed = timed_step(model, optimizers[key], images, labels)
            if round_index >= 2:  # two warm-up rounds (and, compiled, the compilation) not counted
                times[key].append(elapsed)
    return times


def ratio(times: dict[str, list[float]], key: str, reference: str) -> float:
    return statistics.median(a / b for a, b in zip(times[key], times[reference], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "convnext_atto"],
                        help="timm names, or torchvision:NAME for a torchvision ResNet")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per run, after 2 warm-up rounds")
    parser.add_argument("--runs", type=int, default=1, help="repeat the interleaved run; ratios: median and range")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's own)")
    parser.add_argument("--rate", type=float, default=0.5,
                        help="drop-path rate: timm's default schedule; torchvision: the deepest block's (linear)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default="no",
                        help="torch.compile every variant (both: eager and compiled side by side)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor() or platform.machine()
    memory_kind = "peak allocated" if device.type == "cuda" else "saved for backward"
    print(f"torch {torch.__version__}, timm {timm.__version__}, pathsurgeon {pathsurgeon.__version__}, {where}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, rate {args.rate}, compile {args.compile}, "
          f"{args.runs} run(s) of {args.rounds} rounds + 2 warm-up")
    for name in args.models:
        print(f"\n{name}")
        notes: list[str] = []
        if name.startswith("torchvision:"):
            eager, reference = torchvision_variants(name.split(":", 1)[1], args.rate, notes, args.size)
            size = (3, 224, 224)
        else:
            eager, reference = timm_variants(name, args.rate, notes, args.size)
            size = eager["untouched"].pretrained_cfg["input_size"]
        print("\n".join(notes) if notes else "  every branch of every pathsurgeon variant skips as asked")
        if args.size:
            size = (size[0], args.size, args.size)
        models: dict[str, torch.nn.Module] = {}
        for key, model in eager.items():
            model.to(device).train()
            if args.compile in ("no", "both"):
                models[key] = model
            if args.compile in ("yes", "both"):
                models[f"{key} (compiled)" if args.compile == "both" else key] = torch.compile(model)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, *size, generator=generator).to(device)
        labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
        memory = {  # median of 3 steps: in the skipping modes it depends on how many samples were kept
            k: statistics.median(step_memory(m, optimizers[k], images, labels) for _ in range(3))
            for k, m in models.items()
        }
        runs = [measure(models, images, labels, args.rounds) for _ in range(args.runs)]
        base = "untouched"
        reference_key = reference if reference in models else f"{reference} (compiled)"
        print(f"  {'variant':<36} {'median step':>11} {'vs untouched':>16} {'vs ' + reference:>18} "
              f"{'memory (' + memory_kind + ')':>30}")
        for key in models:
            to_base = [ratio(times, key, base if base in models else f"{base} (compiled)") for times in runs]
            to_reference = [ratio(times, key, reference_key) for times in runs]
            step_time = statistics.median(t for times in runs for t in times[key])

            def shown(values: list[float]) -> str:
                middle = statistics.median(values)
                return f"{middle:.3f}" if len(values) == 1 else f"{middle:.3f} [{min(values):.3f}-{max(values):.3f}]"

            print(f"  {key:<36} {step_time * 1e3:>9.0f}ms {shown(to_base):>16} {shown(to_reference):>18} "
                  f"{memory[key] / 2**20:>21.0f} MiB ({memory[key] / memory[base if base in memory else key]:.2f}x)")


if __name__ == "__main__":
    main()
