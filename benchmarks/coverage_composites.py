"""Composites sweep: does every part of a composite get exactly what its own library builds?

Not a test. For every open_clip model config with a timm trunk, every segmentation_models_pytorch
encoder (its own, and ``tu-NAME`` for one timm model per timm family) and every Hugging Face class in
transformers' vision auto-mappings whose config holds a sub-config, it builds the composite on the
meta device (no weights, no downloads; Hugging Face configs at their defaults with every
``image_size`` cut to 64 pixels and ``num_hidden_layers`` to at most 6), asks
:func:`pathsurgeon.preview` for the rates ``add`` would give at rate R, and compares each part's
rates with the part's library built directly at R:

- a timm part: ``timm.create_model(architecture, drop_path_rate=R)`` (``features_only=True`` with the
  part's ``out_indices`` for a feature extractor), the drop-path modules a training forward calls with a
  rate > 0, judged as ``coverage.py`` judges them (a called one pathsurgeon lacks whose output is not
  added to a shortcut: "not residual"; none on a residual branch and pathsurgeon's hooks instead:
  timm ResNeSt, "placement differs by design");
- a Hugging Face part: its class built from its own sub-config with ``drop_path_rate=R``;
- a part whose library has no drop path: pathsurgeon's rates must be linear over the part's own
  depth units (``torch.linspace(0, R, n)``), starting again at 0 in every part.

Three sources are built from small fixed lists rather than a library's registry, on the CPU (they need
real tensors), each part compared the same way:

- ``torchvision-detection``: every builder in ``torchvision.models.detection`` with ``weights=None,
  weights_backbone=None`` and images of 64 pixels (``min_size=max_size=64``; SSD at its own 300 / 320).
  A detector cannot be captured whole; ``add`` surgers its backbone body (and any library backbone)
  on its own. torchvision builds no drop path into a detection backbone (its ResNet, MobileNetV3 and
  VGG classes take no ``stochastic_depth_prob``): linear over the body's own depth;
- ``fx``: fx feature extractors, which keep the traced model's module names: torchvision's
  ``create_feature_extractor`` on convnext_tiny, swin_t, efficientnet_b0 and resnet18 (reference: the
  builder at ``stochastic_depth_prob=R``, its ``StochasticDepth`` rates on the modules the extractor
  keeps), timm's ``features_only=True, feature_cls='fx'`` (``FeatureGraphNet``) on a few timm models
  (reference: as any timm part), and ``torch.fx.symbolic_trace`` of a timm ViT; inputs of 64 pixels;
- ``vision-language``: VisionEncoderDecoder (ViT + GPT-2, Swin + BERT) and Llava (CLIP + Llama) and
  PaliGemma (SigLIP + Gemma), from small configs, on inputs given as a user would (Llava's and
  PaliGemma's text must hold one image token per image feature). The vision tower is compared as any
  Hugging Face part; the text decoder / language model must be *left alone*.

A row *agrees* when every part does, bitwise. Where the meta device cannot run a composite, it is built
again on the CPU (and a Hugging Face config cut one way at a time, see :func:`check`). Rows are JSON lines in
``benchmarks/coverage_results/composites.jsonl``; ``--write-doc`` writes docs/coverage-composites.md.

    nice -n 10 .venv/bin/python benchmarks/coverage_composites.py --budget 900 --row-timeout 60
    .venv/bin/python benchmarks/coverage_composites.py --source smp --only "dpn*" --redo error   # a re-check
    .venv/bin/python benchmarks/coverage_composites.py --write-doc
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fnmatch
import gc
import itertools
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

RATE = 0.2
PLACEMENT_BY_DESIGN = "placement differs by design"
STATUSES = ("agrees", "not residual", PLACEMENT_BY_DESIGN, "differs", "no branches", "needs example_inputs",
            "cannot build", "error", "timeout")
STATUS_NOTES = (
    "- **agrees**: every part has exactly its library's rates, bitwise, on the same sites (a part whose "
    "library has no drop path: linear over its own depth, from 0).",
    "- **not residual**: as *agrees* on the residual branches; the part's library also drops sites that "
    "are not residual branches (a strided block's whole output, concatenated features), which "
    "pathsurgeon leaves alone, as in the main sweep.",
    "- **placement differs by design**: timm ResNeSt drops the block input on its way into the "
    "downsampling shortcut; pathsurgeon hooks the residual branches instead (docs/guide/reliability.md, Known limits).",
    "- **needs example_inputs**: the model does not run on the inputs pathsurgeon makes up from its config "
    "(text or task inputs it cannot guess, a size its heads reject); `add` says so with an "
    "`ExampleInputsError` and leaves the model as it was.",
    "- **cannot build**: the composite's own library fails to build it (smp: mostly \"Unsupported model "
    "downsampling pattern\", a `tu-` encoder with no feature pyramid it can use; Hugging Face: a default "
    "config that does not build); pathsurgeon never sees a model.",
    "- **differs**: some part's rates or sites are not its library's. None does since 0babf21: the fx row "
    "`timm:resnet18` (`FeatureGraphNet`) differed before it (timm leaves a ResNet block's `drop_path` `None` at "
    "rate 0, so the traced graph keeps no slot there and pathsurgeon hooked those blocks at float32 "
    "`torch.linspace` rates, 0.02857142873 against timm's 0.02857142857); a hooked branch now takes the rate of "
    "the one drop-path slot its library builds under its block.",
    "- **left alone** (a part): a text decoder or language model (vision-language rows), a part no library "
    "gives drop path by default; a vision-language row whose language model is not left alone differs.",
    "- A row whose note says *built on the cpu* ran on real tensors: on the meta device the model calls "
    "`.item()` or has data-dependent shapes that neither torch.fx nor torch.export gets through; *cut by "
    "... only*: the model does not build or run with both cuts (DPT's heads read fixed layer indices, "
    "SAM's prompt encoder has a fixed embedding size).",
)
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "coverage_results" / "composites.jsonl"
DOC = ROOT / "docs" / "coverage-composites.md"
SOURCES = ("open_clip", "smp", "transformers", "torchvision-detection", "fx", "vision-language")
BUILT_HERE = ("torchvision-detection", "fx", "vision-language")  # small fixed lists, built on the CPU
FX_TORCHVISION = ("convnext_tiny", "swin_t", "efficientnet_b0", "resnet18")
FX_TIMM = ("convnext_atto", "resnet18", "efficientnet_b0", "regnety_002")
VISION_LANGUAGE = ("ved:vit-gpt2", "ved:swin-bert", "llava:clip-llama", "paligemma:siglip-gemma")
LANGUAGE_MODELS = {"ved:vit-gpt2": "decoder", "ved:swin-bert": "decoder", "llava:clip-llama": "model.language_model",
                   "paligemma:siglip-gemma": "model.language_model"}
HF_MAPPINGS = (
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_MASK_GENERATION_MAPPING_NAMES", "MODEL_FOR_KEYPOINT_DETECTION_MAPPING_NAMES",
)


class RowTimeout(Exception):
    pass


# --- what to build -----------------------------------------------------------------------------------


def open_clip_names() -> list[str]:
    import open_clip

    names = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name) or {}
        if (config.get("vision_cfg") or {}).get("timm_model_name"):
            names.append(name)
    return sorted(names)


def smp_names() -> list[str]:
    import segmentation_models_pytorch as smp
    import timm
    from timm.models._registry import _model_to_module, get_arch_name

    own = sorted(smp.encoders.get_encoder_names())
    families: dict[str, str] = {}
    for name in timm.list_models():  # one timm model per family (module), the first by name
        families.setdefault(_model_to_module.get(get_arch_name(name), name), name)
    return own + [f"tu-{name}" for name in sorted(families.values())]


def transformers_names() -> list[str]:
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    names: set[str] = set()
    for mapping_name in HF_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, {})
        for key, classes in mapping.items():
            config_name = configuration_auto.CONFIG_MAPPING_NAMES.get(key)
            config_class = getattr(transformers, config_name, None) if config_name else None
            if config_class is None:
                continue
            holds = bool(getattr(config_class, "sub_configs", None)) or "backbone_config" in getattr(
                config_class.__init__, "__code__", type("", (), {"co_varnames": ()})
            ).co_varnames
            if not holds:
                continue
            for cls in classes if isinstance(classes, tuple) else (classes,):
                names.add(f"{key}:{cls}")
    return sorted(names)


def detection_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def fx_names() -> list[str]:
    return ([f"torchvision:{n}" for n in FX_TORCHVISION] + [f"timm:{n}" for n in FX_TIMM]
            + ["timm-traced:vit_tiny_patch16_224"])


def vision_language_names() -> list[str]:
    return list(VISION_LANGUAGE)


SMALL_DETECTION = 64


def build_here(source: str, name: str):
    """(model, example_inputs or None) of the sources built from fixed lists."""
    import torch

    torch.manual_seed(0)
    if source == "torchvision-detection":
        from torchvision.models import detection

        # SSD fixes its own size (300, 320 pixels) and takes none
        size = {} if name.startswith("ssd") else {"min_size": SMALL_DETECTION, "max_size": SMALL_DETECTION}
        return getattr(detection, name)(weights=None, weights_backbone=None, **size).eval(), None
    image = torch.randn(2, 3, SMALL_DETECTION, SMALL_DETECTION)
    if source == "fx":
        library, model_name = name.split(":")
        if library == "torchvision":
            import torchvision
            from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

            model = torchvision.models.get_model(model_name)
            last = [n for n in get_graph_node_names(model)[1] if n.startswith("features.") or n.startswith("layer")]
            outputs = {"features.3": "c3", "features.5": "c4"} if "features.5" in str(last) else {
                "layer2": "c3", "layer4": "c5"}
            return create_feature_extractor(model, outputs).eval(), image
        import timm

        if library == "timm":
            return timm.create_model(model_name, features_only=True, feature_cls="fx").eval(), image
        traced = timm.create_model(model_name, img_size=SMALL_DETECTION, depth=4)
        return torch.fx.symbolic_trace(traced).eval(), image
    return _vision_language(name)


def _vision_language(name: str):
    import torch
    import transformers

    images = torch.randn(2, 3, 32, 32)
    if name.startswith("ved:"):
        if name == "ved:vit-gpt2":
            encoder = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                             intermediate_size=64, image_size=32, patch_size=8)
            decoder = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
        else:
            encoder = transformers.SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4,
                                              image_size=32, patch_size=4)
            decoder = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, vocab_size=100)
        config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id, config.pad_token_id = 1, 0
        return transformers.VisionEncoderDecoderModel(config).eval(), None  # made-up inputs run it
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=64, vocab_size=100)
    ids = torch.randint(2, 90, (2, 20))
    ids[:, 1:17] = 99  # 16 patches of 8 pixels in a 32-pixel image: one image token each
    if name == "llava:clip-llama":
        vision = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8)
        config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**text),
                                          image_token_index=99, vision_feature_layer=-1)
        model = transformers.LlavaForConditionalGeneration(config)
    else:
        vision = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32, patch_size=8,
                                                 projection_dim=32)
        config = transformers.PaliGemmaConfig(vision_config=vision, text_config=transformers.GemmaConfig(
            **text, head_dim=16), image_token_index=99, projection_dim=32)
        model = transformers.PaliGemmaForConditionalGeneration(config)
    return model.eval(), {"pixel_values": images, "input_ids": ids}


def build(source: str, name: str, device: str = "meta", cut: tuple[str, ...] = ("size", "layers")):
    import torch

    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        if source == "open_clip":
            import open_clip

            return open_clip.create_model(name, pretrained=None, device=device)
        if source == "smp":
            import segmentation_models_pytorch as smp

            return smp.Unet(name, encoder_weights=None)
        import transformers
        from transformers.models.auto import configuration_auto

        key, class_name = name.split(":")
        config = getattr(transformers, configuration_auto.CONFIG_MAPPING_NAMES[key])()
        _small_images(config, set(), cut)
        return getattr(transformers, class_name)(config)


SMALL_IMAGE = 64
FEW_LAYERS = 6


def _small_images(config, seen: set[int], cut: tuple[str, ...] = ("size", "layers")) -> None:
    """Every (sub-)config's ``image_size`` down to 64 pixels (``"size"`` in ``cut``) and
    ``num_hidden_layers`` to at most 6 (``"layers"``): capturing a default-size model (SAM's 1024
    pixels, ALIGN's EfficientNet-B7 and BERT) takes minutes on the shared machine. The reference is
    built from the same cut config, so the comparison holds; per-stage ``depths`` lists are kept. Some
    models do not run cut (DPT's heads read fixed layer indices, SAM's prompt encoder a fixed
    embedding size): :func:`check` then tries one cut at a time."""
    import transformers

    if id(config) in seen:
        return
    seen.add(id(config))
    size = getattr(config, "image_size", None)
    if "size" in cut and isinstance(size, int) and size > SMALL_IMAGE:
        with contextlib.suppress(Exception):
            config.image_size = SMALL_IMAGE
    layers = getattr(config, "num_hidden_layers", None)
    if "layers" in cut and isinstance(layers, int) and layers > FEW_LAYERS:
        with contextlib.suppress(Exception):
            config.num_hidden_layers = FEW_LAYERS
    for value in vars(config).values():
        if isinstance(value, transformers.PretrainedConfig):
            _small_images(value, seen, cut)


# --- the library's own rates for a part ------------------------------------------------------------------


def drop_rates(model, prefix: str) -> dict[str, float]:
    from pathsurgeon import slots as slot_lib

    return {
        (f"{prefix}.{n}" if prefix else n): slot_lib.existing_rate(m)
        for n, m in model.named_modules()
        if slot_lib.is_drop_path_module(m) and slot_lib.existing_rate(m) > 0
    }


def library_reference(model, part, builder: str | None = None) -> tuple[dict[str, float] | None, str, dict[str, str]]:
    """(rates the part's library builds at RATE, by slot name; how built; what each slot's output goes
    into, where known). None: its library has no drop path.

    A timm part counts, like the main sweep (``coverage.py``), the drop-path modules a training
    forward *calls* with a rate > 0 and, of those, the ones whose output is added to a shortcut: timm
    builds a drop path in a stage's first block even where that block has no shortcut and never calls
    it (``if self.has_skip``), and a few families drop what is not a residual branch."""
    import timm
    import torch

    module = model.get_submodule(part.path) if part.path else model
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        if part.library == "timm":
            architecture = module.pretrained_cfg["architecture"]
            kwargs = {}
            info = getattr(module, "feature_info", None)
            if hasattr(info, "out_indices") and not hasattr(module, "num_classes"):
                kwargs = {"features_only": True, "out_indices": tuple(info.out_indices)}
                deepest = max(info.reduction())
                if deepest < 32:
                    kwargs["output_stride"] = deepest
            try:
                built = timm.create_model(architecture, drop_path_rate=RATE, **kwargs)
            except TypeError as error:
                if "drop_path_rate" not in str(error):
                    raise
                return None, f"timm's {architecture} takes no drop_path_rate", {}
            how = f"timm.create_model({architecture!r}, drop_path_rate={RATE}, ...), the drop paths it calls"
            called, kinds = _called_residual(built, part.path)
            return called, how, kinds
        if part.library == "transformers":
            config = copy.deepcopy(module.config)
            if not isinstance(getattr(config, "drop_path_rate", None), (int, float)):
                return None, f"{type(config).__name__} has no drop_path_rate", {}
            config.drop_path_rate = RATE
            built = type(module)(config)
            return drop_rates(built, part.path), f"{type(module).__name__}(config, drop_path_rate={RATE})", {}
        if part.library == "torchvision":
            return _torchvision_reference(module, part.path, builder)
    return None, "no library", {}


def _torchvision_reference(module, prefix: str, builder: str | None) -> tuple[dict[str, float] | None, str,
                                                                            dict[str, str]]:
    """A torchvision part: an fx feature extractor's builder (the row's) at ``stochastic_depth_prob=RATE``,
    the ``StochasticDepth`` rates on the modules the extractor keeps; None where the builder takes no
    rate (resnet18) or the part is a detection backbone body (the ResNet, MobileNetV3 and VGG classes
    torchvision builds them from take no rate)."""
    import inspect

    import torchvision
    from torchvision.ops import StochasticDepth

    if builder is None:
        return None, ("torchvision builds no drop path into detection backbones (ResNet, MobileNetV3, VGG take "
                      "no stochastic_depth_prob)"), {}
    model_class = type(torchvision.models.get_model(builder, num_classes=10))
    if "stochastic_depth_prob" not in inspect.signature(model_class).parameters:
        return None, f"torchvision {builder} takes no stochastic_depth_prob", {}
    kept = dict(module.named_modules())
    built = _torchvision_at(builder, RATE)
    rates = {(f"{prefix}.{n}" if prefix else n): m.p for n, m in built.named_modules()
             if isinstance(m, StochasticDepth) and n in kept and m.p > 0}
    return rates, f"torchvision {builder}(stochastic_depth_prob={RATE}), on the modules the extractor keeps", {}


def _fx_timm_reference(name: str) -> tuple[dict[str, float], str, dict[str, str]]:
    """A timm model traced by fx (``FeatureGraphNet``'s ``graph_module``, or ``torch.fx.symbolic_trace``)
    against the model timm builds untraced at ``drop_path_rate=RATE``: the drop paths its training
    forward calls, by block (the slot's parent; the extractor keeps the names, under ``graph_module.``
    for a FeatureGraphNet). By block, because a slot timm leaves ``None`` at rate 0 (ResNet's
    ``drop_path``) is not kept in the traced graph: pathsurgeon hooks that block's branch instead."""
    import timm

    library, model_name = name.split(":")
    kwargs = {"img_size": SMALL_DETECTION, "depth": 4} if library == "timm-traced" else {}
    built = timm.create_model(model_name, drop_path_rate=RATE, **kwargs)
    called, kinds = _called_residual(built, "graph_module" if library == "timm" else "")

    def block(slot: str) -> str:
        return slot.rpartition(".")[0]

    how = (f"timm.create_model({model_name!r}, drop_path_rate={RATE}{', img_size=64, depth=4' if kwargs else ''}), "
           "untraced: the drop paths it calls, by block")
    return {block(k): v for k, v in called.items()}, how, {block(k): v for k, v in kinds.items()}


def _torchvision_at(name: str, rate: float):
    """torchvision's ``name`` at ``stochastic_depth_prob=rate``; ``swin_t`` fixes the rate itself (0.2)
    and refuses another, so its class is called with swin_t's own arguments."""
    import torchvision

    if name == "swin_t":
        from torchvision.models.swin_transformer import SwinTransformer

        return SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                               window_size=[7, 7], stochastic_depth_prob=rate)
    return torchvision.models.get_model(name, stochastic_depth_prob=rate)


