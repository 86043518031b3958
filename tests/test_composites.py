"""Models inside models: every part gets its own library's drop path, its own schedule.

Ground truth is the library that built each part, asked directly: timm's ``create_model(name,
drop_path_rate=r)`` (features_only where segmentation_models_pytorch builds it so), a Hugging Face
sub-model built from its sub-config with ``drop_path_rate=r``. Tiny configs, random weights, no downloads.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import called_drop_paths, pathsurgeon_leftovers, supported_from

import pathsurgeon
from pathsurgeon import slots as slot_lib
from pathsurgeon.changes import record_of
from pathsurgeon.report import Branch, LeftAlone, partly_wrapped

RATE = 0.3

transformers = pytest.importorskip("transformers")
smp = pytest.importorskip("segmentation_models_pytorch")
open_clip = pytest.importorskip("open_clip")


def library_rates(model: torch.nn.Module, prefix: str) -> dict[str, float]:
    """{slot name in the composite: rate} of every drop-path module the library built (rate > 0)."""
    return {
        f"{prefix}.{name}": slot_lib.existing_rate(module)
        for name, module in model.named_modules()
        if slot_lib.is_drop_path_module(module) and slot_lib.existing_rate(module) > 0
    }


def timm_called_rates(name: str, rate: float, prefix: str, size: int) -> dict[str, float]:
    """{slot name in the composite: rate} of the drop paths a timm model built at ``rate`` calls (timm
    also builds drop paths in blocks without a shortcut that it never calls)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=rate)
    called = called_drop_paths(model, torch.randn(2, 3, size, size))
    return {f"{prefix}.{n}": r for n, r in called.items() if r > 0}


def branch_rates(branches) -> dict[str, float]:
    return {b.target: b.rate for b in branches if b.rate > 0}


def eval_outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    return out


def quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


# --- segmentation_models_pytorch: timm encoders at encoder.model -------------------------------------


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_b0"])
def smp_unet(request):
    torch.manual_seed(0)
    model = smp.Unet(f"tu-{request.param}", encoder_weights=None, decoder_channels=(16, 16, 16, 16, 16)).eval()
    return request.param, model


def test_smp_timm_encoder_gets_timms_own_rates_bitwise(smp_unet):
    name, model = smp_unet
    state = copy.deepcopy(model.state_dict())
    report = pathsurgeon.add(model, RATE, example_inputs=torch.randn(2, 3, 64, 64))
    try:
        # the plain model's slot names are the features_only model's for these families
        assert branch_rates(report.branches) == timm_called_rates(name, RATE, "encoder.model", 64)
        assert {b.part for b in report.branches} == {"encoder.model"}
        assert [(p.path, p.library, p.rates_from) for p in report.parts] == [
            ("encoder.model", "timm", "timm constructor")
        ]
        assert report.max_abs_diff == 0.0
        # set_rate re-rates the part with its library's numbers too
        pathsurgeon.set_rate(model, 0.2)
        assert branch_rates(pathsurgeon.find(model)) == timm_called_rates(name, 0.2, "encoder.model", 64)
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@supported_from("torch", "2.14", "smp Unet cannot be captured on torch 2.4 (torch.export's module-stack tracer fails)")
@pytest.mark.parametrize("name", ["dpn68", "dpn68b"])
def test_smp_dpn_encoder_slicing_its_stages_maps_branches_to_real_modules(name):
    # smp's DPN encoder runs ``self.features[a:b](x)``: torch.export names the temporary Sequential
    # ``features.slice(a, b, None)``; branches must land on the model's own blocks (features.conv2_1, ...)
    from segmentation_models_pytorch.encoders._dpn import DualPathBlock

    torch.manual_seed(0)
    model = smp.Unet(name, encoder_weights=None, encoder_depth=3, decoder_channels=(8, 8, 8)).eval()
    inputs = (torch.randn(2, 3, 32, 32),)
    state = copy.deepcopy(model.state_dict())
    before = eval_outputs(model, inputs)
    report = pathsurgeon.add(model, RATE, example_inputs=inputs)
    try:
        # the blocks depth 3 runs: the stages up to the third stage index of the encoder, each a
        # DualPathBlock with one residual add, ``x_s1 + out1``; out1 is c1x1_c1's output (b variant)
        # or a channel slice of c1x1_c's (whose rest joins the dense path, as timm RexNet's drop path
        # also covers the channels its block concatenates)
        features = model.encoder.features
        ran = list(features.named_children())[1: model.encoder._stage_idxs[1]]
        expected = {
            f"encoder.features.{block_name}": f"encoder.features.{block_name}.{'c1x1_c1' if block.b else 'c1x1_c'}"
            for block_name, block in ran
            if isinstance(block, DualPathBlock)
        }
        assert expected and {b.block: b.target for b in report.branches} == expected
        assert all(b.mechanism == "hook" for b in report.branches)
        assert [b.rate for b in report.branches] == torch.linspace(0, RATE, len(expected)).tolist()
        assert report.max_abs_diff == 0.0
        assert torch.equal(before, eval_outputs(model, inputs))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        # the hooks run: in training a sample of a wrapped block's branch is dropped now and then
        model.train()
        with torch.no_grad():
            outputs = {tuple(model(*inputs).flatten()[:4].tolist()) for _ in range(8)}
        model.eval()
        assert len(outputs) > 1
        model.load_state_dict(state)  # the training forwards moved the BatchNorm statistics
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
    assert torch.equal(before, eval_outputs(model, inputs))


# --- open_clip: a timm trunk at visual.trunk, its own text transformer -------------------------------


@pytest.fixture(scope="module")
def clip_with_timm_trunk():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = quiet(lambda: CLIP(
        64,
        vision_cfg={"timm_model_name": "test_vit", "timm_pool": "token", "timm_proj": None, "image_size": 160},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 3},
    )).eval()
    inputs = (torch.randn(2, 3, 160, 160), torch.randint(0, 100, (2, 8)))
    return model, inputs


def test_open_clip_trunk_gets_timms_rates_and_text_tower_is_left_alone(clip_with_timm_trunk):
    import timm

    model, inputs = clip_with_timm_trunk
    report = pathsurgeon.add(model, RATE, example_inputs=inputs)
    try:
        reference = library_rates(timm.create_model("test_vit", drop_path_rate=RATE), "visual.trunk")
        assert branch_rates(report.branches) == reference
        assert {b.part for b in report.branches} == {"visual.trunk"}
        text_blocks = {k.block for k in report.left_alone if k.block.startswith("transformer.")}
        assert text_blocks == {f"transformer.resblocks.{i}" for i in range(3)}
        assert all("include=['transformer.*']" in k.reason for k in report.left_alone
                   if k.block.startswith("transformer."))
        assert "visual.trunk (timm constructor)" in report.summary()
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


