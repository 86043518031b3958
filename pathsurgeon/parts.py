"""Parts: the library models inside a model, each planned as if :func:`pathsurgeon.add` had been called
on it alone.

A composite is built by one library out of models another library (or a sub-config) built: a timm
model at open_clip's ``visual.trunk`` or at segmentation_models_pytorch's ``encoder.model``, a Hugging
Face backbone built from ``config.backbone_config`` (``load_backbone``), towers built from
``vision_config`` / ``text_config``, a torchvision model inside a user's module. Each such part is a
``(module path, library, where it came from)`` triple, as ``load_backbone`` names a backbone by its
sub-config. The rest of the pipeline runs per part: the part's own selection of residual adds, its
own depth units and schedule, its own library's rates (replayed from the part's constructor or
sub-config), so that no schedule crosses a part boundary.

Placement by default (the principle: drop path where the part's library puts it):

- a model that is itself a library model with no library model inside is one part, the model itself:
  exactly what ``add`` did before parts existed;
- a library part inside a composite gets drop path at its library's rates (linear over its own depth
  where its library has none, as for a whole model);
- a text decoder or language model inside a captioning or vision-language model (the ``decoder`` of a
  VisionEncoderDecoder, the ``language_model`` of a Llava or PaliGemma) is a Hugging Face part that no
  vision library gives drop path: left alone by default, as regions are, and brought in by ``include=``
  patterns that name its blocks (then its library's rates, linear over its depth where it has none);
- residual blocks outside every library part (decoders, necks, prompt encoders, fusion blocks, heads)
  are grouped into *regions*, one per outermost module that holds no library part; no library gives
  them drop path, so they are left alone (listed in ``Report.left_alone`` with the reason) unless
  ``include=`` patterns name their blocks; then each region gets its own linear schedule;
- a model with no library part at all is one part, the model itself, linear over its depth.

>>> [p.path for p in library_parts(smp.Unet("tu-resnet18", encoder_weights=None))]
['encoder.model']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import overload

from torch import fx, nn

from .config import selected
from .errors import InvalidScheduleError
from .finder import ResidualAdd, Selection, select
from .graph import GraphView
from .plan import Plan, Recipe, make_plan, recipe_for
from .rates import BranchRates, LibraryRates, library_rates, rates_for
from .report import LeftAlone

__all__ = [
    "Part",
    "PartPlan",
    "PartSelection",
    "PartState",
    "bring_in",
    "capturable_parts",
    "detection_bodies",
    "library_parts",
    "part_module",
    "part_of",
    "plan_part",
    "plan_parts",
    "prefixed",
    "relative",
    "select_by_part",
    "split_units",
    "surgered_part_by_part",
    "under",
    "unreached_modules",
]


@dataclass(frozen=True)
class Part:
    """One part: ``path`` (module path, '' for the model itself), ``library`` ('timm', 'transformers',
    'torchvision'; None where no library built it), ``source`` (how it was found: 'the model', 'timm
    model', 'torchvision model', the sub-config attribute such as 'backbone_config', or 'region'),
    ``default`` (changed by default; False for regions and language models, which ``include=`` brings in)."""

    path: str
    library: str | None
    source: str
    default: bool = True

    @property
    def is_region(self) -> bool:
        return self.source == "region"

    @property
    def name(self) -> str:
        """How reports name the part."""
        return self.path or "(the model)"


def under(name: str | None, path: str) -> bool:
    """True when module ``name`` is ``path`` or lies inside it ('' holds everything)."""
    return name is not None and (not path or name == path or name.startswith(path + "."))


@overload
def relative(name: str, path: str) -> str: ...
@overload
def relative(name: str | None, path: str) -> str | None: ...
def relative(name: str | None, path: str) -> str | None:
    """``name`` seen from the module at ``path`` (``encoder.model.layer1.0`` → ``layer1.0``)."""
    if name is None or not path:
        return name
    return "" if name == path else name[len(path) + 1:]


def part_of(name: str, parts: list[Part]) -> Part | None:
    """The innermost part that holds module ``name``."""
    holders = [p for p in parts if under(name, p.path)]
    return max(holders, key=lambda p: len(p.path) + (1 if p.path else 0), default=None)


# --- finding the library models in the module tree ---------------------------------------------------


def _is_timm_model(module: nn.Module) -> bool:
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    return type(module).__module__.startswith("timm.") and isinstance(cfg, dict) and bool(cfg.get("architecture"))


def _is_transformers_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def _is_language_model(module: nn.Module, parent_config: object, root: nn.Module) -> bool:
    """A Hugging Face text decoder or language model inside a composite: its config marks it a decoder
    (``is_decoder``: VisionEncoderDecoder's GPT-2 or BERT decoder), it generates text itself
    (``can_generate()``: a causal LM), or it is the ``text_config`` model of a composite that generates
    text (Llava, PaliGemma); a text *encoder* (CLIP's, Grounding DINO's BERT) is none of these. Not
    ``isinstance(GenerationMixin)``: in transformers 4.x every model inherits it, a ViT too."""
    config = getattr(module, "config", None)
    if getattr(config, "is_decoder", False) is True or _generates(module):
        return True
    return (_generates(root) and parent_config is not None
            and getattr(parent_config, "text_config", None) is config)


def _generates(module: nn.Module) -> bool:
    can_generate = getattr(module, "can_generate", None)
    try:
        return callable(can_generate) and can_generate() is True
    except Exception:  # a model's own can_generate that cannot answer for it: not a generator we know
        return False


def _holds_timm_model(module: nn.Module) -> bool:
    """Hugging Face ``TimmWrapper*`` and ``TimmBackbone``: the timm model inside is the part."""
    return type(module).__name__.startswith("Timm") and any(_is_timm_model(m) for m in module.children())


_TORCHVISION_CLASSES: set[type] | None = None


def _torchvision_classes() -> set[type]:
    """The classes torchvision's classification builders return (ResNet, SwinTransformer, ...)."""
    global _TORCHVISION_CLASSES
    if _TORCHVISION_CLASSES is None:
        import typing

        import torchvision

        classes = set()
        for name in torchvision.models.list_models(module=torchvision.models):
            builder = torchvision.models.get_model_builder(name)
            try:
                returned = typing.get_type_hints(builder).get("return")
            except Exception:  # noqa: BLE001 - an unresolvable annotation: not a class we can use
                continue
            if isinstance(returned, type):
                classes.add(returned)
        _TORCHVISION_CLASSES = classes
    return _TORCHVISION_CLASSES


def _is_torchvision_model(module: nn.Module) -> bool:
    """A torchvision classification model, or an ``fx.GraphModule`` traced from one (a feature
    extractor from ``create_feature_extractor``, which keeps the model's module names)."""
    from .libraries.torchvision import original_class

    if not type(module).__module__.startswith("torchvision.models") and not isinstance(module, fx.GraphModule):
        return False
    return original_class(module) in _torchvision_classes()


def _sub_config_name(config: object, sub: object) -> str | None:
    """The attribute of ``config`` that holds ``sub`` (``backbone_config``, ``vision_config``, ...)."""
    if config is None:
        return None
    for key, value in vars(config).items():
        if value is sub:
            return key
    return None


def library_parts(model: nn.Module) -> list[Part]:
    """The library parts of ``model``, outermost first (regions are added by :func:`select_by_part`).

    A timm, torchvision or plain Hugging Face model is one part, itself. Inside anything else (a
    Hugging Face composite, open_clip, segmentation_models_pytorch, a user's module): every outermost
    timm model, torchvision classification model, and Hugging Face model built from a config other
    than its parent's (a sub-config); HF ``TimmWrapper`` / ``TimmBackbone`` stand for the timm model
    they hold. None found: the model itself, no library. A text decoder or language model
    (:func:`_is_language_model`) is a part left alone by default (``default=False``).
    """
    if _is_timm_model(model) or _is_torchvision_model(model):
        return [Part("", "timm" if _is_timm_model(model) else "torchvision", "the model")]
    root_config = getattr(model, "config", None) if _is_transformers_model(model) else None
    found: list[Part] = []

    def walk(module: nn.Module, path: str, config: object) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if _is_timm_model(child):
                found.append(Part(full, "timm", "timm model"))
            elif _is_torchvision_model(child):
                found.append(Part(full, "torchvision", "torchvision model"))
            elif _holds_timm_model(child):
                walk(child, full, getattr(child, "config", config))
            elif _is_transformers_model(child) and getattr(child, "config", None) is not config:
                source = _sub_config_name(config, child.config) or f"{type(child.config).__name__}"
                found.append(Part(full, "transformers", source, default=not _is_language_model(child, config, model)))
            else:
                walk(child, full, config)

    walk(model, "", root_config)
    if found:
        return found
    return [Part("", "transformers" if root_config is not None else None, "the model")]


def detection_bodies() -> tuple[type, ...]:
    """The classes torchvision builds a detector's backbone trunk from: the ``IntermediateLayerGetter``
    over a ResNet's or MobileNetV3's stages (R-CNNs, RetinaNet, FCOS), SSD's VGG and SSDlite's
    MobileNetV3 feature extractors."""
    try:
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
        from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet
    except ImportError:  # no torchvision: only library parts
        return ()
    return (IntermediateLayerGetter, SSDFeatureExtractorVGG, SSDLiteFeatureExtractorMobileNet)


def capturable_parts(model: nn.Module) -> list[str]:
    """Where a whole model cannot be captured (a torchvision detector: data-dependent box handling), the
    outermost parts that can be surgered on their own: a torchvision detection backbone's trunk
    (:func:`detection_bodies`), and every library
    part :func:`library_parts` finds inside (a timm or Hugging Face backbone). The rest is left alone."""
    bodies = detection_bodies()
    found: list[str] = []

    def walk(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if isinstance(child, bodies):
                found.append(full)
            else:
                walk(child, full)

    walk(model, "")
    for part in library_parts(model):
        if part.path and part.default and not any(under(part.path, held) for held in found):
            found.append(part.path)
    return found


def surgered_part_by_part(model: nn.Module, surgered: list[str]) -> bool:
    """Whether the surgery records in ``model``'s tree (at the ``surgered`` module paths) are those
    :func:`pathsurgeon.add` leaves on a model it could not capture whole: one on each of its
    :func:`capturable_parts`, none on the model."""
    return bool(surgered) and "" not in surgered and set(surgered) == set(capturable_parts(model))


# --- selecting the residual adds part by part ---------------------------------------------------------


@dataclass
class PartSelection:
    """The adds to change, part by part (in execution order), and every part, regions included."""

    selection: Selection  # all parts together (what the rest of the pipeline reads)
    groups: list[tuple[Part, list[ResidualAdd]]]  # the parts with chosen adds, each with its own
    parts: list[Part]  # every part, regions included

    @property
    def chosen(self) -> list[ResidualAdd]:
        return self.selection.chosen

    @property
    def left_alone(self) -> list[LeftAlone]:
        return self.selection.left_alone

    @property
    def blocks(self) -> list[str]:
        return self.selection.blocks

    @property
    def composite(self) -> bool:
        """True unless the model is one part, itself (then add behaves as it did before parts)."""
        return [p.path for p in self.parts] != [""]


def _towers(view: GraphView, chosen: list[ResidualAdd]) -> list[tuple[Part, list[ResidualAdd]]]:
    """A model no library knows, split into towers: top-level children whose residual blocks do not
    feed one another (open_clip's own image ``visual`` and text ``transformer``), each its own part.
    Empty where some child's blocks feed another's (stages of one network: one depth) or a residual
    add sits at the top."""
    groups: dict[str, list[ResidualAdd]] = {}
    for add in chosen:
        if not add.block:
            return []
        groups.setdefault(add.block.split(".")[0], []).append(add)
    if len(groups) < 2:
        return []
    position, ancestors = view.position, view.ancestors
    bits = {name: sum(1 << position[a.node] for a in adds) for name, adds in groups.items()}
    for name, adds in groups.items():
        others = sum(b for other, b in bits.items() if other != name)
        if any(ancestors[a.node] & others for a in adds):
            return []
    return [(Part(name, None, "tower"), adds) for name, adds in groups.items()]


def _region(block: str, library: list[Part]) -> str:
    """The outermost module that holds ``block`` and no library part ('' at the top)."""
    pieces = block.split(".") if block else []
    for end in range(1, len(pieces) + 1):
        candidate = ".".join(pieces[:end])
        if not any(under(p.path, candidate) for p in library):
            return candidate
    return ""


def bring_in(part: Part, adds: list[ResidualAdd]) -> list[str]:
    """The ``include=`` patterns that name every block of ``part`` with residual adds (its path itself
    too, where the part's own forward does the add: UperNet's ``decode_head``, whose blocks
    ``decode_head.*`` does not name)."""
    if not part.path:
        return ["*"]
    return ([part.path] if any(a.block == part.path for a in adds) else []) + [f"{part.path}.*"]


def select_by_part(
    view: GraphView,
    adds: list[ResidualAdd],
    parts: list[Part],
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    model_name: str = "the model",
) -> PartSelection:
    """:func:`~pathsurgeon.finder.select` run on each part's adds as if the part were the whole model.

    Adds outside every library part fall into regions; a region is selected only where an ``include``
    pattern names one of its blocks, else its adds are left alone with the reason.
    """
    if [p.path for p in parts] == [""]:  # one part, the model itself: the selection add always made
        selection = select(view, adds)
        towers = _towers(view, selection.chosen) if parts[0].library is None else []
        if towers:
            return PartSelection(selection, towers, [part for part, _ in towers])
        group = [(parts[0], selection.chosen)] if selection.chosen else []
        return PartSelection(selection, group, parts)
    def named(block: str) -> bool:  # by an include pattern: how a part left alone by default is brought in
        return selected(block, include, exclude, no_include_selects=False)

    # a language model is left alone unless an include pattern names one of its blocks
    parts = [dataclasses.replace(p, default=True) if not p.default and any(
        named(a.block) for a in adds if part_of(a.block, parts) is p) else p for p in parts]
    by_part: dict[str, list[ResidualAdd]] = {}
    regions: dict[str, Part] = {}
    for add in adds:
        holder = part_of(add.block, parts)
        if holder is None:
            path = _region(add.block, parts)
            brought_in = any(named(a.block) for a in adds
                             if part_of(a.block, parts) is None and _region(a.block, parts) == path)
            holder = regions.setdefault(path, Part(path, None, "region", default=brought_in))
        by_part.setdefault(holder.path, []).append(add)
    every = parts + list(regions.values())
    left_alone: list[LeftAlone] = []
    chosen: list[ResidualAdd] = []
    groups: list[tuple[Part, list[ResidualAdd]]] = []
    for part in list(every):
        mine = by_part.get(part.path, [])
        if not mine:
            continue
        if not part.default:
            # the hint names only adds include= would truly bring in (UperNet's FPN sum is none)
            trial = select(view, mine)
            left_alone += trial.left_alone
            if not trial.chosen:  # nothing to bring in: no part left alone to report, no hint
                every[every.index(part)] = dataclasses.replace(part, default=True)
                continue
            what = (f"which is no library model (a decoder, neck, head or fusion block of {model_name}); no library"
                    if part.is_region else f"a text decoder / language model ({part.source}); no vision library")
            for block in dict.fromkeys(a.block for a in trial.chosen):
                left_alone.append(LeftAlone(block, (
                    f"in {part.name}, {what} gives it drop path; include={bring_in(part, trial.chosen)} "
                    "brings it in with its own linear schedule"
                )))
            continue
        selection = select(view, mine)
        left_alone += selection.left_alone
        if selection.chosen:
            groups.append((part, selection.chosen))
            chosen += selection.chosen
    position = view.position
    chosen.sort(key=lambda a: position[a.node])
    groups.sort(key=lambda group: position[group[1][0].node])
    return PartSelection(Selection(chosen, left_alone), groups, every)


# --- planning each part as a whole model --------------------------------------------------------------


@dataclass
class PartPlan:
    """One part's plan: its depth units and rates (in the model's own names) and where they came from."""

    part: Part
    plan: Plan
    rates: BranchRates
    recipe: Recipe
    chosen: list[ResidualAdd]

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(a.block for a in self.chosen))


def _relative_add(add: ResidualAdd, path: str) -> ResidualAdd:
    if not path:
        return add
    return dataclasses.replace(add, block=relative(add.block, path), slot=relative(add.slot, path),
                               producer=relative(add.producer, path))


def prefixed(plan: Plan, path: str) -> Plan:
    """A part's plan (in the part's names) in the names of the model that holds the part at ``path``."""
    if not path:
        return plan

    def full(name: str) -> str:
        return f"{path}.{name}" if name else path

    return Plan([full(u) for u in plan.units], list(plan.rates),
                {full(b): full(u) for b, u in plan.unit_of_block.items()}, {full(b) for b in plan.zero_blocks},
                plan.schedule, plan.formula)


def part_module(model: nn.Module, part: Part) -> nn.Module:
    return model.get_submodule(part.path) if part.path else model


def part_recipe(model: nn.Module, part: Part) -> Recipe:
    """The part's library's recipe; a region's is the plain linear schedule over its own depth."""
    return Recipe() if part.library is None and part.path else recipe_for(part_module(model, part))


def split_schedule(
    model: nn.Module, groups: list[tuple[Part, list[ResidualAdd]]], schedule: str | list[float]
) -> list[str | list[float]]:
    """Each part's schedule: a string applies to every part; an explicit list is split over the parts
    in execution order, each taking as many rates as it has depth units."""
    if isinstance(schedule, str) or len(groups) == 1:
        return [schedule] * len(groups)
    units = []
    for part, chosen in groups:
        blocks = list(dict.fromkeys(relative(a.block, part.path) for a in chosen))
        units.append((part, len(make_plan(part_module(model, part), blocks, 0.0, "uniform",
                                          part_recipe(model, part)).units)))
    return _split_list(schedule, units)


def _split_list(schedule: list[float], units: list[tuple[Part, int]]) -> list[str | list[float]]:
    """An explicit schedule list cut into one slice per part, in order, each as long as the part's
    depth units; the one error when the lengths do not add up (at ``add`` and at ``set_rate``)."""
    total = sum(count for _, count in units)
    if total != len(schedule):
        shown = ", ".join(f"{part.name}: {count}" for part, count in units)
        raise InvalidScheduleError(
            f"schedule has {len(schedule)} rates but the model's parts have {total} depth units ({shown}); "
            f"pass {total} rates, the parts' in execution order (pathsurgeon.find(model) lists the units)"
        )
    pieces: list[str | list[float]] = []
    start = 0
    for _, count in units:
        pieces.append(list(schedule[start:start + count]))
        start += count
    return pieces


def plan_part(
    model: nn.Module,
    part: Part,
    chosen: list[ResidualAdd],
    slot_calls: list[str],
    rate: float | None,
    schedule: str | list[float],
) -> PartPlan:
    """Plan ``part`` exactly as :func:`pathsurgeon.add` plans a whole model: its own depth units, its
    own recipe, its own library's rates (asked of the part's module, rebuilt from its own constructor
    or sub-config); a region's rates are linear over its own depth."""
    module = part_module(model, part)
    mine = [_relative_add(a, part.path) for a in chosen]
    blocks = list(dict.fromkeys(a.block for a in mine))
    recipe = part_recipe(model, part)
    plan = make_plan(module, blocks, rate, schedule, recipe)
    if part.library is None and part.path:
        planned = [plan.rate_of(a.block) for a in mine]
        rates_from = ("explicit list" if isinstance(schedule, list) else
                      "linear over found units" if schedule == "auto" else f"{schedule} schedule")
        rates = BranchRates(planned, rates_from, "no library builds this part" if schedule == "auto" else "",
                            library_asked=True)
    else:
        calls = [relative(s, part.path) for s in slot_calls if under(s, part.path)]
        rates = rates_for(module, calls, mine, plan, rate, schedule, recipe)
        if part.path:
            rates.off_branch = {f"{part.path}.{slot}": value for slot, value in rates.off_branch.items()}
            rates.block_slots = {f"{part.path}.{block}": f"{part.path}.{slot}"
                                 for block, slot in rates.block_slots.items()}
    return PartPlan(part, prefixed(plan, part.path), rates, recipe, list(chosen))


def plan_parts(
    model: nn.Module, selection: PartSelection, slot_calls: list[str], rate: float | None,
    schedule: str | list[float],
) -> list[PartPlan]:
    """:func:`plan_part` for every part with chosen adds, in execution order."""
    schedules = split_schedule(model, selection.groups, schedule)
    return [plan_part(model, part, chosen, slot_calls, rate, part_schedule)
            for (part, chosen), part_schedule in zip(selection.groups, schedules, strict=True)]


@dataclass
class PartState:
    """What :func:`pathsurgeon.set_rate` needs of one planned part (kept in the model's record)."""

    part: Part
    blocks: list[str]  # in the model's names, execution order
    recipe: Recipe
    units: int  # how many rates of an explicit schedule list the part takes
    library: LibraryRates | None = None
    library_asked: bool = False
    # hooked branches' blocks -> the library slot whose rate each takes (the model's names; see rates_for)
    block_slots: dict[str, str] = field(default_factory=dict)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("block_slots", {})  # pickled by pathsurgeon <= 0.3.0

    @classmethod
    def of(cls, planned: PartPlan) -> PartState:
        return cls(planned.part, planned.blocks, planned.recipe, len(planned.plan.units),
                   planned.rates.library, planned.rates.library_asked, dict(planned.rates.block_slots))

    def plan(self, model: nn.Module, rate: float | None, schedule: str | list[float]) -> Plan:
        """The part's plan at ``rate`` under ``schedule``, in the model's names."""
        module = part_module(model, self.part)
        blocks = [relative(b, self.part.path) for b in self.blocks]
        return prefixed(make_plan(module, blocks, rate, schedule, self.recipe), self.part.path)

    def library_rates(self, model: nn.Module, rate: float, slots: list[str]) -> dict[str, float] | None:
        """The part's library's rate of every slot in ``slots`` (the model's names) at ``rate``; None
        where the library cannot be asked (asked at most once)."""
        if self.part.library is None and self.part.path:
            return None
        if not self.library_asked:
            self.library = library_rates(part_module(model, self.part), rate,
                                         [relative(s, self.part.path) for s in slots]).rates
            self.library_asked = True
        if self.library is None:
            return None
        path = self.part.path
        return {(f"{path}.{slot}" if path else slot): value for slot, value in self.library(rate).items()}


def split_units(states: list[PartState], schedule: str | list[float]) -> list[str | list[float]]:
    """An explicit schedule list split over recorded parts (see :func:`split_schedule`)."""
    if isinstance(schedule, str) or len(states) == 1:
        return [schedule] * len(states)
    return _split_list(schedule, [(state.part, state.units) for state in states])


def unreached_modules(model: nn.Module, view: GraphView) -> list[str]:
    """The outermost modules holding parameters that no node of a captured graph runs in.

    A graph captured by running the model (torch.export) holds only what the example inputs ran: a
    SAM's mask decoder takes another path with a point prompt, a CLIP's text tower does not run on
    an image alone. Residual branches inside such modules cannot be found; the report says so.
    """
    ran = {name for stack in view.module_stack.values() for name in stack}
    unreached: list[str] = []
    for name, module in model.named_modules():
        # a residual add belongs to a module whose forward calls a child with parameters: leaves
        # (an embedding whose weight its parent reads) and containers without a forward cannot hold one
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            continue
        if not any(any(True for _ in child.parameters()) for child in module.children()):
            continue
        if name in ran or any(r.startswith(name + ".") for r in ran):
            continue
        if any(under(name, outer) for outer in unreached):
            continue
        unreached.append(name)
    return _outermost(unreached, ran)


def _outermost(names: list[str], ran: set[str]) -> list[str]:
    """Where every parameter-holding module inside a parent went unrun, name the parent instead."""
    result = list(names)
    changed = True
    while changed:
        changed = False
        parents = {n.rpartition(".")[0] for n in result if "." in n}
        for parent in parents:
            if parent in ran or any(r.startswith(parent + ".") for r in ran):
                continue
            result = [n for n in result if not under(n, parent)] + [parent]
            changed = True
    return sorted(result)
