"""Drop-path slots: the places where a model's author left room for stochastic depth.

A slot is an attribute of a module that holds a drop-path module (timm ``DropPath``, torchvision
``StochasticDepth``, a Hugging Face ``XxxDropPath``, ours), an ``nn.Identity`` standing in for one
(what timm builds at rate 0), or ``None`` where the forward skips the call (timm ResNet). Filling a
slot instead of rewriting code means the surgered model runs the very code path the library itself
runs when built with a drop-path rate.

During capture every slot holds a :class:`SlotProbe`, an identity that shows up in any graph
(torch.fx leaf, or a custom op under torch.export), so the finder can see which residual branch each
slot sits on. The facts (slot names, drop-path classes, rate attributes) are in ``recipes/slots.toml``.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .droppath import DropPath
from .tables import table

__all__ = ["Slot", "SlotProbe", "find_slots", "install", "is_drop_path_module", "register_drop_path_class"]

# What libraries call their slots and where their drop-path modules keep their rate: recipes/slots.toml.
_FACTS = table("slots")
SLOT_NAME = re.compile(_FACTS["name_pattern"], re.IGNORECASE)
_RATE_ATTRIBUTES = tuple(_FACTS["rate_attributes"])
_CLASS_FAMILIES = tuple((f["module_prefix"], f["name_suffix"]) for f in _FACTS.get("class_families", ()))

_DROP_PATH_CLASSES: list[type] = [DropPath]


def register_drop_path_class(cls: type) -> type:
    """Register a module class that implements stochastic depth, so its instances count as slots.

    Usable as a decorator. Instances are re-rated (replaced by pathsurgeon's DropPath, restored on strip),
    never stacked.
    """
    if cls not in _DROP_PATH_CLASSES:
        _DROP_PATH_CLASSES.append(cls)
    return cls


def _register_library_classes() -> None:
    """The drop-path classes recipes/slots.toml lists, from the libraries that are installed."""
    for entry in _FACTS.get("classes", ()):
        try:
            cls = getattr(importlib.import_module(entry["module"]), entry["name"])
        except (ImportError, AttributeError):  # that library is not installed (or moved the class)
            continue
        register_drop_path_class(cls)


_register_library_classes()


def is_drop_path_module(module: object) -> bool:
    """True for a module that implements stochastic depth (registered classes, and HF ``XxxDropPath``)."""
    if isinstance(module, tuple(_DROP_PATH_CLASSES)):
        return True
    cls = type(module)
    return any(
        cls.__module__.startswith(prefix) and cls.__name__.endswith(suffix) for prefix, suffix in _CLASS_FAMILIES
    )


def existing_rate(module: object) -> float:
    """The drop rate an existing drop-path module was built with (0.0 for Identity / None)."""
    for attribute in _RATE_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


@dataclass(frozen=True)
class Slot:
    """``parent.attr`` can hold a drop-path module (it holds one, an ``nn.Identity``, or ``None``)."""

    parent: str
    attr: str

    @property
    def name(self) -> str:
        return f"{self.parent}.{self.attr}" if self.parent else self.attr


def find_slots(model: nn.Module) -> list[Slot]:
    """Every drop-path slot of ``model``, in module registration order."""
    slots: list[Slot] = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, SlotProbe):
            raise RuntimeError("slot probes are still installed; a previous capture did not clean up")
        for attr, child in parent._modules.items():
            if child is None:
                if SLOT_NAME.match(attr):
                    slots.append(Slot(parent_name, attr))
            elif is_drop_path_module(child):
                slots.append(Slot(parent_name, attr))
            elif type(child) is nn.Identity and SLOT_NAME.match(attr):
                slots.append(Slot(parent_name, attr))
        for attr, value in vars(parent).items():
            if value is None and SLOT_NAME.match(attr) and attr not in parent._modules:
                slots.append(Slot(parent_name, attr))
    return slots


# --- putting modules into slots and taking them out again ------------------------------------------


@dataclass
class SlotContent:
    """What a slot held before we touched it, and where (``_modules`` or the instance ``__dict__``)."""

    value: nn.Module | None
    in_modules: bool


def read_slot(parent: nn.Module, attr: str) -> SlotContent:
    if attr in parent._modules:
        return SlotContent(parent._modules[attr], True)
    return SlotContent(vars(parent).get(attr), False)


def write_slot(parent: nn.Module, attr: str, module: nn.Module) -> None:
    # nn.Module.__setattr__ moves a plain attribute into _modules when given a module.
    setattr(parent, attr, module)


def restore_slot(parent: nn.Module, attr: str, content: SlotContent) -> None:
    if content.in_modules:
        parent._modules[attr] = content.value
    else:
        parent._modules.pop(attr, None)
        vars(parent)[attr] = content.value


# --- probes ------------------------------------------------------------------------------------------

# the schema stated: torch < 2.7 cannot infer it from this module's string annotations
@torch.library.custom_op("pathsurgeon::slot_probe", mutates_args=(), schema="(Tensor x, SymInt slot_id) -> Tensor")
def _slot_probe_op(x: torch.Tensor, slot_id: int) -> torch.Tensor:
    return x.clone()


@_slot_probe_op.register_fake
def _slot_probe_fake(x: torch.Tensor, slot_id: int) -> torch.Tensor:
    return torch.empty_like(x)


class SlotProbe(nn.Module):
    """Identity that marks a slot in a captured graph. Lives in the model only during capture."""

    def __init__(self, slot_id: int, slot: Slot) -> None:
        super().__init__()
        self.slot_id = slot_id
        self.slot = slot

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        return _slot_probe_op(x, self.slot_id)

    def extra_repr(self) -> str:
        return f"slot={self.slot.name}"


@contextlib.contextmanager
def install(model: nn.Module, slots: list[Slot]) -> Iterator[dict[str, SlotProbe]]:
    """Put a :class:`SlotProbe` in every slot for the duration of the block; restore exactly after."""
    saved: list[tuple[nn.Module, str, SlotContent]] = []
    probes: dict[str, SlotProbe] = {}
    try:
        for slot_id, slot in enumerate(slots):
            parent = model.get_submodule(slot.parent)
            saved.append((parent, slot.attr, read_slot(parent, slot.attr)))
            probe = SlotProbe(slot_id, slot)
            write_slot(parent, slot.attr, probe)
            probes[slot.name] = probe
        yield probes
    finally:
        for parent, attr, content in reversed(saved):
            restore_slot(parent, attr, content)
