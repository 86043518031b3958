"""Runs under ``torchrun --nproc_per_node 2`` (gloo, CPU), started by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 train_worker.py {ddp|fsdp|hf} OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json`` with what it observed; the test reads and judges them. A rank
that fails raises, torchrun exits non-zero and the test shows the traceback.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch import nn

import pathsurgeon
from pathsurgeon import changes

MODES = ("sample", "skip", "batch")
STEPS, BATCH = 3, 8


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank, as loading a checkpoint gives
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=4
    )


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own shard of the data
    return torch.randn(BATCH, 3, 32, 32, generator=generator), torch.randint(0, 4, (BATCH,), generator=generator)


def same_on_every_rank(tensors) -> bool:
    """Whether the flattened tensors are bitwise identical on all ranks (all-gather, compare on each)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def count_dropped_rows(model: nn.Module) -> list[int]:
    """Counts samples whose branch output was zeroed by an inserted DropPath, over training forwards."""
    dropped = [0]

    def hook(module, args, output):
        if module.training and module.rate > 0:
            rows = output.movedim(module.batch_axis, 0).reshape(output.shape[module.batch_axis], -1)
            dropped[0] += int((rows == 0).all(1).sum())

    for change in vars(model)[changes.RECORD_ATTRIBUTE].changes:
        change.drop.register_forward_hook(hook)
    return dropped


def refusal(call) -> str:
    try:
        call()
    except pathsurgeon.WrappedModelError as error:
        return str(error)
    return ""


def run_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    base = tiny_vit()
    for mode in MODES:
        model = copy.deepcopy(base)
        pathsurgeon.add(model, 0.4, mode=mode, example_inputs=batch(0, 0)[0][:2])
        dropped = count_dropped_rows(model)
        wrapped = DistributedDataParallel(model)  # find_unused_parameters=False: every parameter must get a grad
        scheduler = pathsurgeon.RateScheduler.warmup(model, 0.4, steps=1)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
        torch.manual_seed(100 + rank)  # different masks on every rank, as in real training
        identical = []
        for step in range(STEPS):
            images, labels = batch(rank, step)
            loss = nn.functional.cross_entropy(wrapped(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            identical.append(same_on_every_rank(list(model.parameters())))
        before = {n: p.detach().clone() for n, p in base.named_parameters()}
        results[mode] = {
            "identical_after_each_step": identical,
            "dropped_rows": dropped[0],
            "trained": any(not torch.equal(p, before[n]) for n, p in model.named_parameters()),
            "refusal": refusal(lambda w=wrapped: pathsurgeon.add(w, 0.1)),
            "set_rate_refusal": refusal(lambda w=wrapped: pathsurgeon.set_rate(w, 0.1)),
            "rate_at_end": scheduler.rate,
        }
        pathsurgeon.strip(model)
        results[mode]["surgered_after_strip"] = pathsurgeon.is_surgered(model)
    return results


def run_fsdp(rank: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    initial = tiny_vit().state_dict()
    untouched_keys = list(initial)
    results = {}
    for mode in MODES:
        model = tiny_vit()
        pathsurgeon.add(model, 0.4, mode=mode, example_inputs=batch(0, 0)[0][:2])  # add before sharding
        dropped = count_dropped_rows(model)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        scheduler = pathsurgeon.RateScheduler.warmup(model, 0.4, steps=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(100 + rank)
        for step in range(STEPS):
            images, labels = batch(rank, step)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        pathsurgeon.strip(model)  # after training, on the sharded model
        # every rank takes part in gathering; with cpu_offload only rank 0 receives the full state dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.eval()
        images = batch(0, 99)[0]
        with torch.no_grad():
            sharded_out = model(images)
        results[mode] = {
            "dropped_rows": dropped[0],
            "leftovers": [n for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)],
            "surgered_after_strip": pathsurgeon.is_surgered(model),
        }
        if rank == 0:
            restored = tiny_vit().eval()
            restored.load_state_dict(full)  # strict: the untouched model's keys, the trained values
            with torch.no_grad():
                restored_out = restored(images)
            results[mode].update({
                "keys_equal_untouched": list(full) == untouched_keys,
                "restored_minus_sharded": float((restored_out - sharded_out).abs().max()),
                "trained": any(not torch.equal(v, initial[k]) for k, v in full.items()),
            })
    sharded = tiny_vit()
    fully_shard(sharded, mesh=mesh)
    results["refusal"] = refusal(lambda: pathsurgeon.add(sharded, 0.1, example_inputs=batch(0, 0)[0][:2]))
    return results


def run_hf(rank: int, out: Path) -> dict:
    import transformers

    from pathsurgeon.integrations.transformers import DropPathCallback

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    pathsurgeon.add(model, 0.2)
    scheduler = pathsurgeon.RateScheduler.warmup(model, 0.2, steps=2)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 2}

    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=4, max_steps=STEPS, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Images(), callbacks=[DropPathCallback(scheduler)]
    )
    trainer.train()
    identical = same_on_every_rank(list(model.parameters()))
    pathsurgeon.strip(model)
    return {
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "identical_after_training": identical,
        "logged_rates": [e["drop_path_rate"] for e in trainer.state.log_history if "loss" in e],
        "expected_rates": [scheduler.rate_at(k) for k in range(STEPS)],
        "surgered_after_strip": pathsurgeon.is_surgered(model),
    }


def main() -> None:
    what, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if what == "hf":  # the Trainer sets up the process group itself (through accelerate)
        rank = int(__import__("os").environ["RANK"])
        results = run_hf(rank, out)
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        results = run_ddp(rank) if what == "ddp" else run_fsdp(rank)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