def test_include_brings_a_region_in_with_its_own_schedule(clip_with_timm_trunk):
    import timm

    model, inputs = clip_with_timm_trunk
    before = eval_outputs(model, inputs)
    config = pathsurgeon.DropPathConfig(RATE, include=["visual.trunk.*", "transformer.*"])
    report = pathsurgeon.add(model, config, example_inputs=inputs)
    try:
        trunk = [b for b in report.branches if b.part == "visual.trunk"]
        text = [b for b in report.branches if b.part == "transformer"]
        # the trunk's rates do not move when another part comes in
        reference = library_rates(timm.create_model("test_vit", drop_path_rate=RATE), "visual.trunk")
        assert branch_rates(trunk) == reference
        # the text tower: linear over its own three blocks, from 0, not continuing the trunk's schedule
        by_block = {b.block: b.rate for b in text}
        expected = torch.linspace(0, RATE, 3).tolist()
        assert [by_block[f"transformer.resblocks.{i}"] for i in range(3)] == expected
        assert [b.index for b in text if b.block == "transformer.resblocks.0"][0] == 0
        parts = report.to_dict()["parts"]
        assert [(p["path"], p["rates_from"]) for p in parts] == [
            ("visual.trunk", "timm constructor"), ("transformer", "linear over found units")
        ]
        assert sum(len(p["branches"]) for p in parts) == len(report.branches)
        assert "part transformer" in str(report)
    finally:
        pathsurgeon.strip(model)
    assert all(torch.equal(a, b) for a, b in zip(before, eval_outputs(model, inputs), strict=True))


# --- Hugging Face: backbone_config and vision_config / text_config -----------------------------------


def _dinov2_config(**extra):
    return transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False, **extra
    )


@pytest.fixture(scope="module")
def dpt_on_dinov2():
    torch.manual_seed(0)
    config = transformers.DPTConfig(backbone_config=_dinov2_config(), neck_hidden_sizes=[16, 16, 32, 32],
                                    fusion_hidden_size=16, hidden_size=32, is_hybrid=False, head_in_index=-1)
    return quiet(lambda: transformers.DPTForDepthEstimation(config)).eval()


@supported_from("transformers", "5.0", "on 4.50 the parts found and left alone differ")
def test_hf_backbone_config_part_gets_the_sub_configs_rates(dpt_on_dinov2):
    model = dpt_on_dinov2
    report = pathsurgeon.add(model, RATE, example_inputs=torch.randn(2, 3, 32, 32))
    try:
        # HF DINOv2 builds one constant rate (not 0 -> r) from its backbone_config's drop_path_rate
        sub_config = copy.deepcopy(model.config.backbone_config)
        sub_config.drop_path_rate = RATE
        reference = library_rates(quiet(lambda: transformers.Dinov2Backbone(sub_config)), "backbone")
        assert branch_rates(report.branches) == reference
        assert [(p.path, p.source, p.rates_from) for p in report.parts] == [
            ("backbone", "backbone_config", "transformers config"), ("neck", "region", "left alone")
        ]
        assert "left alone (no library drop path; include= brings them in): neck" in report.summary()
        neck = [k for k in report.left_alone if k.block.startswith("neck.")]
        assert neck and all("no library model" in k.reason or "not run by the example inputs" in k.reason
                            for k in neck)
    finally:
        pathsurgeon.strip(model)


def test_hf_convnext_backbone_in_upernet_bitwise():
    torch.manual_seed(0)
    backbone = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    model = quiet(lambda: transformers.UperNetForSemanticSegmentation(
        transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32)
    )).eval()
    report = pathsurgeon.add(model, RATE, example_inputs=torch.randn(2, 3, 64, 64))
    try:
        sub_config = copy.deepcopy(backbone)
        sub_config.drop_path_rate = RATE
        reference = library_rates(quiet(lambda: transformers.ConvNextBackbone(sub_config)), "backbone")
        assert branch_rates(report.branches) == reference
        assert report.parts[0].rates_from == "transformers config"
    finally:
        pathsurgeon.strip(model)


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                     "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return quiet(lambda: transformers.CLIPModel(config)).eval()


@supported_from("transformers", "5.0", "on 4.50 the towers get no rates from their configs")
def test_clip_towers_each_get_their_own_schedule(hf_clip):
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(2, 100, (2, 7))}
    report = pathsurgeon.add(hf_clip, RATE, example_inputs=inputs)
    try:
        vision = [b.rate for b in report.branches if b.part == "vision_model"]
        text = [b.rate for b in report.branches if b.part == "text_model"]
        # each tower from 0 to the rate over its own layers, two branches per layer
        assert vision == [r for r in torch.linspace(0, RATE, 3).tolist() for _ in range(2)]
        assert text == [r for r in torch.linspace(0, RATE, 2).tolist() for _ in range(2)]
        assert [(p.path, p.source) for p in report.parts] == [("vision_model", "vision_config"),
                                                             ("text_model", "text_config")]
        assert "2 parts" in report.summary() and "vision_model" in report.summary()
    finally:
        pathsurgeon.strip(hf_clip)


@pytest.mark.slow
def test_a_list_schedule_over_two_towers_survives_save_and_load(hf_clip, tmp_path):
    """set_rate's list is split over the parts; the record keeps all of it, so load replays it whole."""
    model = copy.deepcopy(hf_clip)
    pathsurgeon.add(model, RATE)
    schedule = [0.01, 0.02, 0.03, 0.04, 0.05]  # 3 vision layers, then 2 text layers
    rates = {b.target: b.rate for b in pathsurgeon.set_rate(model, None, schedule=schedule)}
    assert sorted(set(rates.values())) == schedule
    pathsurgeon.save(model, tmp_path / "clip")
    loaded = pathsurgeon.load(tmp_path / "clip")
    assert {b.target: b.rate for b in pathsurgeon.find(loaded)} == rates


# --- parts left alone by default, brought in by include= with their own schedule ----------------------


