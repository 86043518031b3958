"""timm: ``timm.create_model(pretrained_cfg architecture.tag, drop_path_rate=r, **plain arguments)``.

The plain arguments are those fine-tuners change and a built model still shows: ``num_classes``
(``model.num_classes``), ``in_chans`` and ``img_size`` (what timm states of the built model:
:func:`stated_input_size`).
Only values that differ from the pretrained tag's defaults are passed, so the arguments read as the
user's own call. Anything else (``depth=4``, ``window_size=4``) shows up as a tree difference and the
model is not rebuilt.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from .. import slots as slot_lib
from . import Constructor, RebuildError

RATE_ARGUMENT = "drop_path_rate"


def candidates(model: nn.Module) -> list[Constructor]:
    if not type(model).__module__.startswith("timm."):
        return []
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not architecture:
        raise RebuildError(
            f"{type(model).__name__} has no pretrained_cfg['architecture'] (not built by timm.create_model)"
        )
    tag = cfg.get("tag")
    name = f"{architecture}.{tag}" if tag else architecture
    arguments = {**_feature_arguments(model), **_plain_arguments(model, cfg)}
    # a features_only wrapper (FeatureListNet, ...) passes the rate on to the model class it wraps
    takes_rate = "features_only" in arguments or _accepts(type(model), RATE_ARGUMENT)

    # module-level functions bound with functools.partial, not closures: the constructor is kept in the
    # surgery record on the model, which must pickle (torch.save(model), EMA copies)
    pool = _global_pool(model)
    others: tuple[dict[str, Any], ...] = ({"global_pool": pool},) if pool is not None else ()
    others += tuple({"output_stride": stride} for stride in _output_strides(model, arguments))
    default = tuple(cfg.get("input_size") or ())[1:]
    sizes = () if "img_size" in arguments or not _accepts(type(model), "img_size") else tuple(
        size for size in IMAGE_SIZES if (size, size) != default
    )
    variants = functools.partial(_variants, name, arguments, takes_rate, others, sizes)
    found = [_constructor(name, arguments, takes_rate, variants)]
    if pool is not None and _accepts(type(model), "global_pool"):
        # a pool the model was built or reset with can change its module names (timm EVA builds fc_norm
        # for 'avg' and norm for 'token'; open_clip builds trunks with global_pool='token')
        found.append(_constructor(name, {**arguments, "global_pool": pool}, takes_rate, variants))
    return found


def _constructor(name: str, arguments: dict[str, Any], takes_rate: bool, variants=None) -> Constructor:
    kwargs = {"variants": variants} if variants is not None else {}
    return Constructor("timm", name, arguments, RATE_ARGUMENT if takes_rate else None,
                       functools.partial(_create, name, arguments), **kwargs)


def _variants(
    name: str, arguments: dict[str, Any], takes_rate: bool, others: tuple, sizes: tuple
) -> list[Constructor]:
    """Arguments a built model does not keep: the global pool a wrapper chose (open_clip's
    ``reset_classifier(0, global_pool='')``), the output stride of a features_only model
    (segmentation_models_pytorch's ``output_stride=16``), and the usual img_sizes (MViTv2, Hiera, VOLO,
    LeViT), each size with each of the others. Plain data only, so the constructor pickles."""
    found: list[Constructor] = []
    for other in ({}, *others):
        if other:
            found.append(_constructor(name, {**arguments, **other}, takes_rate))
        found += [_constructor(name, {**arguments, **other, "img_size": size}, takes_rate) for size in sizes]
    return found


def _global_pool(model: nn.Module) -> str | None:
    """The global pool type the model was built or reset with (None where it keeps none)."""
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    pool_type = getattr(pool, "pool_type", None)
    return pool_type if isinstance(pool_type, str) else None


def _feature_arguments(model: nn.Module) -> dict[str, Any]:
    """``features_only=True`` and the ``out_indices`` of a feature-extraction model (timm's
    ``create_model(name, features_only=True, out_indices=...)``; segmentation_models_pytorch's encoders)."""
    info = getattr(model, "feature_info", None)
    if not (hasattr(info, "out_indices") and hasattr(info, "reduction")) or hasattr(model, "num_classes"):
        return {}
    assert info is not None  # hasattr(None, ...) is False
    arguments: dict[str, Any] = {"features_only": True, "out_indices": [int(i) for i in info.out_indices]}
    if type(model).__name__ == "FeatureGraphNet":  # built with feature_cls="fx": an fx GraphModule inside
        arguments["feature_cls"] = "fx"
    return arguments


def _output_strides(model: nn.Module, arguments: dict[str, Any]) -> list[int]:
    """Output strides to try for a features_only model whose deepest feature is finer than 1/32."""
    if "features_only" not in arguments:
        return []
    info: Any = model.feature_info  # timm's FeatureInfo, typed Tensor | Module by nn.Module.__getattr__
    reductions = list(info.reduction())
    deepest = max(reductions) if reductions else 32
    return [deepest] if deepest < 32 else []


# fine-tuning and test sizes, tried for a model that does not keep its img_size
IMAGE_SIZES = (224, 256, 384, 64, 96, 128, 160, 192, 288, 320, 448, 512, 32)


def _create(name: str, arguments: dict[str, Any], rate: float | None) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
    if kwargs.get("feature_cls") == "fx" and rate is not None:
        return _traced_at(name, kwargs, rate)
    if rate is not None:
        kwargs[RATE_ARGUMENT] = rate
    return timm.create_model(name, pretrained=False, **kwargs)


def _traced_at(name: str, kwargs: dict[str, Any], rate: float) -> nn.Module:
    """A ``FeatureGraphNet`` with timm's drop paths at ``rate`` in its slots. Traced at a rate, timm's
    DropPath is traced through (its code inlined in the graph, no module left at the slot), so the
    rates are read from the model timm builds untraced at ``rate`` and put into the slots the
    extractor traced at rate 0 keeps (``graph_module.stages.0.blocks.1.drop_path``). A slot the trace
    left out (timm's ResNet keeps ``drop_path = None`` at rate 0, and its ``if self.drop_path is not
    None`` is decided while tracing) is put back in the block it belongs to, as the untraced model holds it."""
    import timm

    traced = timm.create_model(name, pretrained=False, **kwargs)
    untraced_kwargs: dict[str, Any] = {k: v for k, v in kwargs.items()
                                       if k not in ("features_only", "feature_cls", "out_indices")}
    untraced_kwargs[RATE_ARGUMENT] = rate
    untraced = timm.create_model(name, pretrained=False, **untraced_kwargs)
    graph = getattr(traced, "graph_module", None)
    if graph is None:
        return traced
    for slot in slot_lib.find_slots(untraced):
        try:
            parent = graph.get_submodule(slot.parent)
        except AttributeError:
            continue  # cut off by the extractor's last output
        held = slot_lib.read_slot(untraced.get_submodule(slot.parent), slot.attr)
        if isinstance(parent._modules.get(slot.attr), nn.Identity):
            if slot_lib.is_drop_path_module(held.value):
                parent._modules[slot.attr] = held.value
        elif slot.attr not in parent._modules and slot.attr not in vars(parent):
            slot_lib.restore_slot(parent, slot.attr, held)
    return traced


def _accepts(cls: type[nn.Module], argument: str) -> bool:
    """True when the class takes ``argument``, or may through ``**kwargs`` (then a build decides)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return True
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _plain_arguments(model: nn.Module, cfg: dict) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    input_size = tuple(cfg.get("input_size") or ())
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and num_classes != cfg.get("num_classes"):
        arguments["num_classes"] = num_classes
    stated = stated_input_size(model)
    if stated is None or len(input_size) != 3:
        return arguments
    channels, *size = stated
    if channels != input_size[0]:
        arguments["in_chans"] = channels
    if tuple(size) != tuple(input_size[1:]) and _accepts(type(model), "img_size"):
        arguments["img_size"] = size[0] if size[0] == size[1] else list(size)
    return arguments


def stated_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(channels, height, width) of the images a timm-built model takes, as timm states them.

    timm's own ``get_model_input_config`` (timm >= 1.0.31): the ``in_chans`` and ``img_size`` the model
    was built with, else its ``pretrained_cfg["input_size"]`` (csatv2: 512 px; maxvit_tiny_tf_384 built
    with ``img_size=224``: 224, not its config's 384). Where timm records no size the model's own
    ``img_size`` (its patch embedding's, e.g. after ``set_input_size``) stands in. Never the first
    convolution's channels: TResNet's stem convolution reads 48 channels after a space-to-depth of
    the 3-channel image, csatv2's 64 DCT coefficients. An older timm states no channels: the model's
    ``in_chans`` stands in, else what its patch embedding's projection reads (it sees the image itself:
    ViT, DeiT, EVA, ... before timm 1.0.26 kept no ``in_chans``). None for a model with no timm config.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or len(tuple(cfg.get("input_size") or ())) != 3:
        return None
    channels, height, width = (int(v) for v in cfg["input_size"])
    traits = getattr(model, "_traits", None)
    try:
        from timm.models import get_model_input_config
    except ImportError:  # an older timm: the same facts from the model's attributes
        get_model_input_config = None  # type: ignore[assignment]  # the function a newer timm has, or None
    if get_model_input_config is not None and isinstance(traits, dict):
        channels, height, width = (int(v) for v in get_model_input_config(model)["input_size"])
        if traits.get("img_size") is None and (size := _image_size(model)) is not None:
            height, width = size
        return channels, height, width
    own_channels = getattr(model, "in_chans", None)
    embedding = getattr(model, "patch_embed", None)
    # timm.layers' PatchEmbed projects the image itself (VOLO's own PatchEmbed has a stem before it)
    projection = getattr(embedding, "proj", None) if type(embedding).__module__.startswith("timm.layers") else None
    if isinstance(own_channels, int) and not isinstance(own_channels, bool):
        channels = own_channels
    elif isinstance(projection, nn.Conv2d):
        channels = projection.in_channels
    return (channels, *(_image_size(model) or (height, width)))


def _image_size(model: nn.Module) -> tuple[int, int] | None:
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return (int(size[0]), int(size[1]))
    return None
