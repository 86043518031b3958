"""Library adapters: which constructor built a model, rebuilt on the meta device at any drop-path rate.

The library that built a model is the ground truth for where its stochastic depth goes and at what
rate. Rather than re-deriving each family's schedule, pathsurgeon asks the library: it identifies the
constructor (timm: ``pretrained_cfg["architecture"]``; torchvision: the builder whose model matches;
Hugging Face: the model class with its config), replays it on the meta device (no memory, no
weights, tens of milliseconds) at the requested rate, checks that the replayed module tree is the
user's (state_dict names and shapes, module classes), and reads each drop-path slot's rate by name.

Each adapter (``timm.py``, ``torchvision.py``, ``transformers.py``) has one function,
``candidates(model) -> list[Constructor]``: empty when the model is not from that library, several
when the library has several builders of the same class (torchvision); it raises
:class:`RebuildError` when the model is from the library but cannot be rebuilt by it.

>>> import timm
>>> model = timm.create_model("resnet18", num_classes=10)
>>> identify_constructor(model).to_dict()
{'library': 'timm', 'name': 'resnet18.a1_in1k', 'arguments': {'num_classes': 10}}
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .. import slots as slot_lib
from ..errors import PathSurgeonError

__all__ = [
    "Constructor",
    "RebuildError",
    "constructor_arguments",
    "identify_constructor",
    "meta_build",
    "replay",
    "slot_rates",
    "tree_difference",
]


class RebuildError(PathSurgeonError):
    """The model's library cannot rebuild it (unknown constructor, or the rebuilt tree differs)."""


@dataclass(frozen=True)
class Constructor:
    """How a library builds a model: ``library``, constructor ``name``, plain ``arguments``.

    ``arguments`` holds only JSON-serialisable values (``num_classes``, ``in_chans``, ``img_size``,
    a Hugging Face config as a dict): enough to rebuild the architecture with random weights.
    ``rate_argument``: the constructor's drop-path rate argument, None where it has none (then the
    library never builds stochastic depth into this model).
    """

    library: str
    name: str
    arguments: Mapping[str, Any]
    rate_argument: str | None
    _build: Callable[[float | None], nn.Module] = field(repr=False, compare=False)
    why_no_rate: str = ""  # when rate_argument is None and the adapter knows why
    # the same constructor with other values of an argument the model may not keep (timm: img_size),
    # tried in turn when the rebuilt tree differs from the model's in shapes only
    variants: Callable[[], list[Constructor]] = field(default=list, repr=False, compare=False)  # picklable: no lambda

    @property
    def rates_from(self) -> str:
        """How a report names rates read from this constructor."""
        return {
            "timm": "timm constructor",
            "torchvision": "torchvision builder",
            "transformers": "transformers config",
        }[self.library]

    def build(self, rate: float | None = None) -> nn.Module:
        """The model with random weights, at drop-path ``rate`` (None: the constructor's default).

        Builds where the current default device says; :func:`replay` builds on the meta device.
        """
        if rate is not None and self.rate_argument is None:
            raise RebuildError(f"{self.name} takes no drop-path rate; build it with rate=None")
        return self._build(rate)

    def to_dict(self) -> dict[str, Any]:
        return {"library": self.library, "name": self.name, "arguments": dict(self.arguments)}


def _adapters():
    from . import timm, torchvision, transformers

    return (timm, torchvision, transformers)


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Constructors draw initial weights; a replay must not move the user's random streams."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters and buffers go to the meta device as modules register them; other tensors stay on CPU.

    For constructors that compute with tensors on the way (torchvision RegNet's block widths), which
    fail when every tensor is on the meta device.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module, name, parameter):
        if parameter is not None:
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register_parameter(module, name, parameter)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor.to("meta") if tensor is not None else None, persistent)

    # setattr: mypy refuses an assignment to a method
    setattr(nn.Module, "register_parameter", parameter_on_meta)  # noqa: B010
    setattr(nn.Module, "register_buffer", buffer_on_meta)  # noqa: B010
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", register_parameter)  # noqa: B010
        setattr(nn.Module, "register_buffer", register_buffer)  # noqa: B010