def _outputs_equal(a, b) -> bool:
    tensors = [(x, y) for x, y in zip(a.values(), b.values(), strict=True) if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(torch.equal(x, y) for x, y in tensors)


@pytest.mark.slow
@supported_from("transformers", "5.0", "LW-DETR and other configs it builds are missing from 4.50")
def test_default_inputs_are_at_the_image_size_of_the_backbone_config():
    """LW-DETR states its image size on its backbone's config only; its windows do not fit 224 pixels."""
    torch.manual_seed(0)
    backbone = transformers.LwDetrViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64, pretrain_image_size=64,
        patch_size=16, num_windows=16, window_block_indices=[0, 2], out_indices=[2, 4])
    config = transformers.LwDetrConfig(
        backbone_config=backbone, d_model=32, decoder_ffn_dim=64, decoder_layers=1, decoder_self_attention_heads=2,
        decoder_cross_attention_heads=2, num_queries=10, group_detr=1, projector_scale_factors=[1.0], c2f_num_blocks=1)
    model = quiet(lambda: transformers.LwDetrForObjectDetection(config)).eval()
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        model(torch.randn(1, 3, 224, 224))
    found = pathsurgeon.preview(model, RATE)  # made up at 64 pixels (was 224: ExampleInputsError)
    assert [(p.path, p.source, p.branches) for p in found.parts][0] == ("model.backbone.backbone", "backbone_config", 8)


@pytest.mark.slow
@supported_from("transformers", "5.0", "Grounding DINO cannot be captured on 4.50 (a data-dependent guard)")
def test_grounding_dino_default_inputs_run_its_text_backbone_too():
    """Grounding DINO takes an image and text, its image size on the backbone's config: both made up."""
    torch.manual_seed(0)
    swin = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                   image_size=64, out_indices=[2, 3, 4])
    text = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=100)
    config = transformers.GroundingDinoConfig(
        backbone_config=swin, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, max_text_len=16,
        fusion_ffn_dim=64, encoder_n_points=2, decoder_n_points=2)
    model = quiet(lambda: transformers.GroundingDinoForObjectDetection(config)).eval()
    found = pathsurgeon.preview(model, RATE)  # was: "forward() missing 1 required positional argument: 'input_ids'"
    parts = {p.path: (p.source, p.branches) for p in found.parts}
    assert parts["model.text_backbone"] == ("text_config", 4)
    assert parts["model.backbone.conv_encoder.model"] == ("backbone_config", 5)


@pytest.fixture(scope="module")
def hf_sam():
    torch.manual_seed(0)
    config = transformers.SamConfig(
        vision_config={"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "mlp_dim": 64, "image_size": 64, "patch_size": 16, "window_size": 2,
                       "global_attn_indexes": [1], "num_pos_feats": 8},
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 16, "mask_input_channels": 4,
                               "image_embedding_size": 4},
        mask_decoder_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_dim": 32,
                             "iou_head_hidden_dim": 16},
    )
    model = quiet(lambda: transformers.SamModel(config)).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64), "input_points": torch.rand(2, 1, 1, 2) * 64}
    return model, inputs


def _sam_decoder_residuals(model) -> dict[str, str]:
    """{hooked module: block} of the residual adds SamTwoWayTransformer's own code makes: per layer
    ``queries + self_attn`` (not in a layer built with ``skip_first_layer_pe``), ``queries +
    cross_attn_token_to_image``, ``queries + mlp``, ``keys + cross_attn_image_to_token``; then
    ``queries + final_attn_token_to_image``. (Its ``queries + query_point_embedding`` adds are no residuals.)"""
    transformer = model.mask_decoder.transformer
    expected = {}
    for index, layer in enumerate(transformer.layers):
        block = f"mask_decoder.transformer.layers.{index}"
        names = ([] if layer.skip_first_layer_pe else ["self_attn"]) + [
            "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token"]
        expected.update({f"{block}.{name}": block for name in names})
    expected["mask_decoder.transformer.final_attn_token_to_image"] = "mask_decoder.transformer"
    return expected


