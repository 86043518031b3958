"""torchvision: the classification builder (``swin_t``, ``efficientnet_b0``, ...) whose model matches.

Candidates are the builders defined in the module of the model's class; the first whose meta-device
model matches the user's tree is the one. Several builders fix ``stochastic_depth_prob`` themselves
(``swin_t`` passes 0.2 and refuses another value), so a replay at rate ``r`` records the arguments
the builder gives the model class and calls the class again with ``stochastic_depth_prob=r``: the
numbers are still torchvision's own code's.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from . import Constructor, RebuildError

RATE_ARGUMENT = "stochastic_depth_prob"
DEFAULT_CLASSES = 1000
DEFAULT_IMAGE_SIZE = 224


def candidates(model: nn.Module) -> list[Constructor]:
    cls = original_class(model)
    if cls is None:
        return []
    import torchvision

    names = [
        name for name in torchvision.models.list_models(module=torchvision.models)
        if torchvision.models.get_model_builder(name).__module__ == cls.__module__
    ]
    if not names:
        raise RebuildError(f"no torchvision classification builder makes a {cls.__name__}")
    arguments = _plain_arguments(model)
    takes_rate = RATE_ARGUMENT in inspect.signature(cls.__init__).parameters
    return [
        Constructor("torchvision", name, arguments, RATE_ARGUMENT if takes_rate else None,
                    functools.partial(_build, name, tuple(arguments.items()), cls))
        for name in names
    ]


def original_class(model: nn.Module) -> type[nn.Module] | None:
    """The torchvision class of ``model``; for an ``fx.GraphModule`` (``create_feature_extractor``,
    ``torch.fx.symbolic_trace``), the class it was traced from: the one its name gives, among the
    classes torchvision's builders return, unless its nodes record modules of another library."""
    cls = type(model)
    if cls.__module__.startswith("torchvision.models"):
        return cls
    from torch import fx

    if not isinstance(model, fx.GraphModule):
        return None
    for node in model.graph.nodes:  # torch.fx's own tracer records the traced modules' classes
        for _, traced in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(traced, type) and not traced.__module__.startswith(("torchvision.", "torch.")):
                return None
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        module = inspect.getmodule(torchvision.models.get_model_builder(name))
        found = getattr(module, cls.__name__, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    return None


def _build(name: str, arguments: tuple[tuple[str, Any], ...], cls: type[nn.Module], rate: float | None) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if rate is None:
        return builder(**dict(arguments))
    args, kwargs = _class_call(builder, dict(arguments), cls)
    return cls(*args, **{**kwargs, RATE_ARGUMENT: rate})


def _class_call(builder, arguments: dict[str, Any], cls: type[nn.Module]) -> tuple[tuple, dict]:
    """The arguments ``builder`` passes to ``cls`` (recorded during one build)."""
    calls: list[tuple[tuple, dict]] = []
    had_own_init = "__init__" in vars(cls)
    original = cls.__init__

    def recording_init(self, *args, **kwargs):
        if type(self) is cls and not calls:
            calls.append((args, dict(kwargs)))
        original(self, *args, **kwargs)

    setattr(cls, "__init__", recording_init)  # noqa: B010  (mypy refuses an assignment to a method)
    try:
        builder(**arguments)
    finally:
        if had_own_init:
            setattr(cls, "__init__", original)  # noqa: B010
        else:
            del cls.__init__
    if not calls:
        raise RebuildError(f"{builder.__name__} did not build a {cls.__name__}")
    return calls[0]


def _plain_arguments(model: nn.Module) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        num_classes = linears[-1].out_features if linears else None
    if isinstance(num_classes, int) and num_classes != DEFAULT_CLASSES:
        arguments["num_classes"] = num_classes
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int) and image_size != DEFAULT_IMAGE_SIZE:
        arguments["image_size"] = image_size
    return arguments
