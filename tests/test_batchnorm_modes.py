"""BatchNorm branches in the modes that compute less: where stochastic depth was born (ResNets).

Ground truth for mode 'batch': the block-wise method of Huang et al. 2016 as Composer ships it for
torchvision's ResNet blocks, written here from its documented semantics — one draw per block per
step; a kept block runs as usual (its branch scaled by ``1 / (1 - p)``, pathsurgeon's training-time
scaling in place of Composer's eval-time one); a dropped block returns ``act(shortcut(x))`` and its
branch, BatchNorms included, does not run at all (no statistics updated, no batch counted).
"""

from __future__ import annotations

import copy
import types

import pytest
import timm
import torch
import torchvision
from conftest import pathsurgeon_leftovers
from torch import nn

import pathsurgeon

BATCH, SIZE, STEPS = 4, 32, 4


def _randomised_norms(model: nn.Module) -> nn.Module:
    """Real values in every BatchNorm: timm and torchvision can zero-init the last one of a branch,
    which would make a dropped and a kept branch look alike."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def _torchvision_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


def _timm_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block.act1(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.act2(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


def _block_wise(block: nn.Module, rate: float, branch) -> None:
    """Give ``block`` the block-wise forward: one draw per step; a dropped block runs no branch.
    (Both libraries' blocks end in a ReLU; the out-of-place one, as the shortcut may be the input.)"""
    act = torch.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if not self.training or rate == 0.0:
            return act(branch(self, x) + shortcut)
        if bool(torch.empty(1).bernoulli_(1.0 - rate)):  # the draw pathsurgeon makes, on the CPU generator
            return act(branch(self, x) * (1.0 / (1.0 - rate)) + shortcut)
        return act(shortcut)

    block.forward = types.MethodType(forward, block)


MODELS = {
    "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=10), _torchvision_branch),
    "timm resnet26": (lambda: timm.create_model("resnet26", num_classes=10), _timm_branch),
}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key", list(MODELS))
def test_batch_mode_on_batchnorm_branches_is_the_block_wise_method(key):
    build, branch = MODELS[key]
    torch.manual_seed(0)
    model = _randomised_norms(build())
    reference = copy.deepcopy(model)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    report = pathsurgeon.add(model, 0.5, schedule="uniform", mode="batch", example_inputs=x[:2])
    assert report.fallbacks == [] and all(b.mode == "batch" and b.entry for b in report.branches)
    rates = {b.block: b.rate for b in report.branches}
    for name, rate in rates.items():
        _block_wise(reference.get_submodule(name), rate, branch)

    rows: dict[str, list[int]] = {b.block: [] for b in report.branches}
    for b in report.branches:
        model.get_submodule(b.entry).register_forward_pre_hook(
            lambda module, args, block=b.block: rows[block].append(args[0].shape[0]))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    model.train(), reference.train()
    for step in range(STEPS):
        outputs = []
        for m, optimizer in zip((model, reference), optimizers, strict=True):
            torch.manual_seed(step)
            optimizer.zero_grad(set_to_none=True)
            out = m(x)
            out.square().mean().backward()
            for p in m.parameters():  # a dropped branch's weights get zero gradients here, none there
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            optimizer.step()
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
        # BatchNorm statistics and batch counts too: a dropped branch's BatchNorms were left alone
        expected, actual = _state(reference), _state(model)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    calls = [n for seen in rows.values() for n in seen]
    assert set(calls) == {0, BATCH}  # kept: the whole batch; dropped: no row, so nothing is computed
    model.eval()
    pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


def test_a_dropped_batchnorm_branch_leaves_every_buffer_even_the_batch_count():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    pathsurgeon.add(model, 0.99, schedule="uniform", mode="batch", example_inputs=x[:2])
    block = model.layer1[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    rows: list[int] = []
    block.conv1.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    model.train()
    torch.manual_seed(0)
    model(x)
    assert rows == [0]  # dropped (rate 0.99) under this seed
    after = block.state_dict()
    for name in ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "bn2.num_batches_tracked"):
        assert torch.equal(after[name], before[name]), name


def test_skip_mode_keeps_batchnorm_branches_in_full_unless_asked():
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    model = torchvision.models.resnet18(num_classes=10)
    default = pathsurgeon.add(model, 0.5, mode="skip", example_inputs=x[:2])
    assert len(default.fallbacks) == len(default.branches) == 8
    assert all("batch_norm='kept_rows'" in f.reason for f in default.fallbacks)
    pathsurgeon.strip(model)

    config = pathsurgeon.DropPathConfig(0.5, schedule="uniform", mode="skip", batch_norm="kept_rows")
    report = pathsurgeon.add(model, config, example_inputs=x[:2])
    # at 32 px layer4 is 1x1: one kept sample gives its BatchNorms one value per channel, which
    # they cannot train on; the check finds that and those branches compute every sample
    assert {f.block for f in report.fallbacks} == {"layer4.0", "layer4.1"}
    assert all("one sample kept" in f.reason for f in report.fallbacks)
    skipping = [b for b in report.branches if b.entry]
    assert len(skipping) == 6 and all(b.mode == "skip" for b in skipping)
    seen: list[int] = []
    model.layer2[1].bn1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    model.train()
    torch.manual_seed(0)
    model(x).sum().backward()
    # the BatchNorm normalised the kept samples only: what mode 'skip' computes (mode 'sample' draws
    # the same mask from the same seed, so the count is the same there)
    torch.manual_seed(0)
    drawn = [int(torch.empty(BATCH).bernoulli_(0.5).sum()) for _ in range(8)]
    assert seen == [drawn[3]]
    with pytest.raises(pathsurgeon.PathSurgeonError, match="batch_norm must be one of"):
        pathsurgeon.DropPathConfig(0.1, batch_norm="yes")


def test_batch_norm_choice_round_trips_through_save_and_load(tmp_path):
    from pathsurgeon.changes import record_of

    model = torchvision.models.resnet18(num_classes=7)
    config = pathsurgeon.DropPathConfig(0.1, mode="batch", batch_norm="kept_rows")
    assert pathsurgeon.DropPathConfig.from_dict(config.to_dict()) == config
    assert "batch_norm" not in config.replace(batch_norm="fallback").to_dict()  # manifests as before
    report = pathsurgeon.add(model, config, example_inputs=torch.randn(2, 3, 64, 64))
    pathsurgeon.save(model, tmp_path / "resnet")
    loaded = pathsurgeon.load(tmp_path / "resnet", verify=False)
    assert record_of(loaded).config.batch_norm == "kept_rows" and record_of(loaded).mode == "batch"
    assert [b.entry for b in pathsurgeon.find(loaded)] == [b.entry for b in report.branches]
