"""Library rates: each drop-path slot's rate as the model's own library builds it, at any rate.

:func:`library_rates` identifies the constructor (see :mod:`pathsurgeon.libraries`), replays it on the
meta device at the requested rate and reads every slot's rate by name. ``schedule="auto"`` uses those
numbers; where the library cannot be asked, the recipe in ``recipes/`` decides.

Re-rating must stay cheap (a rate scheduler calls :func:`pathsurgeon.set_rate` every training step)
while a replay costs 30 to 150 ms. So on the first rate it has not seen, :class:`LibraryRates` fits
each slot's *rate law*: the exact expression the library evaluates, out of the few libraries use —

- ``zero`` (never dropped) and ``rate`` (constant, the rate itself);
- ``linspace32(n, k)``: ``torch.linspace(0, r, n)[k].item()`` in float32 (timm's
  ``calculate_drop_path_rates``, HF BEiT, ConvNeXt);
- ``linspace64(n, k)``: ``numpy.linspace(0, r, n)[k]`` (torchvision MaxViT);
- ``ratio(k, n)``: ``r * k / n`` with Python floats (timm's EfficientNet builder, torchvision Swin,
  ConvNeXt and EfficientNet, HF Swin), and the orders ``k / n * r`` and ``r * (k / n)``.

A law is accepted only if it gives the replayed rate bitwise at every probe rate (and at the rates
already replayed); then every rate is computed from the laws, with no replay. Where some slot fits
no law, each new rate is replayed once and remembered. Either way ``set_rate(model, r)`` gives the
numbers a replay at ``r`` gives.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .libraries import Constructor, RebuildError, identify_and_replay, replay, slot_rates

__all__ = ["LibraryRates", "RateLaw", "fit_law", "library_rates"]

# Rates a law must reproduce bitwise before it is trusted; not round numbers, so that expressions
# that agree on 0.1 or 0.5 by accident (r*k/n against (k/n)*r) are told apart.
PROBE_RATES = (0.1, 0.3713, 0.7841)
_CACHE_SIZE = 256


@dataclass(frozen=True)
class RateLaw:
    """One slot's rate as a function of the constructor's rate argument (see the module docstring)."""

    kind: str  # "zero" | "rate" | "linspace32" | "linspace64" | "ratio" | "ratio_k_first" | "ratio_of_fraction"
    k: int = 0
    n: int = 0

    def __call__(self, rate: float, memo: dict | None = None) -> float:
        if self.kind == "zero":
            return 0.0
        if self.kind == "rate":
            return rate
        if self.kind in ("linspace32", "linspace64"):
            memo = {} if memo is None else memo
            key = (self.kind, rate, self.n)
            if key not in memo:
                memo[key] = _linspace(self.kind, rate, self.n)
            return memo[key][self.k]
        if self.kind == "ratio":
            return rate * self.k / self.n
        if self.kind == "ratio_k_first":
            return self.k / self.n * rate
        return rate * (self.k / self.n)


def _linspace(kind: str, rate: float, n: int) -> list[float]:
    if kind == "linspace32":
        return torch.linspace(0, rate, n, device="cpu").tolist()
    import numpy

    return numpy.linspace(0, rate, n).tolist()


_KINDS_BY_DENOMINATOR: tuple[tuple[str, int], ...] = (
    # (kind, offset): k is looked for near value / rate * (n - offset)
    ("linspace32", 1),
    ("ratio", 0),
    ("ratio_k_first", 0),
    ("ratio_of_fraction", 0),
    ("linspace64", 1),
)


def fit_law(values: dict[float, float], max_n: int) -> RateLaw | None:
    """The first law (in the order of the module docstring) that gives ``values[r]`` at every ``r``."""
    if all(v == 0.0 for v in values.values()):
        return RateLaw("zero")
    if all(v == r for r, v in values.items()):
        return RateLaw("rate")
    probe = max(r for r in values if r > 0)
    target = values[probe]
    memo: dict = {}
    for n in range(1, max_n + 1):
        for kind, offset in _KINDS_BY_DENOMINATOR:
            span = n - offset
            if span < 1 or (kind.startswith("linspace") and n < 2):
                continue
            k = round(target / probe * span)
            if not 0 < k <= span:
                continue
            law = RateLaw(kind, k, n)
            if all(law(r, memo) == v for r, v in values.items()):
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
            return {slot: law(rate, memo) for slot, law in self._laws.items()}
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
        max_n = 4 * len(self.slots) + 64
        return {slot: fit_law({r: v[slot] for r, v in samples.items()}, max_n) for slot in self.slots}


@dataclass
class RateSource:
    """Where ``schedule="auto"`` takes its rates from: the library (``rates``), or why not (``note``)."""

    rates: LibraryRates | None
    note: str = ""


def library_rates(model: nn.Module, rate: float, slot_names: list[str]) -> RateSource:
    """Ask ``model``'s library for the rates of ``slot_names`` at ``rate``.

    Returns a :class:`RateSource` whose ``rates`` is None (with the reason in ``note``) when the
    library cannot be asked: no adapter knows the model, the rebuilt tree differs (other constructor
    arguments), the constructor takes no rate, or it has no drop-path slot where the model has one.
    """
    if not slot_names:
        return RateSource(None, "the model has no drop-path slots to read library rates for")
    try:
        constructor, rebuilt = identify_and_replay(model, rate)
    except RebuildError as error:
        return RateSource(None, str(error))
    if constructor.rate_argument is None:
        return RateSource(None, f"{constructor.rates_from} {constructor.name} takes no drop-path rate")
    try:
        rates = slot_rates(rebuilt, slot_names)
    except RebuildError as error:
        return RateSource(None, f"{constructor.rates_from} {constructor.name}: {error}")
    return RateSource(LibraryRates(constructor, slot_names, {rate: rates}))
