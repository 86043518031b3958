"""Library rates: each drop-path slot's rate as the model's own library builds it, at any rate.

:func:`library_rates` identifies the constructor (see :mod:`pathsurgeon.libraries`), replays it on the
meta device at the requested rate and reads every slot's rate by name. ``schedule="auto"`` uses those
numbers; where the library cannot be asked, the recipe in ``recipes/`` decides.

Re-rating must stay cheap (a rate scheduler calls :func:`pathsurgeon.set_rate` every training step)
while a replay costs 30 to 150 ms. So on the first rate it has not seen, :class:`LibraryRates` fits
each slot's *rate law*: the exact expression the library evaluates, out of the few libraries use —

- ``zero`` (never dropped); the rate itself is ``ratio(1, 1)``;
- ``linspace32(n, k)``: ``torch.linspace(0, r, n)[k].item()`` in float32 (timm's
  ``calculate_drop_path_rates``, HF BEiT, ConvNeXt);
- ``linspace64(n, k)``: ``numpy.linspace(0, r, n)[k]`` (torchvision MaxViT), and the same stored in a
  float32 tensor (HF BiT: ``torch.Tensor(np.linspace(...))``);
- ``ratio(k, n)``: ``r * k / n`` with Python floats (timm's EfficientNet builder, torchvision Swin,
  ConvNeXt and EfficientNet, HF Swin), and the orders ``k / n * r``, ``r * (k / n)`` and ``r / n * k``;
- any of these times a simple fraction (timm NextViT splits a block's rate by its mix ratio).

A law is accepted only if it gives the replayed rate bitwise at every probe rate (and at the rates
already replayed); then every rate is computed from the laws, with no replay. Where some slot fits
no law, each new rate is replayed once and remembered. Either way ``set_rate(model, r)`` gives the
numbers a replay at ``r`` gives.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from . import slots as slot_lib
from .finder import ResidualAdd
from .libraries import Constructor, RebuildError, identify_and_replay, replay, slot_rates
from .plan import Plan, Recipe

__all__ = ["BranchRates", "LibraryRates", "RateLaw", "fit_laws", "library_rates", "rates_for"]

# Rates a law must reproduce bitwise before it is trusted; mostly not round numbers, so that
# expressions that agree by accident on a few rates (r*k/n against r/n*k) are told apart.
PROBE_RATES = (0.1, 0.3713, 0.7841, 0.2219, 0.5557, 0.9032, 0.6493, 0.0457)
_CACHE_SIZE = 256


@dataclass(frozen=True)
class RateLaw:
    """One slot's rate as a function of the constructor's rate argument (see the module docstring)."""

    kind: str  # "zero", "linspace32", "linspace64", "linspace64_float32", "ratio", "ratio_k_first",
    # "ratio_of_fraction" or "step"
    k: int = 0
    n: int = 0
    factor: float | None = None  # then the value is multiplied by it (NextViT: rate * mix_block_ratio)

    def __call__(self, rate: float, memo: dict | None = None) -> float:
        value = self._base(rate, memo)
        return value if self.factor is None else value * self.factor

    def _base(self, rate: float, memo: dict | None) -> float:
        if self.kind == "zero":
            return 0.0
        if self.kind in ("linspace32", "linspace64", "linspace64_float32"):
            memo = {} if memo is None else memo
            key = (self.kind, rate, self.n)
            if key not in memo:
                memo[key] = _linspace(self.kind, rate, self.n)
            return memo[key][self.k]
        if self.kind == "ratio":
            return rate * self.k / self.n
        if self.kind == "ratio_k_first":
            return self.k / self.n * rate
        if self.kind == "step":
            return rate / self.n * self.k
        return rate * (self.k / self.n)


def _linspace(kind: str, rate: float, n: int) -> list[float]:
    if kind == "linspace32":
        return torch.linspace(0, rate, n, device="cpu").tolist()
    import numpy

    values = numpy.linspace(0, rate, n)
    if kind == "linspace64_float32":
        return torch.tensor(values, dtype=torch.float32).tolist()
    return values.tolist()


_KINDS: tuple[tuple[str, int], ...] = (
    # (kind, offset): the law's denominator is n - offset; k is looked for near value / rate * denominator
    ("linspace32", 1),
    ("linspace64", 1),
    ("linspace64_float32", 1),
    ("ratio", 0),
    ("ratio_k_first", 0),
    ("ratio_of_fraction", 0),
    ("step", 0),
)


def fit_laws(values: dict[str, dict[float, float]], max_span: int) -> dict[str, RateLaw | None]:
    """Each slot's law: the expression that gives ``values[slot][r]`` bitwise at every rate ``r``.

    Slots of one model share their library's expression and its count of depth units (timm's
    ``linspace(0, r, N)`` with one N for the whole network), and laws with a smaller N can agree
    with the right one on a handful of rates by accident. So laws are chosen jointly: the smallest
    (expression, N) that explains every slot left; where none does, the one that explains the most,
    slots it explains times a simple fraction included (the smaller N on a tie); then the next for the
    slots left, and so on. (An expression explaining everything outright beats one that needs
    fractions: timm's EfficientNet is ``r * k / 16``, which ``numpy.linspace(0, r, 9)[k']`` times 9/10
    mimics on some rates.)
    """
    laws: dict[str, RateLaw | None] = {}
    left: dict[str, dict[float, float]] = {}
    for slot, by_rate in values.items():
        if all(v == 0.0 for v in by_rate.values()):
            laws[slot] = RateLaw("zero")
        else:  # even a slot at the full rate: r * 17 / 17 is not always r, so it is fitted with the rest
            left[slot] = by_rate
    memo: dict = {}
    law: RateLaw | None  # a candidate law, or the scaled one found (None: none)
    while left:
        candidates: list[tuple[str, int, dict[str, RateLaw]]] = []  # (kind, n, slots it explains), n ascending
        for span in range(1, max_span + 1):
            for kind, offset in _KINDS:
                fitted = {}
                for slot, by_rate in left.items():
                    probe = max(by_rate)
                    k = round(by_rate[probe] / probe * span)
                    if not 0 < k <= span:
                        continue
                    law = RateLaw(kind, k, span + offset)
                    if all(law(r, memo) == v for r, v in by_rate.items()):
                        fitted[slot] = law
                if fitted:
                    candidates.append((kind, span + offset, fitted))
            if any(len(fitted) == len(left) for _, _, fitted in candidates):
                break  # every slot left is explained; a larger N cannot explain more
        whole = [fitted for _, _, fitted in candidates if len(fitted) == len(left)]
        best = whole[0] if whole else _best_candidate(candidates, left, memo)
        if not best:
            break
        laws.update(best)
        left = {slot: v for slot, v in left.items() if slot not in best}
        # before another expression is looked for: the slots left may be the one found times a
        # fraction, which a larger N can mimic on the probe rates by accident
        found = [key for key, _ in Counter(
            (law.kind, law.n) for law in laws.values() if law is not None and law.kind != "zero"
        ).most_common()]
        for slot, by_rate in list(left.items()):
            law = _scaled_law(by_rate, found, memo)
            if law is not None:
                laws[slot] = law
                del left[slot]
    laws.update({slot: None for slot in left})
    return laws


def _best_candidate(
    candidates: list[tuple[str, int, dict[str, RateLaw]]], left: dict[str, dict[float, float]], memo: dict
) -> dict[str, RateLaw]:
    """Where no (expression, N) explains every slot: the one that explains the most, counting slots it
    explains times a simple fraction; the smaller N on a tie.

    Counting the fractions matters: NextViT's rates are ``linspace(0, r, 40)[k]`` times 3/4 or 1/4, and
    ``linspace(0, r, 157)`` holds every quarter-step value *exactly in real arithmetic*, so N=157
    "explains" the 1/4 slots outright and would win on a plain count, agreeing with the library bitwise
    on the probe rates but not on every rate (float32 rounds the two expressions differently).
    """
    if not candidates:
        return {}
    most = max(len(fitted) for _, _, fitted in candidates)
    best: dict[str, RateLaw] = {}
    for kind, n, fitted in candidates:
        if 2 * len(fitted) < most:  # far behind: no fraction rescue makes it the best
            continue
        explained = dict(fitted)
        for slot, by_rate in left.items():
            if slot not in explained and (law := _scaled_law(by_rate, [(kind, n)], memo)) is not None:
                explained[slot] = law
        if len(explained) > len(best):
            best = explained
    return best


def _scaled_law(by_rate: dict[float, float], found: list[tuple[str, int]], memo: dict) -> RateLaw | None:
    """A law of the model's own (expression, N), times a simple fraction (NextViT's mix_block_ratio)."""
    from fractions import Fraction

    probe = max(by_rate)
    for kind, n in found:
        offset = dict(_KINDS)[kind]
        for k in range(1, n - offset + 1):
            base = RateLaw(kind, k, n)(probe, memo)
            if base == 0.0:
                continue
            factor = float(Fraction(by_rate[probe] / base).limit_denominator(16))
            law = RateLaw(kind, k, n, factor)
            if 0.0 < factor < 1.0 and all(law(r, memo) == v for r, v in by_rate.items()):
                return law
    return None


class LibraryRates:
    """Per-slot rates from the model's library at any rate; laws where they fit, replays where not."""

    def __init__(self, constructor: Constructor, slots: list[str], known: dict[float, dict[str, float]]) -> None:
        self.constructor = constructor
        self.slots = list(slots)
        self._replayed: OrderedDict[float, dict[str, float]] = OrderedDict(known)
        self._laws: dict[str, RateLaw | None] | None = None  # None: not fitted yet

    @property
    def rates_from(self) -> str:
        return self.constructor.rates_from

    def __call__(self, rate: float) -> dict[str, float]:
        """``{slot: rate}`` as the library builds them at ``rate``."""
        if rate in self._replayed:
            self._replayed.move_to_end(rate)
            return dict(self._replayed[rate])
        if self._laws is None:
            self._laws = self._fit()
        if all(law is not None for law in self._laws.values()):
            memo: dict = {}
            laws = cast(dict[str, RateLaw], self._laws)  # no None: checked just above
            return {slot: law(rate, memo) for slot, law in laws.items()}
        rates = self._replay(rate)
        self._replayed[rate] = rates
        while len(self._replayed) > _CACHE_SIZE:
            self._replayed.popitem(last=False)
        return dict(rates)

    @property
    def laws(self) -> dict[str, RateLaw | None]:
        """Each slot's fitted law (None where none fits); fits them on first use."""
        if self._laws is None:
            self._laws = self._fit()
        return dict(self._laws)

    def _replay(self, rate: float) -> dict[str, float]:
        return slot_rates(replay(self.constructor, rate), self.slots)

    def _fit(self) -> dict[str, RateLaw | None]:
        for probe in PROBE_RATES:
            if probe not in self._replayed:
                self._replayed[probe] = self._replay(probe)
        samples = {r: v for r, v in self._replayed.items() if r > 0}
        return fit_laws({slot: {r: v[slot] for r, v in samples.items()} for slot in self.slots},
                        max_span=4 * len(self.slots) + 64)