@pytest.mark.slow
@supported_from("transformers", "5.0", "Sam2HieraDetConfig is missing from 4.50")
def test_sam2_default_inputs_are_at_its_prompt_encoders_image_size():
    """SAM 2 keeps its image size on the prompt encoder's config, not the vision config's."""
    torch.manual_seed(0)
    backbone = transformers.Sam2HieraDetConfig(
        hidden_size=12, image_size=64, patch_stride=4, patch_kernel_size=7, patch_padding=3,
        blocks_per_stage=[1, 1, 1, 1], embed_dim_per_stage=[12, 24, 48, 96],
        num_attention_heads_per_stage=[1, 2, 4, 8])
    config = transformers.Sam2Config(
        vision_config=transformers.Sam2VisionConfig(
            backbone_config=backbone, backbone_channel_list=[96, 48, 24, 12],
            backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32),
        prompt_encoder_config={"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 8},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 4, "iou_head_hidden_dim": 32},
    )
    model = quiet(lambda: transformers.Sam2Model(config)).eval()
    found = pathsurgeon.preview(model, RATE)  # image and one point prompt, at 64 pixels (was 224: refused)
    assert [(p.path, p.source) for p in found.parts][0] == ("vision_encoder", "vision_config")
    assert {b.part for b in found} == {"vision_encoder"}  # the mask decoder: a region left alone
    mlps = {b.target for b in found if b.target.endswith(".mlp")}
    assert mlps == {f"vision_encoder.backbone.blocks.{i}.mlp" for i in range(4)}


@pytest.mark.slow
@supported_from("transformers", "5.0", "SAM cannot be captured on 4.50 (a data-dependent guard)")
def test_sam_mask_decoder_is_left_alone_by_default_and_include_brings_it_in_on_its_own_schedule(hf_sam):
    model, inputs = hf_sam
    before = eval_outputs(model, inputs)
    default = pathsurgeon.add(model, RATE, example_inputs=inputs)
    pathsurgeon.strip(model)
    assert {b.part for b in default.branches} == {"vision_encoder"}
    decoder = [k for k in default.left_alone if k.block.startswith("mask_decoder.")]
    assert {k.block for k in decoder} == set(_sam_decoder_residuals(model).values())
    # the hint goes with the adds include= brings in; the others say why they stay alone (issue 28, item 6)
    hinted = [k for k in decoder if "include=['mask_decoder.*'] brings it in" in k.reason]
    assert hinted and all("include=" not in k.reason for k in decoder if k not in hinted)
    assert ("mask_decoder", "region", "left alone") in [(p.path, p.source, p.rates_from) for p in default.parts]
    assert "left alone (no library drop path; include= brings them in): mask_decoder" in default.summary()

    config = pathsurgeon.DropPathConfig(RATE, include=["vision_encoder.*", "mask_decoder.*"])
    report = pathsurgeon.add(model, config, example_inputs=inputs)
    try:
        # the vision encoder's branches and rates do not move when the decoder comes in
        vision = [(b.target, b.rate) for b in report.branches if b.part == "vision_encoder"]
        assert vision == [(b.target, b.rate) for b in default.branches]
        # the decoder: exactly its residual branches, linear over its own blocks from 0 at index 0,
        # not continuing the vision encoder's schedule (which ends at the rate)
        decoder = [b for b in report.branches if b.part == "mask_decoder"]
        assert {b.target: b.block for b in decoder} == _sam_decoder_residuals(model)
        blocks = list(dict.fromkeys(b.block for b in decoder))
        ramp = dict(zip(blocks, torch.linspace(0, RATE, len(blocks)).tolist(), strict=True))
        assert all(b.rate == ramp[b.block] for b in decoder)
        assert decoder[0].index == 0 and decoder[0].rate == 0.0 and vision[-1][1] == pytest.approx(RATE)
        assert ("mask_decoder", "linear over found units") in [(p["path"], p["rates_from"])
                                                               for p in report.to_dict()["parts"]]
        assert report.max_abs_diff == 0.0
        # the two-way layers' positional-embedding adds look like residual adds; never hooked (a hook
        # on layer_norm1 would drop the whole token stream); after the first layer, where the queries
        # come from the previous layer, not taken for residual adds at all
        assert not any(b.target.endswith(("layer_norm1", "layer_norm3")) for b in report.branches)
        used_off = [k.block for k in report.left_alone if "also used off the residual branch" in k.reason]
        assert "mask_decoder.transformer.layers.0" in used_off
        assert "mask_decoder.transformer.layers.1" not in used_off
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
    assert _outputs_equal(before, eval_outputs(model, inputs))


@pytest.mark.slow
@supported_from("transformers", "5.0", "on 4.50 DETR's backbone part is found at another path")
def test_detr_encoder_is_left_alone_by_default_and_include_brings_it_in_on_its_own_schedule():
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_labels=3,
    )
    model = quiet(lambda: transformers.DetrForObjectDetection(config)).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64)}
    before = eval_outputs(model, inputs)
    default = pathsurgeon.add(model, RATE, example_inputs=inputs)
    pathsurgeon.strip(model)
    assert {b.part for b in default.branches} == {"model.backbone.model"}
    encoder = [k for k in default.left_alone if k.block.startswith("model.encoder.")]
    assert {f"model.encoder.layers.{i}" for i in range(config.encoder_layers)} <= {k.block for k in encoder}
    hinted = [k for k in encoder if "include=['model.encoder.*'] brings it in" in k.reason]
    assert hinted and all("include=" not in k.reason for k in encoder if k not in hinted)
    regions = [(p.path, p.rates_from) for p in default.parts if p.source == "region"]
    assert regions == [("model.encoder", "left alone"), ("model.decoder", "left alone")]

    report = pathsurgeon.add(model, pathsurgeon.DropPathConfig(RATE, include=["model.backbone.*", "model.encoder.*"]),
                             example_inputs=inputs)
    try:
        backbone_branches = [(b.target, b.rate) for b in report.branches if b.part == "model.backbone.model"]
        assert backbone_branches == [(b.target, b.rate) for b in default.branches]
        # one schedule per part: the encoder's layers from 0 to the rate over its own layers, not
        # chained from the backbone (whose last block is at the rate); the decoder stays left alone
        encoder = [b for b in report.branches if b.part == "model.encoder"]
        ramp = torch.linspace(0, RATE, config.encoder_layers).tolist()
        assert {b.block: b.rate for b in encoder} == {f"model.encoder.layers.{i}": r for i, r in enumerate(ramp)}
        assert {b.block: b.index for b in encoder} == {f"model.encoder.layers.{i}": i
                                                      for i in range(config.encoder_layers)}
        assert not any(b.part == "model.decoder" for b in report.branches)
        assert any("include=['model.decoder.*']" in k.reason for k in report.left_alone)
        # the attention modules add position embeddings to the hidden states earlier layers computed
        # from them: no residual add there, neither wrapped nor listed as left alone
        attention = ("self_attn", "encoder_attn")
        assert not [k.block for k in report.left_alone if k.block.endswith(attention)]
        assert not [b.block for b in report.branches if b.block.endswith(attention)]
        assert report.max_abs_diff == 0.0
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
    assert _outputs_equal(before, eval_outputs(model, inputs))


# --- a model that is itself a library model: as before ----------------------------------------------


def test_plain_library_model_is_one_part_and_reports_as_before():
    import timm

    model = timm.create_model("test_vit", drop_path_rate=0.0).eval()
    report = pathsurgeon.add(model, RATE, example_inputs=torch.randn(2, 3, 160, 160))
    try:
        assert [(p.path, p.source) for p in report.parts] == [("", "the model")]
        assert not report.composite
        assert report.summary().startswith(f"{len(report.branches)} branches in {len(report.blocks)} blocks; "
                                           "rates from timm constructor;")
        assert "part " not in str(report)
        assert branch_rates(report.branches) == {
            k[1:]: v for k, v in library_rates(timm.create_model("test_vit", drop_path_rate=RATE), "").items()
        }
    finally:
        pathsurgeon.strip(model)


def test_partly_wrapped_blocks_are_named():
    branches = [Branch("layers.0", 0, 0.1, "hook", "layers.0.mlp"),
                Branch("layers.1", 1, 0.2, "hook", "layers.1.mlp")]
    inline = "branch is computed inline in the block; no module to hook"
    left_alone = [LeftAlone("layers.0", inline),
                  LeftAlone("layers.0", "the library drops layers.0.drop (rate 0.1) off any residual branch; left"),
                  LeftAlone("head", inline)]
    assert partly_wrapped(branches, left_alone) == {"layers.0": 1}
    report = pathsurgeon.Report(branches, 0.0, "torch.fx", "auto", "linear", left_alone)
    assert "1 blocks only partly wrapped: layers.0 (1 left alone)" in report.summary()


# --- inputs ------------------------------------------------------------------------------------------