class _NoInitOnMeta(TorchFunctionMode):
    """Initialisation of meta tensors (random draws, fills, the in-place arithmetic of truncated-normal
    init) returns at once: meta tensors hold no values, and torch runs several of these ops on meta
    through its Python reference decompositions (up to 7 ms a call, most of a meta build). An op in
    place cannot change a shape, so nothing a replay compares is lost."""

    _SKIPPED = frozenset({
        "normal_", "uniform_", "fill_", "zero_", "erfinv_", "exponential_", "bernoulli_", "random_",
        "log_normal_", "cauchy_", "geometric_", "clamp_", "mul_", "add_", "sub_", "div_",
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", None) in self._SKIPPED and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


def meta_build(build: Callable[[], nn.Module]) -> nn.Module:
    """Run ``build`` with every tensor on the meta device; random streams and warnings untouched.

    Falls back to putting only parameters and buffers on meta when a constructor needs real tensors.
    """
    with _random_state_kept(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructors warn about deprecated names, meta init, ...
        try:
            with torch.device("meta"), _NoInitOnMeta():
                return build()
        except (NotImplementedError, RuntimeError) as error:
            if "meta" not in str(error):
                raise
        with _parameters_on_meta():
            return build()


def replay(constructor: Constructor, rate: float | None) -> nn.Module:
    """``constructor`` built on the meta device at ``rate``."""
    return meta_build(lambda: constructor.build(rate))


# --- comparing the replayed tree with the user's model ----------------------------------------------

def _is_no_op(module: nn.Module | None) -> bool:
    """Modules a drop-path rate or a dropout rate put in or take out: never part of the architecture."""
    return (
        module is None
        or type(module) is nn.Identity
        or isinstance(module, nn.modules.dropout._DropoutNd)
        or slot_lib.is_drop_path_module(module)
        or isinstance(module, slot_lib.SlotProbe)
    )


_BATCHES_TRACKED = "num_batches_tracked"


def _both_batch_norms(mine: nn.Module, theirs: nn.Module) -> bool:
    """A library's BatchNorm and a frozen copy of it put in after the build (``FrozenBatchNorm2d``)."""
    def is_batch_norm(module: nn.Module) -> bool:
        return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__.endswith(
            "FrozenBatchNorm2d")
    return is_batch_norm(mine) and is_batch_norm(theirs)


def _both_graph_modules(mine: nn.Module, theirs: nn.Module) -> bool:
    """fx makes a class per GraphModule (timm's FeatureGraphNet holds one): the traced model's name decides."""
    return isinstance(mine, fx.GraphModule) and isinstance(theirs, fx.GraphModule) and (
        type(mine).__name__ == type(theirs).__name__)


def tree_difference(model: nn.Module, rebuilt: nn.Module) -> str | None:
    """The first difference between two module trees (None: the same architecture).

    Compared: state_dict names and shapes in order, and the class of every module, except modules
    that only a rate decides (DropPath or nn.Identity, Dropout or nn.Identity).
    """
    if isinstance(model, fx.GraphModule):
        return _kept_difference(model, rebuilt)
    # a batch norm frozen after the build (HF DETR's backbones, detectron-style code) drops its
    # num_batches_tracked and changes class, not the architecture
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.endswith(_BATCHES_TRACKED)]
    theirs = [(k, tuple(v.shape)) for k, v in rebuilt.state_dict().items() if not k.endswith(_BATCHES_TRACKED)]
    if ours != theirs:
        their_shapes, our_shapes = dict(theirs), dict(ours)
        for key, shape in ours:
            if key not in their_shapes:
                return f"the rebuilt model has no {key}"
            if their_shapes[key] != shape:
                return f"{key} has shape {list(shape)}, the rebuilt model's {list(their_shapes[key])}"
        for key, _ in theirs:
            if key not in our_shapes:
                return f"the model has no {key}, the rebuilt one has"
        return "the state_dict entries come in another order"
    our_modules = {n: m for n, m in model.named_modules() if not _is_no_op(m)}
    their_modules = {n: m for n, m in rebuilt.named_modules() if not _is_no_op(m)}
    for name in our_modules.keys() | their_modules.keys():
        mine, theirs_ = our_modules.get(name), their_modules.get(name)
        same_class = mine is not None and theirs_ is not None and (
            type(mine) is type(theirs_) or _both_batch_norms(mine, theirs_) or _both_graph_modules(mine, theirs_))
        if not same_class:
            where = name or "the model"
            return (
                f"{where} is {type(mine).__name__ if mine is not None else 'missing'} here, "
                f"{type(theirs_).__name__ if theirs_ is not None else 'missing'} in the rebuilt model"
            )
    return None


def _kept_difference(model: nn.Module, rebuilt: nn.Module) -> str | None:
    """:func:`tree_difference` for an ``fx.GraphModule``, which keeps only the modules its graph uses (a
    feature extractor drops what runs after its last output): every kept entry is the rebuilt model's,
    with its shape, and the rebuilt model's entries up to the last kept one are all kept (so
    ``convnext_small``'s 27 blocks in a stage never pass for ``convnext_tiny``'s 9); every kept leaf
    module has the rebuilt model's class."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(_BATCHES_TRACKED)}
    theirs = [(k, tuple(v.shape)) for k, v in rebuilt.state_dict().items() if not k.endswith(_BATCHES_TRACKED)]
    their_shapes = dict(theirs)
    for key, shape in ours.items():
        if key not in their_shapes:
            return f"the rebuilt model has no {key}"
        if their_shapes[key] != shape:
            return f"{key} has shape {list(shape)}, the rebuilt model's {list(their_shapes[key])}"
    last = max((index for index, (key, _) in enumerate(theirs) if key in ours), default=-1)
    for key, _ in theirs[:last + 1]:
        if key not in ours:
            return f"the model has no {key}, the rebuilt one has"
    for name, mine in model.named_modules():
        if type(mine) is nn.Module or isinstance(mine, fx.GraphModule) or _is_no_op(mine):
            continue  # the containers a GraphModule keeps only as paths to its leaves
        try:
            theirs_ = rebuilt.get_submodule(name)
        except AttributeError:
            return f"the rebuilt model has no module {name}"
        if type(mine) is not type(theirs_) and not _both_batch_norms(mine, theirs_):
            return f"{name} is {type(mine).__name__} here, {type(theirs_).__name__} in the rebuilt model"
    return None


def identify_constructor(model: nn.Module, rate: float | None = None) -> Constructor:
    """The constructor that rebuilds ``model``'s architecture, checked on a meta-device replay.

    Raises :class:`RebuildError` with the reason when no library adapter knows the model or no
    candidate's replay matches its module tree.
    """
    constructor, _ = identify_and_replay(model, rate)
    return constructor


def _replays(model: nn.Module, rate: float | None) -> Iterator[tuple[Constructor, nn.Module | None, str | None]]:
    """Every library adapter's candidate constructor for ``model``, replayed at ``rate``: (candidate, the
    rebuilt model, how its module tree differs from ``model``'s, None where it is the same). A constructor
    that fails is simply not the one: (candidate, None, why it failed)."""
    for adapter in _adapters():
        for candidate in adapter.candidates(model):
            try:
                candidate, rebuilt = _replay_candidate(candidate, rate)
            except Exception as error:  # noqa: BLE001 - a constructor that fails is simply not the one
                yield candidate, None, f"{candidate.name}: {type(error).__name__}: {_first_line(error)}"
                continue
            yield candidate, rebuilt, tree_difference(model, rebuilt)


def identify_and_replay(model: nn.Module, rate: float | None) -> tuple[Constructor, nn.Module]:
    """:func:`identify_constructor`, and the matching replay at ``rate`` (the constructor's default
    when ``rate`` is None or the constructor takes no rate)."""
    if isinstance(model, fx.GraphModule):
        return _identify_graph_module(model, rate)
    reasons: list[str] = []
    for candidate, rebuilt, difference in _replays(model, rate):
        if rebuilt is None:
            reasons.append(str(difference))
            continue
        if difference is None:
            return candidate, rebuilt
        if _same_names(model, rebuilt):  # the same modules, other shapes: a variant of its arguments may fit
            for variant in candidate.variants():
                try:
                    variant, rebuilt = _replay_candidate(variant, rate)
                except Exception:  # noqa: BLE001 - not this value
                    continue
                if tree_difference(model, rebuilt) is None:
                    return variant, rebuilt
        reasons.append(f"{_call(candidate)}: {difference}")
    if not reasons:
        raise RebuildError(
            f"{type(model).__name__} is not a timm, torchvision or transformers model pathsurgeon can rebuild"
        )
    raise RebuildError(f"no library constructor rebuilds this {type(model).__name__} ({reasons[0]})")


def _identify_graph_module(model: fx.GraphModule, rate: float | None) -> tuple[Constructor, nn.Module]:
    """The constructor of the model an ``fx.GraphModule`` was traced from. A feature extractor cut before
    the stage where two builders differ (``convnext_tiny`` and ``convnext_small`` up to ``features.3``)
    fits both, and their rates differ: the one whose default rates are the extractor's own decides; else
    the extractor cannot be told apart, and the error says so."""
    fits: list[tuple[Constructor, nn.Module]] = []
    reasons: list[str] = []
    for candidate, rebuilt, difference in _replays(model, rate):
        if rebuilt is None:
            reasons.append(str(difference))
        elif difference is None:
            fits.append((candidate, rebuilt))
        else:
            reasons.append(f"{_call(candidate)}: {difference}")
    if not fits:
        if not reasons:
            raise RebuildError(f"this fx GraphModule ({type(model).__name__}) was not traced from a torchvision "
                               "model pathsurgeon can rebuild")
        raise RebuildError(f"no library constructor rebuilds the {type(model).__name__} this fx GraphModule was "
                           f"traced from ({reasons[0]})")
    slots = [name for name, m in model.named_modules() if slot_lib.is_drop_path_module(m)]
    if len({tuple(slot_rates(rebuilt, slots).values()) for _, rebuilt in fits}) > 1:
        own = [slot_lib.existing_rate(model.get_submodule(name)) for name in slots]
        fits = [(c, r) for c, r in fits if list(slot_rates(replay(c, None), slots).values()) == own] or fits
        if len(fits) > 1:
            raise RebuildError(
                f"this fx GraphModule fits {len(fits)} torchvision builders whose rates differ "
                f"({', '.join(c.name for c, _ in fits)}) and its own rates tell none apart; "
                "add drop path to the model before tracing it, or pass schedule='linear'"
            )
    return fits[0]


def _replay_candidate(candidate: Constructor, rate: float | None) -> tuple[Constructor, nn.Module]:
    """Replay at ``rate``; a constructor that turns out to refuse its rate argument loses it."""
    if candidate.rate_argument is None:
        return candidate, replay(candidate, None)
    try:
        return candidate, replay(candidate, rate)
    except TypeError as error:
        if candidate.rate_argument not in str(error):
            raise
    candidate = replace(candidate, rate_argument=None, why_no_rate=f"it refuses {candidate.rate_argument}")
    return candidate, replay(candidate, None)


def _same_names(model: nn.Module, rebuilt: nn.Module) -> bool:
    return list(model.state_dict()) == list(rebuilt.state_dict())


def _call(constructor: Constructor) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in constructor.arguments.items() if k != "config")
    return f"{constructor.name}({shown})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:160] if lines else ""


def constructor_arguments(model: nn.Module) -> dict[str, Any]:
    """``{"library", "name", "arguments"}`` to rebuild ``model``'s architecture, all plain values.

    Validated: the constructor, replayed on the meta device with these arguments, gives the model's
    state_dict names and shapes and module classes. Raises :class:`RebuildError` otherwise.
    """
    return identify_constructor(model).to_dict()


def slot_rates(rebuilt: nn.Module, slot_names: list[str]) -> dict[str, float]:
    """The drop rate the rebuilt model has at each slot name (0.0 for nn.Identity / None).

    Raises :class:`RebuildError` naming the first slot the rebuilt model has no drop-path slot at.
    """
    rates: dict[str, float] = {}
    for name in slot_names:
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = rebuilt.get_submodule(parent_name)
        except AttributeError:
            raise RebuildError(f"the rebuilt model has no module {parent_name!r}") from None
        if attr not in parent._modules and attr not in vars(parent):
            raise RebuildError(f"the rebuilt model has no slot {name}")
        value = slot_lib.read_slot(parent, attr).value
        if value is None or type(value) is nn.Identity:
            rates[name] = 0.0
        elif slot_lib.is_drop_path_module(value):
            rates[name] = slot_lib.existing_rate(value)
        else:
            raise RebuildError(f"the rebuilt model has a {type(value).__name__} at {name}, not a drop path")
    return rates

