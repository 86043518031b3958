"""Hugging Face vision models: tiny configs, no download. Ground truth is HF's own drop-path call sites."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import module_layout, pathsurgeon_leftovers, supported_from, transformers_class  # noqa: E402

import pathsurgeon  # noqa: E402

T = transformers
VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
STAGES = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32)

# name -> (config class, model class, config kwargs); models with a native drop path take drop_path_rate
MODELS = {
    "vit": (T.ViTConfig, T.ViTForImageClassification, VIT),
    "deit": (T.DeiTConfig, T.DeiTForImageClassification, VIT),
    "vit_mae": (T.ViTMAEConfig, T.ViTMAEModel, {**VIT, "mask_ratio": 0.5}),
    "beit": (T.BeitConfig, T.BeitForImageClassification, VIT),
    "data2vec_vision": (T.Data2VecVisionConfig, T.Data2VecVisionForImageClassification, VIT),
    "dinov2": (T.Dinov2Config, T.Dinov2Model, {k: v for k, v in VIT.items() if k != "intermediate_size"}),
    # transformers 4.56 added DINOv3: absent from the floors' release, skipped there (build)
    "dinov3_vit": (getattr(T, "DINOv3ViTConfig", None), getattr(T, "DINOv3ViTModel", None), VIT),
    "convnext": (T.ConvNextConfig, T.ConvNextForImageClassification, STAGES),
    "convnextv2": (T.ConvNextV2Config, T.ConvNextV2ForImageClassification, STAGES),
    "swin": (
        T.SwinConfig,
        T.SwinForImageClassification,
        dict(embed_dim=16, depths=[1, 2], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4),
    ),
    "swinv2": (
        T.Swinv2Config,
        T.Swinv2ForImageClassification,
        dict(embed_dim=16, depths=[1, 2], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4),
    ),
    "segformer": (
        T.SegformerConfig,
        T.SegformerForImageClassification,
        dict(
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 2, 1],
            num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=32,
            image_size=64,
        ),
    ),
    "poolformer": (T.PoolFormerConfig, T.PoolFormerForImageClassification, STAGES),
    "hiera": (
        T.HieraConfig,
        T.HieraForImageClassification,
        dict(
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            image_size=[64, 64],
            patch_size=[7, 7],
            patch_stride=[4, 4],
            patch_padding=[3, 3],
            query_stride=[2, 2],
            masked_unit_size=[8, 8],
        ),
    ),
    "clip_vision": (T.CLIPVisionConfig, T.CLIPVisionModel, VIT),
    "siglip_vision": (T.SiglipVisionConfig, T.SiglipVisionModel, VIT),
}
NO_NATIVE_DROP_PATH = {"vit", "deit", "vit_mae", "clip_vision", "siglip_vision"}


def build(name: str, rate: float | None = None):
    config_class, model_class, kwargs = MODELS[name]
    if config_class is None or model_class is None:
        pytest.skip(f"transformers {T.__version__} has no {name} (a later release added it)")
    kwargs = dict(kwargs)
    if rate is not None:
        kwargs["drop_path_rate"] = rate
    torch.manual_seed(0)
    return model_class(config_class(**kwargs)).eval()


def pixels(model, batch: int = 2) -> dict:
    size = model.config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(batch, 3, height, width, generator=generator)}
    if isinstance(model, T.ViTMAEModel):  # random masking: fix the noise so eval outputs are repeatable
        inputs["noise"] = torch.rand(batch, model.embeddings.patch_embeddings.num_patches, generator=generator)
    return inputs


def native_call_sites(model, inputs) -> collections.Counter:
    """(parent of an HF XxxDropPath, its rate) for every call in a training forward."""
    calls = collections.Counter()
    handles = [
        module.register_forward_hook(
            lambda m, i, o, n=name: calls.update([(n.rpartition(".")[0], m.drop_prob)])
        )
        for name, module in model.named_modules()
        # HF PoolFormer also calls a DropPath *inside* its MLP as a dropout; only residual slots count
        if type(module).__name__.endswith("DropPath") and name.rpartition(".")[2].startswith("drop_path")
    ]
    model.train()
    with torch.no_grad():
        model(**inputs)
    model.eval()
    for handle in handles:
        handle.remove()
    return calls


def first_tensor(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


# 4.x ViT-family layers add their MLP residual inside XxxOutput: found as a block of its own
LAYERS_OF_5 = supported_from("transformers", "5.0", "4.x ViT layers add the MLP residual inside XxxOutput")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=LAYERS_OF_5) if name in ("vit", "deit", "vit_mae") else name for name in sorted(MODELS)
])
def test_add_verify_strip_keeps_a_transformers_model(name):
    needs_rate = name not in NO_NATIVE_DROP_PATH
    model = build(name, 0.0 if needs_rate else None)
    inputs = pixels(model)
    layout, keys = module_layout(model), list(model.state_dict())
    config = model.config.to_dict()
    with torch.no_grad():
        before = first_tensor(model(**inputs))

    report = pathsurgeon.add(model, 0.2, example_inputs=inputs)

    assert report.max_abs_diff == 0.0
    assert type(model) is layout[0][1] and list(model.state_dict()) == keys
    assert model.config.to_dict() == config
    # every pre-existing layer keeps its class (gradient checkpointing, _no_split_modules, FSDP policies)
    surgered = dict(module_layout(model))
    assert all(surgered.get(n, t) is t or issubclass(surgered[n], pathsurgeon.DropPath) for n, t in layout)
    with torch.no_grad():
        assert torch.equal(first_tensor(model(**inputs)), before)

    if name in NO_NATIVE_DROP_PATH:  # attention and MLP residual of every encoder layer
        per_block = collections.Counter(b.block for b in report.branches if b.rate > 0 or b.index == 0)
        assert set(per_block.values()) == {2}
        assert len(per_block) == model.config.num_hidden_layers
    else:  # exactly HF's own call sites (one module is often called for both residuals)
        native = build(name, 0.2)
        expected = native_call_sites(native, inputs)
        native_counts = collections.Counter(block for block, rate in expected.elements() if rate > 0)
        our_counts = collections.Counter(b.block for b in report.branches)
        assert {b: our_counts[b] for b in native_counts} == dict(native_counts)
        # HF builds its rate-0 first layer with nn.Identity, so the only extra block is our index 0
        assert {b.index for b in report.branches if b.block not in native_counts} <= {0}
        # and HF's own rates, read from a meta-device rebuild with the config's drop_path_rate: bitwise
        assert report.rates_from == "transformers config"
        ours = collections.Counter((b.block, b.rate) for b in report.branches if b.rate > 0)
        assert ours == +collections.Counter({k: v for k, v in expected.items() if k[1] > 0})

    pathsurgeon.strip(model)
    assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []
    with torch.no_grad():
        assert torch.equal(first_tensor(model(**inputs)), before)


@pytest.mark.parametrize("name", ["vit", "beit"])
def test_save_pretrained_round_trip(name, tmp_path):
    model = build(name, None if name == "vit" else 0.0)
    pathsurgeon.add(model, 0.1)
    model.save_pretrained(tmp_path / "surgered")
    pathsurgeon.strip(model)
    model.save_pretrained(tmp_path / "stripped")
    for folder in ("surgered", "stripped"):
        loaded, info = type(model).from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        state, reference = loaded.state_dict(), model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)
        assert pathsurgeon_leftovers(loaded) == []


@pytest.mark.parametrize("name", ["vit", "beit", "dinov2"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    model = build(name, None if name in NO_NATIVE_DROP_PATH else 0.0)
    pathsurgeon.add(model, 0.5, schedule="uniform")
    inputs, labels = pixels(model, batch=8), torch.arange(8) % 2

    def loss_and_grads(checkpointing: bool):
        twin = copy.deepcopy(model)
        if checkpointing:
            twin.gradient_checkpointing_enable()
        twin.train()
        torch.manual_seed(3)
        output = twin(**inputs)
        logits = output.logits if hasattr(output, "logits") else output.pooler_output[:, :2]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads = loss_and_grads(True)
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[key], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_trainer_fine_tunes_a_surgered_model(tmp_path):
    model = build("vit")
    pathsurgeon.add(model, 0.2)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 2}

    args = T.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = T.Trainer(model=model, args=args, train_dataset=Images())
    result = trainer.train()
    assert result.global_step == 4
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


@pytest.mark.parametrize("name", sorted(set(MODELS) - NO_NATIVE_DROP_PATH - {"poolformer"}))
def test_training_outputs_are_hugging_faces_under_one_seed(name):
    """HF's DropPath draws floor(rand + keep); the DropPath that fills an HF slot draws the same way.

    (PoolFormer is left out: HF also calls its DropPath inside the MLP, which is no residual branch.)
    """
    native, model = build(name, 0.2), build(name, 0.0)
    model.load_state_dict(native.state_dict())
    inputs = pixels(model, batch=8)
    pathsurgeon.add(model, 0.2, example_inputs=pixels(model))
    outputs = []
    for m in (native, model):
        m.train()
        torch.manual_seed(4)
        with torch.no_grad():
            outputs.append(first_tensor(m(**inputs)))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)


def test_example_inputs_come_from_the_config():
    model = build("convnext", 0.0)
    report = pathsurgeon.add(model, 0.1)  # pixel_values of config.image_size, config.num_channels
    assert report.max_abs_diff == 0.0


def test_a_config_without_image_size_gets_224_pixels():
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    assert not hasattr(config, "image_size")
    model = T.ResNetForImageClassification(config).eval()
    report = pathsurgeon.add(model, 0.1)  # (2, num_channels, 224, 224) as pixel_values=
    assert report.max_abs_diff == 0.0 and len(report.branches) == 4
    assert report.rates_from == "linear over found units"  # HF ResNet has no drop path of its own


def test_random_eval_model_verifies_without_fixed_noise():
    """ViTMAE masks at random in eval: both verification forwards run from one forked, fixed RNG state."""
    model = build("vit_mae")
    state = torch.get_rng_state()
    report = pathsurgeon.add(model, 0.1)  # no noise= needed
    assert report.max_abs_diff == 0.0
    assert torch.equal(torch.get_rng_state(), state)  # the user's generator did not move
    assert len(report.branches) == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("name", sorted(NO_NATIVE_DROP_PATH - {"vit_mae"}))
def test_hooked_branches_are_really_dropped(name):
    """Models without a drop-path slot get forward hooks; each must zero its branch for dropped samples.

    HF attention modules return (output, weights): the hook has to drop the output, not pass the tuple on.
    """
    model = build(name)
    inputs = pixels(model, batch=8)
    report = pathsurgeon.add(model, 0.9, schedule="uniform", example_inputs=pixels(model))
    seen: dict[str, torch.Tensor] = {}
    for branch in report.branches:  # registered after pathsurgeon's hook: sees its result
        model.get_submodule(branch.target).register_forward_hook(
            lambda m, i, out, n=branch.target: seen.__setitem__(n, out[0] if isinstance(out, tuple) else out)
        )
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        model(**inputs)
    assert seen.keys() == {b.target for b in report.branches}
    for target in {b.target for b in report.branches if b.rate > 0}:  # SigLIP's head is kept at rate 0
        out = seen[target]
        assert bool((out.flatten(1) == 0).all(1).any()), target  # at rate 0.9, 8 samples: some are dropped


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=LAYERS_OF_5) if name in ("vit", "deit") else name
    for name in sorted(set(MODELS) - {"vit_mae"})
])
def test_skip_mode_equals_sample_mode(name):
    """Same masks, same numbers: mode 'skip' draws as 'sample' does (HF's dropout is 0 in these configs)."""
    needs_rate = name not in NO_NATIVE_DROP_PATH
    sample, skip = build(name, 0.0 if needs_rate else None), build(name, 0.0 if needs_rate else None)
    inputs = pixels(sample, batch=8)
    pathsurgeon.add(sample, 0.4, schedule="uniform", example_inputs=pixels(sample))
    report = pathsurgeon.add(skip, 0.4, schedule="uniform", mode="skip", example_inputs=pixels(skip))
    if name not in {"swin", "swinv2", "hiera"}:  # these compute some branches in full (report says why)
        assert report.fallbacks == []
    results = []
    for model in (sample, skip):
        model.train()
        torch.manual_seed(7)
        out = first_tensor(model(**inputs))
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


class MaskTape:
    """Uniform numbers for drop-path masks from a private generator; records (rate, shape) of each call."""

    def __init__(self, seed: int, real_rand):
        self.generator = torch.Generator().manual_seed(seed)
        self.real_rand = real_rand
        self.calls: list[tuple[float, tuple[int, ...]]] = []

    def uniform(self, shape, dtype, device, rate: float) -> torch.Tensor:
        self.calls.append((round(rate, 6), tuple(shape)))
        return self.real_rand(tuple(shape), generator=self.generator).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name", sorted(set(MODELS) - NO_NATIVE_DROP_PATH - {"poolformer"}))
def test_training_equals_hf_own_drop_path_under_the_same_masks(name, monkeypatch):
    """The oracle is HF's own model built with drop_path_rate: its XxxDropPath modules, call sites and rates.

    Both models draw their masks from one tape (HF's through ``torch.rand``, ours through
    ``pathsurgeon.droppath.drop_path``), so equal outputs and gradients mean the same branches are dropped
    at the same rates in the same order.
    """
    from pathsurgeon import droppath

    rate = 0.3
    native, model = build(name, rate), build(name, 0.0)
    model.load_state_dict(native.state_dict())
    pathsurgeon.add(model, rate, example_inputs=pixels(model))
    inputs = pixels(model, batch=8)
    real_rand = torch.rand

    def step(m, tape: MaskTape):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # other training-time randomness (DINOv3's RoPE jitter) from one state too
        out = first_tensor(m(**inputs))
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    hf_tape, our_tape = MaskTape(5, real_rand), MaskTape(5, real_rand)

    for module in native.modules():  # tell the tape which HF drop path is drawing
        if type(module).__name__.endswith("DropPath"):
            module.register_forward_pre_hook(lambda m, args: setattr(hf_tape, "rate", m.drop_prob))

    def hf_rand(*size, dtype=None, device=None, **kwargs):  # only HF's drop paths call torch.rand here
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return hf_tape.uniform(shape, dtype, device, rate=hf_tape.rate)

    def our_drop_path(x, rate=0.0, training=False, scale_by_keep=True, batch_axis=0, draw="bernoulli"):
        if rate == 0.0 or not training:
            return x
        keep = 1 - rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.floor(our_tape.uniform(shape, x.dtype, x.device, rate=rate) + keep)  # HF's formula
        return x.div(keep) * mask

    monkeypatch.setattr(torch, "rand", hf_rand)
    expected, expected_grads = step(native, hf_tape)
    monkeypatch.setattr(torch, "rand", real_rand)
    monkeypatch.setattr(droppath, "drop_path", our_drop_path)
    out, grads = step(model, our_tape)

    assert hf_tape.calls and our_tape.calls == hf_tape.calls
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=1e-6, rtol=1e-5)