class _TwoInputs(torch.nn.Module):
    """A residual network whose forward takes an image and a second tensor made-up inputs lack."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())

    def forward(self, image, scale):
        x = self.stem(image) * scale
        return x + self.branch(x)


class _TwoInputsUntraceable(_TwoInputs):
    """As :class:`_TwoInputs`, with control flow on a shape: torch.fx cannot trace it, and torch.export
    fails on the missing argument, so the capture fails before any forward judges the inputs."""

    def forward(self, image, scale):
        if scale.shape[0] > 0:  # a Proxy to torch.fx, a number to torch.export
            image = image * 2
        return super().forward(image, scale)


@pytest.mark.parametrize("model_class", [_TwoInputs, _TwoInputsUntraceable])
def test_made_up_inputs_that_do_not_fit_say_to_pass_example_inputs(model_class):
    model = model_class().eval()
    state = copy.deepcopy(model.state_dict())
    # the capture fails, and the model refuses the made-up inputs when simply run: the inputs' fault
    with pytest.raises(pathsurgeon.ExampleInputsError, match="forward.. missing 1 required .*pass example_inputs="):
        pathsurgeon.add(model, RATE)
    assert pathsurgeon_leftovers(model) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    report = pathsurgeon.add(model, RATE, example_inputs=(torch.randn(2, 3, 16, 16), torch.ones(1)))
    assert [b.block for b in report.branches] == [""]
    pathsurgeon.strip(model)


def test_clip_default_inputs_run_both_towers(hf_clip):
    given = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(2, 100, (2, 5))}
    found = [(b.target, b.rate) for b in pathsurgeon.preview(hf_clip, RATE)]
    assert found == [(b.target, b.rate) for b in pathsurgeon.preview(hf_clip, RATE, example_inputs=given)]
    assert {t.split(".")[0] for t, _ in found} == {"vision_model", "text_model"}


@supported_from("transformers", "5.0", "SigLIP2 cannot be captured on 4.50 (a data-dependent guard)")
def test_siglip2_default_inputs_run_both_towers_on_patches():
    """SigLIP2 takes its images cut into patches (NaFlex) and text: both towers run without inputs."""
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = transformers.Siglip2Config(vision_config={**tower, "num_patches": 16},
                                        text_config={**tower, "vocab_size": 100})
    model = quiet(lambda: transformers.Siglip2Model(config)).eval()
    report = pathsurgeon.add(model, RATE)
    try:
        assert report.max_abs_diff == 0.0
        assert {(p.path, p.branches) for p in report.parts} == {("vision_model", 5), ("text_model", 4)}
        # each tower over its own depth: the head's residual kept at 0 by the SigLIP recipe
        rates = {b.target: b.rate for b in report.branches}
        last = torch.linspace(0, RATE, 2).tolist()[-1]  # linear over 2 layers, as timm writes it
        assert rates["vision_model.encoder.layers.1.mlp"] == rates["text_model.encoder.layers.1.mlp"] == last
        assert rates["vision_model.head.mlp"] == 0.0
    finally:
        pathsurgeon.strip(model)


def test_towers_of_a_model_no_library_knows_get_their_own_schedules():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = quiet(lambda: CLIP(
        16,
        vision_cfg={"layers": 3, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
    )).eval()
    report = pathsurgeon.add(model, RATE)  # default inputs: an image and text (both towers run)
    try:
        by_part: dict[str, list[float]] = {}
        for branch in report.branches:
            by_part.setdefault(branch.part, []).append(branch.rate)
        assert list(by_part) == ["visual", "transformer"]
        assert by_part["visual"] == [r for r in torch.linspace(0, RATE, 3).tolist() for _ in range(2)]
        assert by_part["transformer"] == [r for r in torch.linspace(0, RATE, 2).tolist() for _ in range(2)]
        assert [p.source for p in report.parts] == ["tower", "tower"]
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


class _Detector(torch.nn.Module):
    """A detection-style model: a timm feature extractor whose BatchNorms were frozen after the build
    (as HF DETR's backbones are), and a head."""

    def __init__(self):
        super().__init__()
        import timm
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.backbone = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
        for module in list(self.backbone.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(module, name, FrozenBatchNorm2d(child.num_features))
        self.head = torch.nn.Conv2d(512, 4, 1)

    def forward(self, x):
        return self.head(self.backbone(x)[-1])


def test_a_timm_backbone_with_frozen_batch_norms_still_gets_timms_rates():
    model = _Detector().eval()
    preview = pathsurgeon.preview(model, RATE, example_inputs=torch.randn(2, 3, 64, 64))
    assert preview.parts[0].rates_from == "timm constructor"
    assert branch_rates(preview) == timm_called_rates("resnet18", RATE, "backbone", 64)


# --- fx GraphModules: feature extractors and traced models keep their module names ---------------------


def _torchvision_rates(builder, rate: float) -> dict[str, float]:
    from torchvision.ops import StochasticDepth

    model = builder(stochastic_depth_prob=rate)
    return {n: m.p for n, m in model.named_modules() if isinstance(m, StochasticDepth)}


@pytest.mark.parametrize("last", ["features.7", "features.3"])
def test_torchvision_feature_extractor_gets_its_builders_rates(last):
    """Blocks come from the names the extractor keeps; the rates are torchvision's own, even for an
    extractor cut before the stage where convnext_tiny and convnext_small differ."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    extractor = create_feature_extractor(torchvision.models.convnext_tiny(), {last: "out"}).eval()
    report = pathsurgeon.add(extractor, RATE, example_inputs=torch.randn(1, 3, 64, 64))
    try:
        expected = _torchvision_rates(torchvision.models.convnext_tiny, RATE)
        assert {b.target: b.rate for b in report.branches} == {
            name: value for name, value in expected.items() if name in dict(extractor.named_modules())}
        assert len({b.block for b in report.branches}) == len(report.branches)
        assert report.rates_from == "torchvision builder"
    finally:
        pathsurgeon.strip(extractor)
    assert pathsurgeon_leftovers(extractor) == []


@pytest.mark.slow
def test_timm_fx_feature_net_and_traced_vit_get_timms_rates():
    import timm

    torch.manual_seed(0)
    features = timm.create_model("convnext_atto", features_only=True, feature_cls="fx").eval()
    report = pathsurgeon.add(features, RATE, example_inputs=torch.randn(1, 3, 64, 64))
    try:
        expected = timm_called_rates("convnext_atto", RATE, "graph_module", 64)
        assert branch_rates(report.branches) == expected
        # timm's own numbers, not a float32 line that happens to equal them: traced at a rate, timm's
        # DropPath is inlined and leaves no slot, so the replay used to fail ("the rebuilt model has no slot")
        assert report.rates_from == "timm constructor", report.rates_note
    finally:
        pathsurgeon.strip(features)
    traced = torch.fx.symbolic_trace(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3)).eval()
    report = pathsurgeon.add(traced, RATE, example_inputs=torch.randn(1, 3, 32, 32))
    try:
        built = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, drop_path_rate=RATE)
        expected = {n: r for n, r in called_drop_paths(built, torch.randn(2, 3, 32, 32)).items() if r > 0}
        assert branch_rates(report.branches) == expected
        # every residual, block 0's attention one included (its inlined LayerNorm was owned by the model,
        # not by blocks.0, so that add looked like an input of the block: 5 branches, not 6)
        assert [b.target for b in report.branches] == [f"blocks.{i}.drop_path{j}" for i in range(3) for j in (1, 2)]
    finally:
        pathsurgeon.strip(traced)


def test_timm_fx_resnet_hooked_branches_get_timms_rates_from_add_and_set_rate():
    """timm's ResNet keeps ``drop_path = None`` at rate 0, so its FeatureGraphNet traces no drop-path slot
    and every residual branch is hooked: each takes the rate of the one slot timm builds under its block,
    bitwise (was: a float32 line over the found units, 0.02857142873 where timm has 0.02857142857)."""
    import timm

    def by_block(rates: dict[str, float]) -> dict[str, float]:
        return {name.rpartition(".")[0]: value for name, value in rates.items()}

    def hooked_rates(branches) -> dict[str, float]:
        assert {b.mechanism for b in branches} == {"hook"}
        return {b.block: b.rate for b in branches if b.rate > 0}

    torch.manual_seed(0)
    features = timm.create_model("resnet18", features_only=True, feature_cls="fx", out_indices=(1, 2, 3, 4)).eval()
    x = torch.randn(1, 3, 64, 64)
    rate, other = 0.2, 0.37
    before = eval_outputs(features, (x,))
    expected = by_block(timm_called_rates("resnet18", rate, "graph_module", 64))
    assert len(expected) == 7  # every block but the first: timm's rate there is 0
    preview = pathsurgeon.preview(features, rate, example_inputs=x)
    assert hooked_rates(preview) == expected and preview.rates_from == "timm constructor"
    report = pathsurgeon.add(features, rate, example_inputs=x)
    try:
        assert hooked_rates(report.branches) == expected
        assert report.rates_from == "timm constructor", report.rates_note
        assert record_of(features).parts[0].block_slots["graph_module.layer1.1"] == "graph_module.layer1.1.drop_path"
        assert hooked_rates(pathsurgeon.set_rate(features, other)) == by_block(
            timm_called_rates("resnet18", other, "graph_module", 64))
        assert {b.block: b.rate for b in pathsurgeon.set_rate(features, rate)} == {
            b.block: b.rate for b in report.branches}
    finally:
        pathsurgeon.strip(features)
    assert pathsurgeon_leftovers(features) == []
    assert all(torch.equal(a, b) for a, b in zip(eval_outputs(features, (x,)), before, strict=True))


def test_hooked_branches_whose_block_holds_its_own_slot_keep_the_fallback():
    """timm's ResNeSt has a drop-path slot in every block, but off the residual branch (it drops the block
    input on its way into the shortcut): its hooked branches do not take that slot's rate; they keep the
    linear fallback, and the note says why."""
    import timm

    model = timm.create_model("resnest14d").eval()
    preview = pathsurgeon.preview(model, RATE, example_inputs=torch.randn(1, 3, 64, 64))
    assert {b.mechanism for b in preview} == {"hook"}
    assert preview.rates_from == "linear over found units"
    # why: on timm 1.0.31 "... pass through none of its drop-path slots"; timm 1.0.8's ResNeSt does not rebuild
    assert preview.rates_note  # says why the library was not used
    assert [b.rate for b in preview] == torch.linspace(0, RATE, len(preview)).tolist()


class _FlatResiduals(torch.nn.Module):
    """Residual adds written in the model's own forward: traced, every branch lies in the model itself."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.f3 = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        x = x + self.f1(x)
        x = x + self.f2(x)
        return x + self.f3(x)


def test_a_traced_model_whose_branches_lie_in_one_depth_unit_is_refused_not_given_zeros():
    """No library's rates are known and linear over one depth unit is 0 for every branch: refused in one
    line (was: "3 branches ... eval check passed" with every rate 0 at rate 0.3)."""
    traced = torch.fx.symbolic_trace(_FlatResiduals()).eval()
    x = torch.randn(2, 8)
    for call in (pathsurgeon.add, pathsurgeon.preview):
        with pytest.raises(pathsurgeon.PathSurgeonError, match=r"^all 3 residual branches of this fx GraphModule "
                                                               r"lie in one depth unit .*schedule='uniform'[^\n]*$"):
            call(traced, RATE, example_inputs=x)
    assert not pathsurgeon.is_surgered(traced) and pathsurgeon_leftovers(traced) == []
    report = pathsurgeon.add(traced, RATE, schedule="uniform", example_inputs=x)  # a way out that works
    assert [b.rate for b in report.branches] == [RATE] * 3
    pathsurgeon.strip(traced)


# --- captioning and vision-language models: the vision tower is a part, the language model is left alone --


def _captioner(encoder, decoder):
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    return quiet(lambda: transformers.VisionEncoderDecoderModel(config)).eval()


@pytest.fixture(scope="module")
def captioner():
    """ViT + GPT-2 at 32 pixels (made-up inputs at 224 do not run it)."""
    return _captioner(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8),
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=1,
                                eos_token_id=1))