@dataclass
class RateSource:
    """Where ``schedule="auto"`` takes its rates from: the library (``rates``), or why not (``note``)."""

    rates: LibraryRates | None
    note: str = ""
    # hooked branches' blocks -> the library's one drop-path slot under each (see library_rates' blocks)
    block_slots: dict[str, str] = field(default_factory=dict)


def _without_adapters(model: nn.Module) -> nn.Module:
    """``model`` as its library built it, where PEFT (LoRA first, then ``add``) wrapped its layers: a copy
    of the module tree, sharing every tensor, with each PEFT layer replaced by its ``base_layer``, so that
    the rebuilt tree is compared with the library's own (``fc1.weight``, not ``fc1.base_layer.weight``).
    ``model`` itself where no PEFT layer is inside."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return model
    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer) and name]
    if not wrapped:
        return model
    import copy

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo=dict(shared))
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        owner = view.get_submodule(parent) if parent else view
        layer = getattr(owner, child, None)
        if isinstance(layer, BaseTunerLayer):  # not already gone with a wrapped parent
            setattr(owner, child, layer.get_base_layer())
    return view


def library_rates(model: nn.Module, rate: float, slot_names: list[str],
                  blocks: list[str] | None = None) -> RateSource:
    """Ask ``model``'s library for the rates of ``slot_names`` at ``rate``.

    ``blocks``: the blocks of hooked branches. Where the model holds no drop-path slot under a block (a
    traced model keeps none where the library left ``None`` at rate 0), the block is asked for the one
    drop-path slot the rebuilt model has under it (``RateSource.block_slots``); where any block holds a
    slot of its own (placed off the branch, as timm's ResNeSt's), or the rebuilt model has none or
    several under it, the library is not asked at all (``rates`` None).

    Returns a :class:`RateSource` whose ``rates`` is None (with the reason in ``note``) when the
    library cannot be asked: no adapter knows the model, the rebuilt tree differs (other constructor
    arguments), the constructor takes no rate, or it has no drop-path slot where the model has one.
    """
    try:
        constructor, rebuilt = identify_and_replay(_without_adapters(model), rate)
    except RebuildError as error:
        return RateSource(None, str(error))
    except Exception as error:  # noqa: BLE001 - asking the library must never break add: say why, use the recipe
        return RateSource(None, f"asking the model's library failed ({type(error).__name__}: {error}"[:300] + ")")
    if constructor.rate_argument is None:
        why = f": {constructor.why_no_rate}" if constructor.why_no_rate else ""
        return RateSource(None, f"{constructor.rates_from} {constructor.name} takes no drop-path rate{why}")
    block_slots = _lost_slots(model, rebuilt, blocks or [])
    if not (slot_names or block_slots) or (blocks and not block_slots):
        return RateSource(None, f"{constructor.rates_from} {constructor.name} takes a drop-path rate, but the "
                                "residual branches found pass through none of its drop-path slots")
    slot_names = list(dict.fromkeys([*slot_names, *block_slots.values()]))
    try:
        rates = slot_rates(rebuilt, slot_names)
    except RebuildError as error:
        return RateSource(None, f"{constructor.rates_from} {constructor.name}: {error}")
    return RateSource(LibraryRates(constructor, slot_names, {rate: rates}), block_slots=block_slots)


def _lost_slots(model: nn.Module, rebuilt: nn.Module, blocks: list[str]) -> dict[str, str]:
    """``{block: the rebuilt model's one drop-path slot under it}`` for every block of ``blocks``; empty
    where any has a slot in ``model`` (the branch was hooked because the slot lies off it, not because
    it was lost) or has none or several in ``rebuilt`` (which one the branch passes through is unknown)."""
    found: dict[str, str] = {}
    if not blocks:
        return found
    own = [slot.name for slot in slot_lib.find_slots(model)]
    theirs = [slot.name for slot in slot_lib.find_slots(rebuilt)]
    for block in dict.fromkeys(blocks):
        inside = [name for name in theirs if name.startswith(f"{block}.")]
        if len(inside) != 1 or any(name.startswith(f"{block}.") for name in own):
            return {}
        found[block] = inside[0]
    return found


@dataclass
class BranchRates:
    """The rates of the chosen branches under a schedule, and where they came from."""

    values: list[float]
    rates_from: str
    note: str = ""
    library: LibraryRates | None = None
    library_asked: bool = False
    # the library's drop-path slots on no chosen branch, with their rates (add lists each as left alone)
    off_branch: dict[str, float] = field(default_factory=dict)
    # hooked branches' blocks -> the library slot whose rate they take (set_rate asks the library for it)
    block_slots: dict[str, str] = field(default_factory=dict)


def rates_for(
    model: nn.Module,
    slot_calls: list[str],
    chosen: list[ResidualAdd],
    plan: Plan,
    rate: float | None,
    schedule: str | list[float],
    recipe: Recipe,
) -> BranchRates:
    """``auto``: the library's own per-slot rates where it can be asked, else the recipe; others: the plan.

    ``slot_calls``: the drop-path slots the model calls (the library is asked about each of them).
    """
    planned = [plan.rate_of(a.block) for a in chosen]
    if schedule != "auto":
        return BranchRates(planned, "explicit list" if isinstance(schedule, list) else f"{schedule} schedule")
    assert rate is not None  # validate_schedule refuses schedule 'auto' without a rate
    fallback = "recipe" if recipe.entry else "linear over found units"
    if any(a.slot is None for a in chosen):  # hooked branches: the slot under each block, if one, is read
        hooked = library_rates(model, rate, [a.slot for a in chosen if a.slot is not None],
                               blocks=[a.block for a in chosen if a.slot is None])
        if hooked.rates is None:
            return BranchRates(planned, fallback, hooked.note, library_asked=True)
        by_slot = hooked.rates(rate)
        values = [by_slot[a.slot if a.slot is not None else hooked.block_slots[a.block]] for a in chosen]
        return BranchRates(values, hooked.rates.rates_from, library=hooked.rates, library_asked=True,
                           block_slots=hooked.block_slots)
    called = list(dict.fromkeys(slot_calls))
    source = library_rates(model, rate, called)
    if source.rates is None:
        return BranchRates(planned, fallback, source.note, library_asked=True)
    by_slot = source.rates(rate)
    mine = {a.slot for a in chosen}
    off_branch = {slot: value for slot, value in by_slot.items() if value > 0 and slot not in mine}
    values = [by_slot[cast(str, a.slot)] for a in chosen]  # each has a slot: checked above
    return BranchRates(values, source.rates.rates_from, library=source.rates,
                       library_asked=True, off_branch=off_branch)