def main_sweep():
    """benchmarks/coverage.py, imported by path (``coverage`` is also coverage.py's package name)."""
    import importlib.util

    if "pathsurgeon_coverage_sweep" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pathsurgeon_coverage_sweep", ROOT / "benchmarks" / "coverage.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["pathsurgeon_coverage_sweep"]


def _called_residual(built, prefix: str) -> tuple[dict[str, float], dict[str, str]]:
    """The main sweep's judgement on a library-built model: ({slot: rate} of the drop paths a training
    forward calls, {slot: what its output goes into: 'add' for a residual branch})."""
    from pathsurgeon.inputs import example_inputs

    coverage = main_sweep()

    inputs = example_inputs(built)
    x = dict(inputs.kwargs) if inputs.kwargs else inputs.args[0]
    called = coverage.called_drop_paths(built, x)
    kinds = coverage._site_kinds(built, x, list(called))

    def name(slot: str) -> str:
        return f"{prefix}.{slot}" if prefix else slot

    return {name(slot): rate for slot, rate in called.items()}, {name(slot): kind for slot, kind in kinds.items()}


ATTEMPTS = (("meta", ("size", "layers")), ("cpu", ("size", "layers")), ("cpu", ("size",)), ("cpu", ("layers",)))


class BuildFailed(Exception):
    """The composite's own library failed to build it (before pathsurgeon saw a model)."""