def _swin_bert_captioner():
    return _captioner(
        transformers.SwinConfig(embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4, image_size=32,
                                patch_size=4),
        transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100))


@pytest.mark.slow
def test_the_text_decoder_of_a_captioner_is_left_alone_and_include_brings_it_in(captioner):
    """On made-up inputs (at the encoder's 32 pixels, with decoder ids): the ViT is a part, GPT-2 is not."""
    model = copy.deepcopy(captioner)
    report = pathsurgeon.add(model, RATE)  # was: ExampleInputsError (224-pixel images), and GPT-2 got hooks
    try:
        assert report.max_abs_diff == 0.0
        assert [(p.path, p.rates_from) for p in report.parts] == [("encoder", "linear over found units"),
                                                                 ("decoder", "left alone")]
        assert {b.part for b in report.branches} == {"encoder"}
        decoder = [k for k in report.left_alone if k.block.startswith("decoder.")]
        assert {k.block for k in decoder} == {"decoder.transformer.h.0", "decoder.transformer.h.1"}
        assert all("text decoder / language model" in k.reason and "include=['decoder.*'] brings it in" in k.reason
                   for k in decoder)
        assert "left alone (no library drop path; include= brings them in): decoder" in report.summary()
    finally:
        pathsurgeon.strip(model)
    report = pathsurgeon.add(model, pathsurgeon.DropPathConfig(RATE, include=["encoder.*", "decoder.*"]))
    try:
        assert {b.part for b in report.branches} == {"encoder", "decoder"}
        assert sorted({b.rate for b in report.branches if b.part == "decoder"}) == torch.linspace(0, RATE, 2).tolist()
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