def test_slots_on_windows_of_a_sample_mask_rows_as_hugging_face_does():
    """HF RF-DETR's DINOv2 puts an image's windows on the batch axis; its DropPath masks those rows."""
    # 2 x 2 patches in 2 x 2 windows: rows of (8, 2 tokens, 32) for 2 images, so a batch axis read from
    # shapes would wrongly be axis 1
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
                  num_windows=2, window_block_indexes=[0], out_indices=[2])
    torch.manual_seed(0)
    backbone, backbone_config = transformers_class("RfDetrDinov2Backbone"), transformers_class("RfDetrDinov2Config")
    native = backbone(backbone_config(**config, drop_path_rate=0.3)).eval()
    model = backbone(backbone_config(**config)).eval()
    model.load_state_dict(native.state_dict())
    inputs = pixels(model, batch=4)
    report = pathsurgeon.add(model, 0.3)
    assert report.rates_from == "transformers config" and {b.batch_axis for b in report.branches} == {0}
    outputs = []
    for m in (native, model):
        m.train()
        torch.manual_seed(9)
        with torch.no_grad():
            outputs.append(m(**inputs).feature_maps[0])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_drop_path_also_called_off_the_branch_is_held_at_zero_not_stacked():
    """HF CvT calls one DropPath on the attention branch and on the layer output (shortcut included)."""
    config = T.CvtConfig(embed_dim=[16, 32, 64], num_heads=[1, 2, 2], depth=[1, 2, 3],
                         drop_path_rate=[0.0, 0.1, 0.2])  # HF indexes its per-stage rates by stage
    model = T.CvtForImageClassification(config).eval()
    layout = module_layout(model)
    library = {n for n, m in model.named_modules() if type(m).__name__ == "CvtDropPath"}
    assert library
    report = pathsurgeon.add(model, 0.1)
    assert {b.mechanism for b in report.branches} == {"hook"} and len(report.branches) == 12
    held = {n for n, m in model.named_modules() if isinstance(m, pathsurgeon.DropPath)}
    assert held == library and all(model.get_submodule(n).rate == 0.0 for n in held)
    assert sum("held at rate 0" in s.reason for s in report.left_alone) == len(library)
    pathsurgeon.set_rate(model, 0.4)
    assert all(model.get_submodule(n).rate == 0.0 for n in held)  # set_rate leaves them at 0
    pathsurgeon.strip(model)
    assert module_layout(model) == layout and pathsurgeon_leftovers(model) == []


@pytest.mark.slow
@supported_from("transformers", "5.0", "SigLIP2 cannot be captured on 4.50 (a data-dependent guard)")
def test_default_inputs_for_token_id_and_pre_patchified_models():
    imagegpt = T.ImageGPTForImageClassification(T.ImageGPTConfig(n_layer=2, n_embd=32, n_head=2)).eval()
    assert pathsurgeon.add(imagegpt, 0.1).max_abs_diff == 0.0  # input_ids below its vocabulary
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_patches=16)
    siglip2 = T.Siglip2ForImageClassification(T.Siglip2Config(vision_config=vision)).eval()
    assert pathsurgeon.add(siglip2, 0.1).max_abs_diff == 0.0  # patches, their mask and a 4 x 4 grid