def check(source: str, name: str) -> dict:
    """One row: the composite built on the meta device from a cut config. Where that fails — capture
    needs real tensors (a ``.item()`` while building, data-dependent shapes in detection and
    segmentation heads), or the model does not run or build cut — built again on the CPU, cut fully,
    then by image size only, then by layers only (Hugging Face; the others are not cut). The row keeps
    the error of the first CPU attempt and says which attempt ran."""
    started = time.perf_counter()
    if source in BUILT_HERE:
        return _check(source, name, "cpu", (), started)
    attempts = ATTEMPTS if source == "transformers" else ATTEMPTS[:2]
    errors: list[Exception] = []
    for index, (device, cut) in enumerate(attempts):
        try:
            row = _check(source, name, device, cut, started)
        except Exception as error:  # noqa: BLE001 - tried again another way, or re-raised
            if index == 0 and not (_meta_limit(error) or isinstance(error, BuildFailed)):
                raise
            if index == 0 and not isinstance(error, BuildFailed) and _too_large(source, name):
                raise RuntimeError(f"{error} (over {CPU_LIMIT:.1e} parameters: not retried on the CPU)") from error
            errors.append(error)
            continue
        if index:
            row["built"] = f"on the {device}" + (f", config cut by {' and '.join(cut)} only" if len(cut) == 1 else "")
        return row
    if all(isinstance(e, BuildFailed) for e in errors):
        cause = errors[0].__cause__
        first = (str(cause).strip().splitlines() or [""])[0][:160]
        return {"status": "cannot build", "error": f"{type(cause).__name__}: {first}", "parts": [],
                "seconds": round(time.perf_counter() - started, 2)}
    raise next(e for e in errors[1:] if not isinstance(e, BuildFailed))


