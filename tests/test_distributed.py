"""Many processes: DDP in every mode, FSDP2 per block, the Hugging Face Trainer, each on 2 real processes.

Every test starts ``torchrun --standalone --nproc_per_node 2`` (gloo on CPU; ``--standalone`` picks a free
port, so tests running side by side do not collide) on ``tests/distributed/train_worker.py`` and judges
what each rank wrote. Wrappers that need no process group are checked in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import supported_from
from torch import nn

import pathsurgeon

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
MODES = ("sample", "skip", "batch")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def torchrun(what: str, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), what, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_ddp_trains_every_mode_without_find_unused_parameters(tmp_path):
    ranks = torchrun("ddp", tmp_path)
    for rank in ranks:
        for mode in MODES:
            result = rank[mode]
            assert result["identical_after_each_step"] == [True] * 3, mode  # DDP averaged the same gradients
            assert result["trained"] and result["dropped_rows"] > 0, mode
            assert not result["surgered_after_strip"]
            for refusal in (result["refusal"], result["set_rate_refusal"]):
                assert "DistributedDataParallel" in refusal and "model.module" in refusal
                assert "\n" not in refusal


@pytest.mark.slow
@supported_from("torch", "2.6", "torch.distributed.fsdp.fully_shard is public from 2.6")
def test_fsdp2_add_before_sharding_strip_after_training_full_state_dict_has_the_original_keys(tmp_path):
    ranks = torchrun("fsdp", tmp_path)
    for rank_index, rank in enumerate(ranks):
        for mode in MODES:
            result = rank[mode]
            assert result["dropped_rows"] > 0, mode
            assert result["leftovers"] == [] and not result["surgered_after_strip"], mode
            if rank_index == 0:  # with cpu_offload, the full state dict lands on rank 0
                assert result["keys_equal_untouched"], mode
                assert result["trained"], mode
                assert result["restored_minus_sharded"] <= 1e-6, mode  # the gathered weights are the trained ones
        assert "fully_shard" in rank["refusal"] and "pathsurgeon.add before" in rank["refusal"]


@pytest.mark.slow
def test_hf_trainer_on_two_processes(tmp_path):
    pytest.importorskip("transformers")
    ranks = torchrun("hf", tmp_path)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["global_step"] == 3
        assert rank["identical_after_training"]
        assert rank["logged_rates"] == rank["expected_rates"]
        assert not rank["surgered_after_strip"]
    assert ranks[0]["expected_rates"] == ranks[1]["expected_rates"]


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)


@pytest.mark.parametrize(
    "wrap, attribute",
    [(nn.DataParallel, "model.module"), (lambda m: torch.compile(m, backend="eager"), "model._orig_mod")],
    ids=["DataParallel", "torch.compile"],
)
def test_wrapper_objects_are_refused_naming_the_model_inside(wrap, attribute):
    model = _vit()
    wrapped = wrap(model)
    with pytest.raises(pathsurgeon.WrappedModelError, match=attribute.replace(".", r"\.")) as caught:
        pathsurgeon.add(wrapped, 0.1)
    assert "\n" not in str(caught.value) and not pathsurgeon.is_surgered(model)
    report = pathsurgeon.add(getattr(wrapped, attribute.split(".")[1]), 0.1)  # the fix the message names
    assert report.branches and pathsurgeon.is_surgered(model)
    with pytest.raises(pathsurgeon.WrappedModelError):
        pathsurgeon.RateScheduler(wrapped, lambda step: 0.1)