def test_a_swin_bert_captioner_keeps_hf_swin_rates_and_leaves_bert_alone():
    model = _swin_bert_captioner()
    report = pathsurgeon.add(model, RATE)
    try:
        sub_config = copy.deepcopy(model.config.encoder)
        sub_config.drop_path_rate = RATE
        assert branch_rates(report.branches) == library_rates(quiet(lambda: transformers.SwinModel(sub_config)),
                                                              "encoder")
        assert [(p.path, p.rates_from) for p in report.parts] == [("encoder", "transformers config"),
                                                                 ("decoder", "left alone")]
    finally:
        pathsurgeon.strip(model)


@pytest.mark.slow
def test_a_captioner_given_inputs_without_use_cache_is_captured_without_its_cache(captioner):
    """torch.export cannot hold the EncoderDecoderCache GPT-2 returns: add passes use_cache=False itself."""
    model = copy.deepcopy(captioner)
    given = {"pixel_values": torch.randn(2, 3, 32, 32), "decoder_input_ids": torch.randint(2, 100, (2, 5))}
    report = pathsurgeon.add(model, RATE, example_inputs=given)  # was: CaptureError (... not a known type)
    assert report.max_abs_diff == 0.0 and {b.part for b in report.branches} == {"encoder"}
    pathsurgeon.strip(model)


@pytest.fixture(scope="module")
def llava():
    """A Llava-like vision-language model: a CLIP vision tower and a Llama language model; made-up inputs
    cannot run it (its text must hold one image token per image feature)."""
    from pathsurgeon.versions import installed

    if (installed("torch") or ()) < (2, 14):
        pytest.skip("tested from torch 2.14; older: Llava cannot be captured on torch 2.4 (torch.export's "
                    "module-stack tracer fails)")
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                    intermediate_size=64, vocab_size=100)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=99,
                                      vision_feature_layer=-1)
    model = quiet(lambda: transformers.LlavaForConditionalGeneration(config)).eval()
    ids = torch.randint(2, 90, (2, 20))
    ids[:, 1:17] = 99  # 16 patches of 8 pixels in a 32-pixel image
    return model, {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids}


@pytest.mark.slow
def test_the_language_model_of_a_llava_is_left_alone_and_include_brings_it_in(llava):
    model, inputs = llava
    model = copy.deepcopy(model)
    report = pathsurgeon.add(model, RATE, example_inputs=inputs)  # no use_cache: passed by add itself
    try:
        assert [(p.path, p.rates_from) for p in report.parts] == [
            ("model.vision_tower", "linear over found units"), ("model.language_model", "left alone")]
        assert {b.part for b in report.branches} == {"model.vision_tower"}
        assert any("include=['model.language_model.*'] brings it in" in k.reason for k in report.left_alone)
    finally:
        pathsurgeon.strip(model)
    report = pathsurgeon.add(model, pathsurgeon.DropPathConfig(RATE, include=["model.language_model.*"]),
                             example_inputs=inputs)
    try:
        assert {b.part for b in report.branches} == {"model.language_model"}
        assert "left alone (" not in report.summary()  # the vision tower is left out by include=, not libraryless
    finally:
        pathsurgeon.strip(model)


@pytest.mark.slow
def test_a_model_added_on_example_inputs_saves_and_loads_with_them(llava, tmp_path):
    """The manifest records that add ran on the caller's inputs; load takes them and re-adds on them."""
    import json

    model, inputs = llava
    model = copy.deepcopy(model)
    report = pathsurgeon.add(model, RATE, example_inputs=inputs)
    pathsurgeon.save(model, tmp_path / "llava")
    assert json.loads((tmp_path / "llava" / "pathsurgeon.json").read_text())["surgery"]["inputs"] == "given"
    with pytest.raises(pathsurgeon.ExampleInputsError, match=r"pass pathsurgeon.load\(directory, example_inputs="):
        pathsurgeon.load(tmp_path / "llava")  # the inputs pathsurgeon makes up do not run it
    loaded = pathsurgeon.load(tmp_path / "llava", example_inputs=inputs)
    assert {b.target: b.rate for b in pathsurgeon.find(loaded)} == {b.target: b.rate for b in report.branches}


@pytest.mark.slow
def test_the_inputs_hint_shows_the_keywords_a_dict_input_model_takes(llava):
    model, _ = llava
    with pytest.raises(pathsurgeon.ExampleInputsError,
                       match=r"example_inputs=\{'pixel_values': torch.randn\(2, C, H, W\), 'input_ids': "):
        pathsurgeon.add(model, RATE)
    assert pathsurgeon_leftovers(model) == []


# --- rates a library would not build, hints that do not hold --------------------------------------------


@supported_from("transformers", "5.0", "4.x Swin names its MLP layers otherwise (no fc1 / fc2 for LoRA to target)")
def test_lora_first_then_add_on_an_hf_swin_gets_hfs_own_floats():
    """PEFT's LoRA layers rename the weights (fc1.base_layer.weight): the library is asked through them."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.SwinConfig(embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4, image_size=32,
                                     patch_size=4)
    model = peft.get_peft_model(quiet(lambda: transformers.SwinForImageClassification(config)),
                                peft.LoraConfig(r=4, target_modules=["fc1", "fc2"])).eval()
    report = pathsurgeon.add(model, RATE, example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)})
    try:
        built = copy.deepcopy(config)
        built.drop_path_rate = RATE
        expected = library_rates(quiet(lambda: transformers.SwinForImageClassification(built)), "base_model.model")
        assert branch_rates(report.branches) == expected  # 0.15, not 0.15000000596 (float32 linspace)
        assert report.parts[0].rates_from == "transformers config"
    finally:
        pathsurgeon.strip(model)


@pytest.mark.slow
def test_upernet_names_no_include_hint_that_brings_in_nothing():
    torch.manual_seed(0)
    backbone = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                       image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"])
    model = quiet(lambda: transformers.UperNetForSemanticSegmentation(
        transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=64))).eval()
    report = pathsurgeon.add(model, RATE, example_inputs=torch.randn(2, 3, 64, 64))
    pathsurgeon.strip(model)
    # the head's FPN sums are computed inline: no include= brings them in, so none is offered
    head = [k for k in report.left_alone if k.block.startswith("decode_head")]
    assert head and all("brings it in" not in k.reason for k in head)
    assert "include=" not in str(report.to_dict()) and "decode_head" not in report.summary()


# --- torchvision detectors: captured part by part -----------------------------------------------------


def _detections(model: torch.nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for output in model(images) for t in output.values()]


@pytest.mark.slow
@pytest.mark.parametrize("builder, alone", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", ["backbone.fpn", "rpn", "roi_heads", "transform"]),
    ("retinanet_resnet50_fpn", ["backbone.fpn", "anchor_generator", "head", "transform"]),
])
def test_torchvision_detector_gets_drop_path_in_its_backbone_body(builder, alone, capfd):
    """A detector cannot be captured whole (box handling is data-dependent): its backbone body is
    surgered on its own, linear over its found units (torchvision builds no drop path there), the rest is
    left alone; the detector's eval outputs stay bitwise equal; strip restores everything; none of
    torch.export's partial graphs or debug lines is printed."""
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = getattr(detection, builder)(weights=None, weights_backbone=None, min_size=64, max_size=64).eval()
    pristine = copy.deepcopy(model)
    images = [torch.rand(3, 64, 64), torch.rand(3, 72, 64)]
    before = _detections(model, images)

    report = pathsurgeon.add(model, 0.1)

    printed = capfd.readouterr()
    assert "def forward" not in printed.out + printed.err and "torch.__trace" not in printed.out + printed.err
    assert [p.path for p in report.parts] == ["backbone.body"]
    assert report.branches and all(b.block.startswith("backbone.body.") for b in report.branches)
    rates = [b.rate for b in report.branches]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert report.rates_from == "linear over found units" and "backbone.body:" in report.rates_note
    assert set(alone) <= {k.block for k in report.left_alone}
    assert report.max_abs_diff == 0.0
    assert pathsurgeon.is_surgered(model)
    after = _detections(model, images)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    model.train()
    model.backbone.body(torch.rand(2, 3, 64, 64))  # the hooks run in training
    model.eval()

    pathsurgeon.strip(model)
    assert not pathsurgeon.is_surgered(model) and pathsurgeon_leftovers(model) == []
    stripped = _detections(model, images)
    assert all(torch.equal(a, b) for a, b in zip(before, stripped, strict=True))
    assert str(model) == str(pristine)