CPU_LIMIT = 1.5e9  # parameters; as the main sweep: two float32 copies of more do not fit the 24 GB machine


def _too_large(source: str, name: str) -> bool:
    model = build(source, name, "meta")
    return sum(p.numel() for p in model.parameters()) > CPU_LIMIT


def _meta_limit(error: Exception) -> bool:
    """Whether ``error`` may be the meta device's (a capture or a forward that needs real values)."""
    from pathsurgeon import CaptureError, ExampleInputsError

    return isinstance(error, (CaptureError, ExampleInputsError)) or "meta" in str(error)


def _check(source: str, name: str, device: str, cut: tuple[str, ...], started: float) -> dict:
    import torch

    import pathsurgeon
    from pathsurgeon.parts import library_parts

    given = None
    try:
        if source in BUILT_HERE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, given = build_here(source, name)
        else:
            model = build(source, name, device, cut)
    except Exception as error:
        if source in BUILT_HERE:
            return {"status": "cannot build", "error": f"{type(error).__name__}: {str(error)[:160]}", "parts": [],
                    "seconds": round(time.perf_counter() - started, 2)}
        raise BuildFailed from error
    parameters = sum(p.numel() for p in model.parameters())
    parts = library_parts(model)
    row = {"parameters": parameters, "parts": [{"path": p.path, "library": p.library, "source": p.source,
                                                "verdict": "no branches"} for p in parts]}
    try:
        preview = pathsurgeon.preview(model, RATE, example_inputs=given)
    except pathsurgeon.NoBranchesError as error:
        return {**row, "status": "no branches", "error": str(error)[:200],
                "seconds": round(time.perf_counter() - started, 2)}
    row["parts"] = []
    verdicts = []
    for report in preview.parts:
        if not report.branches:
            row["parts"].append({"path": report.path, "source": report.source, "verdict": "left alone",
                                 "library": None})
            continue
        part = next(p for p in parts + [report] if p.path == report.path)
        got = {b.target: b.rate for b in preview if b.part == report.path}
        library = getattr(part, "library", None)
        builder = name.split(":")[1] if source == "fx" and name.startswith("torchvision:") else None
        reference, how, kinds = (library_reference(model, part, builder)
                                 if library in ("timm", "transformers", "torchvision") else (None, "", {}))
        if source == "fx" and not name.startswith("torchvision:"):  # timm traced: timm's model, by block
            reference, how, kinds = _fx_timm_reference(name)
            got = {b.block: b.rate for b in preview if b.part == report.path}
        if reference is not None:  # judged as the main sweep judges it (coverage.py's _compare)
            positive = {k: v for k, v in got.items() if v > 0}
            missing = sorted(set(reference) - set(positive))
            other = {k: kinds[k] for k in missing if kinds.get(k, "add") != "add"}  # not residual branches
            missing = [k for k in missing if k not in other]
            by_design = bool(other) and len(other) == len(reference) and bool(positive)  # timm ResNeSt
            extra = [] if by_design else sorted(set(positive) - set(reference))
            off = sorted(k for k in set(reference) & set(positive) if reference[k] != positive[k])
            detail = {"missing": missing[:3], "extra": extra[:3],
                      "off": [(k, reference[k], positive[k]) for k in off[:3]]}
            if missing or extra or off:
                verdict = "differs"
            elif by_design:  # the block input on its way into the shortcut; pathsurgeon hooks the branches
                verdict, detail = PLACEMENT_BY_DESIGN, {"library drops": sorted(other)[:3],
                                                        "pathsurgeon hooks": sorted(positive)[:3]}
            elif other:
                verdict = "not residual"
                detail = {"library also drops": [f"{k} ({v})" for k, v in sorted(other.items())[:3]]}
            else:
                verdict = "agrees"
        else:  # no library drop path: linear over the part's own depth units, from 0
            # a block the family's recipe keeps out of the depth (recipes/transformers.toml: SigLIP's
            # attention-pooling head) has no depth unit and rate 0
            units = list(dict.fromkeys(b.unit for b in preview if b.part == report.path and b.unit is not None))
            expected = dict(zip(units, torch.linspace(0, RATE, len(units)).tolist(), strict=True))
            expected[None] = 0.0
            wrong = [b.block for b in preview if b.part == report.path and b.rate != expected[b.unit]]
            verdict = "agrees (linear)" if not wrong else "differs"
            detail = {"wrong": wrong[:3]}
            how = how or "linear over the part's own depth"
            outside = sorted({b.block for b in preview if b.part == report.path and b.unit is None})
            if outside:
                how += f"; {', '.join(outside)} kept at 0 by the family's recipe"
        verdicts.append(verdict)
        row["parts"].append({"path": report.path, "library": report.library, "source": report.source,
                             "rates_from": report.rates_from, "rates_note": report.rates_note[:200],
                             "branches": report.branches, "verdict": verdict,
                             "reference": how, **({"detail": detail} if not verdict.startswith("agrees") else {})})
    language = LANGUAGE_MODELS.get(name) if source == "vision-language" else None
    if language is not None:  # the text decoder / language model must be left alone
        alone = [p for p in row["parts"] if p["path"] == language]
        if not alone or alone[0]["verdict"] != "left alone":
            verdicts.append("differs")
            row["parts"].append({"path": language, "library": "transformers", "source": "language model",
                                 "verdict": "differs", "rates_from": "", "branches": 0,
                                 "detail": {"language model not left alone":
                                            alone[0]["verdict"] if alone else "absent"}})
    if given is not None:
        row["inputs"] = "given"
    if not verdicts:
        row["status"] = "no branches"
    else:  # the worst part's verdict
        row["status"] = next((v for v in ("differs", PLACEMENT_BY_DESIGN, "not residual") if v in verdicts), "agrees")
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


