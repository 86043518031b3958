"""LoRA (PEFT) and drop path in both orders, on a tiny timm ViT: the record of ``add`` never gets lost.

``merge_and_unload()`` returns the model inside the ``PeftModel``; when ``add`` was given the
``PeftModel``, the surgery record stays on the wrapper, and ``strip`` / ``is_surgered`` / ``add`` must still
agree on the merged tree. The final model equals a never-surgered merged model in eval, bitwise.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import pathsurgeon_leftovers

import pathsurgeon

peft = pytest.importorskip("peft")


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1", "fc2"], modules_to_save=["head"])
    return peft.get_peft_model(model, config)


def _train_step(model, x, seed=1):
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().mean().backward()
    optimizer.step()


def _reference(x):
    """The same training on a never-surgered model, merged: what the surgered run must end as in eval."""
    model = _lora(_vit())
    _train_step(model, x)
    return model.merge_and_unload().eval()


@pytest.mark.parametrize("order", ["add-then-lora", "lora-then-add"])
def test_lora_and_drop_path_in_both_orders(order, tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if order == "add-then-lora":
        base = _vit()
        pathsurgeon.add(base, 0.0, example_inputs=x[:2])  # rate 0: the same training step as the reference
        model = _lora(base)
    else:
        model = _lora(_vit())
        pathsurgeon.add(model, 0.0, example_inputs=x[:2])
    assert pathsurgeon.is_surgered(model)
    pathsurgeon.set_rate(model if order == "lora-then-add" else base, 0.3)
    pathsurgeon.set_rate(model if order == "lora-then-add" else base, 0.0)
    _train_step(model, x)
    merged = model.merge_and_unload()
    # is_surgered, strip and add's own detection agree on the merged tree
    assert pathsurgeon.is_surgered(merged)
    with pytest.raises(pathsurgeon.AlreadySurgeredError):
        pathsurgeon.add(merged, 0.1, example_inputs=x[:2])
    pathsurgeon.strip(merged)
    assert pathsurgeon_leftovers(merged) == []
    assert not pathsurgeon.is_surgered(merged)
    reference = _reference(x)
    with torch.no_grad():
        assert torch.equal(merged.eval()(x), reference(x))
    assert [type(m) for m in merged.modules()] == [type(m) for m in reference.modules()]
    assert merged.state_dict().keys() == reference.state_dict().keys()
    # and the merged, stripped model can be surgered again and exported
    pathsurgeon.add(merged, 0.1, example_inputs=x[:2])
    pathsurgeon.strip(merged)
    torch.save(merged.state_dict(), tmp_path / "merged.pt")


def test_strip_of_a_tree_without_its_record_puts_back_what_the_slot_held():
    """A leftover DropPath holds what its slot held: strip restores that very object."""
    x = torch.randn(2, 3, 32, 32)
    model = _lora(_vit())
    original = model.base_model.model.blocks[0].drop_path1
    pathsurgeon.add(model, 0.2, example_inputs=x)
    merged = model.merge_and_unload()
    assert isinstance(merged.blocks[0].drop_path1, pathsurgeon.DropPath)
    pathsurgeon.strip(merged)
    assert merged.blocks[0].drop_path1 is original


def test_set_rate_on_a_merged_tree_says_where_the_record_is_and_the_peft_model_still_re_rates_it():
    x = torch.randn(2, 3, 32, 32)
    model = _lora(_vit())
    pathsurgeon.add(model, 0.2, example_inputs=x)
    merged = model.merge_and_unload()

    def rates():
        return {n: m.rate for n, m in merged.named_modules() if isinstance(m, pathsurgeon.DropPath)}

    before = rates()
    assert before and max(before.values()) > 0
    # the record stayed on the PeftModel: no silent no-op and no "call add first" (add would refuse)
    with pytest.raises(pathsurgeon.PathSurgeonError, match="call set_rate on the model add was given"):
        pathsurgeon.set_rate(merged, 0.1)
    assert rates() == before
    branches = pathsurgeon.set_rate(model, 0.1)
    assert rates() == {b.target.removeprefix("base_model.model."): b.rate for b in branches}
    assert rates() != before
    pathsurgeon.strip(merged)
    assert pathsurgeon_leftovers(merged) == []