def _small_detector(builder: str) -> torch.nn.Module:
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    return getattr(detection, builder)(weights=None, weights_backbone=None, min_size=64, max_size=64).eval()


def test_find_preview_and_set_rate_work_on_a_whole_detector():
    """The calls after add take the detector as add did: part by part (its backbone.body)."""
    model = _small_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    before = pathsurgeon.find(model)  # was: CaptureError (the detector cannot be captured whole)
    assert before and {b.rate for b in before} == {0.0} and all(b.block.startswith("backbone.body.") for b in before)
    preview = pathsurgeon.preview(model, 0.1)  # was: CaptureError
    assert [(p.path, p.library, p.source, p.rates_from) for p in preview.parts] == [
        ("backbone.body", "torchvision", "detection backbone", "linear over found units")]
    assert not pathsurgeon.is_surgered(model)

    report = pathsurgeon.add(model, 0.1)
    try:
        assert [(b.target, b.rate) for b in report.branches] == [(b.target, b.rate) for b in preview]
        assert [(b.target, b.rate) for b in pathsurgeon.find(model)] == [(b.target, b.rate) for b in preview]
        units = list(dict.fromkeys(b.unit for b in report.branches))
        rerated = pathsurgeon.set_rate(model, 0.2)  # was: "call set_rate on model.backbone.body"
        body = pathsurgeon.preview(model.backbone.body, 0.2, example_inputs=torch.randn(2, 3, 64, 64))
        assert [b.rate for b in rerated] == [b.rate for b in body]
        assert rerated[-1].rate == pytest.approx(0.2) and rerated[0].block.startswith("backbone.body.")
        schedule = [round(0.01 * i, 2) for i in range(len(units))]
        rerated = pathsurgeon.set_rate(model, None, schedule=schedule)
        assert [b.rate for b in rerated] == [schedule[units.index(b.unit)] for b in report.branches]
        from pathsurgeon.changes import RECORD_ATTRIBUTE

        live = {f"backbone.body.{c.target}": c.drop.rate for c in vars(model.backbone.body)[RECORD_ATTRIBUTE].changes}
        assert live == {b.target: b.rate for b in rerated}
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


def test_saving_a_detector_is_refused_in_one_line_and_its_state_dict_keys_are_unchanged(tmp_path):
    """pathsurgeon.load cannot rebuild a detector (no torchvision classification builder makes it), so
    save refuses before writing anything, and says what to save instead."""
    model = _small_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    keys = list(model.state_dict())
    pathsurgeon.add(model, 0.1)
    with pytest.raises(pathsurgeon.PathSurgeonError) as caught:
        pathsurgeon.save(model, tmp_path / "detector")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot save FasterRCNN: ")  # was: "save model.backbone.body"
    assert "save model.state_dict()" in message and "add again after loading" in message
    assert not (tmp_path / "detector").exists()
    assert list(model.state_dict()) == keys
    pathsurgeon.strip(model)


def test_mask_rcnn_gets_drop_path_in_its_backbone_body_and_keeps_its_masks():
    """A small Mask R-CNN (torchvision's MaskRCNN class on its MobileNetV3 FPN backbone)."""
    detection = pytest.importorskip("torchvision.models.detection")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    torch.manual_seed(0)
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = detection.MaskRCNN(backbone, num_classes=3, min_size=64, max_size=64, rpn_anchor_generator=anchors).eval()
    images = [torch.rand(3, 64, 64)]
    before = _detections(model, images)
    report = pathsurgeon.add(model, 0.1)
    try:
        assert [p.path for p in report.parts] == ["backbone.body"] and report.max_abs_diff == 0.0
        assert len({b.block for b in report.branches}) == 10  # MobileNetV3-Large's residual blocks
        assert {"roi_heads", "rpn", "backbone.fpn"} <= {k.block for k in report.left_alone}
        assert all(torch.equal(a, b) for a, b in zip(before, _detections(model, images), strict=True))
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []


def test_ssdlite_gets_drop_path_in_its_mobilenet_feature_extractor():
    """SSDlite's backbone is no IntermediateLayerGetter but torchvision's own MobileNetV3 feature extractor:
    surgered on its own at the 320 pixels SSDlite fixes (was: CaptureError on the whole detector)."""
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 64, 64)]
    before = _detections(model, images)
    report = pathsurgeon.add(model, 0.1)
    try:
        assert [(p.path, p.library, p.source) for p in report.parts] == [
            ("backbone", "torchvision", "detection backbone")]
        assert report.max_abs_diff == 0.0 and report.branches[-1].rate == pytest.approx(0.1)
        assert all(torch.equal(a, b) for a, b in zip(before, _detections(model, images), strict=True))
    finally:
        pathsurgeon.strip(model)
    assert pathsurgeon_leftovers(model) == []