# --- running -------------------------------------------------------------------------------------------


def names_of(source: str) -> list[str]:
    return {"open_clip": open_clip_names, "smp": smp_names, "transformers": transformers_names,
            "torchvision-detection": detection_names, "fx": fx_names,
            "vision-language": vision_language_names}[source]()


def done_rows() -> set[tuple[str, str]]:
    if not RESULTS.exists():
        return set()
    return {(r["source"], r["name"]) for r in map(json.loads, RESULTS.read_text().splitlines()) if r}


def forget(only: str, statuses: set[str]) -> None:
    """Remove the rows of the models ``only`` matches whose status is in ``statuses`` (they run again)."""
    if not RESULTS.exists():
        return
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
    kept = [r for r in rows if not (fnmatch.fnmatch(r["name"], only) and r["status"] in statuses)]
    staging = RESULTS.with_name(f".{RESULTS.name}.staging")
    staging.write_text("".join(json.dumps(r) + "\n" for r in kept))
    staging.replace(RESULTS)


def run(sources: list[str], budget: float, row_timeout: int, limit: int | None = None, only: str | None = None) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    start = time.monotonic()

    def alarm(signum, frame):
        raise RowTimeout

    signal.signal(signal.SIGALRM, alarm)
    # round robin over the sources, so that a run cut short by the budget covers each of them
    queues = [[(source, name) for name in names_of(source)[:limit]] for source in sources]
    order = [item for group in itertools.zip_longest(*queues) for item in group if item is not None]
    for source, name in order:
        if (source, name) in done or (only and not fnmatch.fnmatch(name, only)):
            continue
        if time.monotonic() - start > budget:
            print(f"budget of {budget:.0f} s spent; rerun to continue", flush=True)
            return
        row = {"source": source, "name": name, "commit": commit}
        signal.alarm(row_timeout)
        try:
            row.update(check(source, name))
        except RowTimeout:
            row.update(status="timeout", error=f"over {row_timeout} s")
        except Exception as error:  # noqa: BLE001 - a row, not a crash
            from pathsurgeon import ExampleInputsError

            first = (str(error).strip().splitlines() or [""])[0][:300]
            row.update(status="needs example_inputs" if isinstance(error, ExampleInputsError) else "error",
                       error=f"{type(error).__name__}: {first}",
                       where=traceback.format_exc().strip().splitlines()[-3:][0][:200])
        finally:
            signal.alarm(0)
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        gc.collect()  # a failed row's frames hold its models
        print(f"{source:12} {name:50} {row['status']}", flush=True)


def write_doc(command: str) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
    import open_clip
    import segmentation_models_pytorch as smp
    import timm
    import torch
    import transformers

    lines = [
        "# Composites coverage",
        "",
        "Generated by `benchmarks/coverage_composites.py` (see its docstring for what is compared). Every",
        "composite is built on the meta device (no weights, no downloads; on the CPU where capture there needs "
        f"real tensors) and `pathsurgeon.preview(model, {RATE})` is compared, part by part, with the part's own",
        "library built at that rate: timm parts with `timm.create_model(architecture, drop_path_rate=R)`",
        "(features_only with the part's out_indices for feature extractors), the drop paths a training forward",
        "calls, judged as the main sweep judges them (`docs/coverage.md`); Hugging Face parts with their class",
        "built from their own sub-config with `drop_path_rate=R`; parts whose library has no drop path must be",
        "linear over their own depth. Blocks outside every library part are left alone by default (see the",
        "docs/guide/composites.md, *Models inside models*).",
        "",
        "Three sources are small fixed lists built on the CPU (the docstring has the details):",
        "*torchvision-detection* (every builder of `torchvision.models.detection`, `weights=None,",
        "weights_backbone=None`, 64-pixel images; `preview` surgers the backbone body on its own, linear over its",
        "depth: torchvision builds no drop path there), *fx* (torchvision's `create_feature_extractor` against the",
        "builder at `stochastic_depth_prob=R` on the modules the extractor keeps; timm's `FeatureGraphNet` and a",
        "`torch.fx.symbolic_trace`d timm ViT against timm's untraced model, block by block) and *vision-language*",
        "(VisionEncoderDecoder ViT + GPT-2 and Swin + BERT, Llava CLIP + Llama, PaliGemma SigLIP + Gemma, from",
        "small configs: the vision tower against its library, the text decoder / language model must be left",
        "alone).",
        "",
        "Rows by the commit they ran at: " + ", ".join(
            f"{commit} {count}" for commit, count in Counter(r["commit"] for r in rows).most_common()) + ".",
        "",
        f"Versions: torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
        f"open_clip {open_clip.__version__}, segmentation_models_pytorch {smp.__version__}; Python "
        f"{platform.python_version()}. Run: `{command}`.",
        "",
        "| source | models listed | run | " + " | ".join(STATUSES) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in STATUSES) + " |",
    ]
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        counts = Counter(r["status"] for r in mine)
        lines.append(f"| {source} | {len(names_of(source))} | {len(mine)} | "
                     + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    lines += ["", *STATUS_NOTES]
    lines += ["", "Models listed but not run: the run's time budget was spent first (round robin over the "
              "sources, so each is covered in part); rerunning the command resumes where it stopped."]
    lines += ["", "| source | model | status | parts (path: library, rates from, branches, verdict) | note | commit |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        parts = "; ".join(
            f"`{p['path'] or '(model)'}`: " + (
                p["verdict"] if p["verdict"] in ("left alone", "no branches") else
                f"{p.get('library') or 'none'}, {p['rates_from']}, {p['branches']}, {p['verdict']}"
            )
            for p in row.get("parts", [])
        )
        note = row.get("error") or "; ".join(
            json.dumps(p["detail"]) for p in row.get("parts", []) if p.get("detail")
        )
        if row.get("built"):
            note = f"{note}; built {row['built']}" if note else f"built {row['built']}"
        note = note.replace("|", "\\|")[:240]
        lines.append(f"| {row['source']} | {row['name']} | {row['status']} | {parts} | {note} | {row['commit']} |")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"Written {stamp}."]
    temporary = DOC.with_suffix(".md.tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(DOC)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", choices=SOURCES, help="default: all")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    parser.add_argument("--row-timeout", type=int, default=120, help="seconds per model (default 120)")
    parser.add_argument("--limit", type=int, help="only the first N models of each source (a trial run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file (default: %(default)s)")
    parser.add_argument("--only", help="glob over model names: run only those")
    parser.add_argument("--redo", default="", help="comma-separated statuses of --only's rows to run again (error)")
    parser.add_argument("--write-doc", metavar="COMMAND", nargs="?", const="",
                        help="write docs/coverage-composites.md from the results; COMMAND: how they were run")
    arguments = parser.parse_args()
    RESULTS = arguments.results
    if arguments.write_doc is not None:
        write_doc(arguments.write_doc or "see the docstring")
        return
    with contextlib.suppress(KeyboardInterrupt):
        if arguments.only and arguments.redo:
            forget(arguments.only, set(arguments.redo.split(",")))
        run(arguments.source or list(SOURCES), arguments.budget, arguments.row_timeout, arguments.limit,
            arguments.only)


if __name__ == "__main__":
    sys.exit(main())
