"""What pathsurgeon found and did: :class:`Branch`, :class:`Report` and their parts. Plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # report.py stays plain data: the choices are only named in its type hints
    from .config import Mode, ScheduleName

__all__ = ["Branch", "Fallback", "LeftAlone", "PartReport", "Preview", "Report", "format_branches", "partly_wrapped"]


@dataclass(frozen=True)
class Branch:
    """One residual branch.

    ``block``: qualified name of the module whose forward performs the residual add (``blocks.3``,
    ``layer2.1``). ``index``: depth index of the block's unit in execution order (the schedule's ``i``).
    ``rate``: the drop rate (from :func:`~pathsurgeon.find`: the rate the model has now). ``mechanism``:
    'slot' (the branch passes through the drop-path slot ``target``) or 'hook' (a forward hook on the
    module ``target``, whose output is the branch). ``batch_axis``: the batch axis of the branch output.
    ``unit``: the depth unit the schedule counts the block in (the block itself for most families).
    ``mode``: 'sample' (every sample computed, dropped ones zeroed), 'skip' (only kept samples
    computed) or 'batch' (one draw per mini-batch). ``entry``: with 'skip' or 'batch', the module whose
    input is cut down to the kept samples (None: the branch is computed in full). ``part``: the module
    path of the part the branch belongs to (see :mod:`pathsurgeon.parts`; '' for the model itself);
    ``index`` counts within that part.
    """

    block: str
    index: int
    rate: float
    mechanism: str
    target: str
    batch_axis: int = 0
    unit: str | None = None
    mode: str = "sample"
    entry: str | None = None
    part: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LeftAlone:
    """A residual add (or a library drop path) that pathsurgeon found and left as it was, and why."""

    block: str
    reason: str


@dataclass(frozen=True)
class PartReport:
    """One part of the model (see :mod:`pathsurgeon.parts`) and where its rates came from.

    ``path``: module path ('' for the model itself); ``library``: the library that built it (None: none
    known); ``source``: how it was found ('the model', 'timm model', 'backbone_config', 'region', ...);
    ``rates_from`` / ``rates_note``: as :class:`Report`'s, for this part alone; ``blocks`` /
    ``branches``: how many it has with drop path.
    """

    path: str
    library: str | None
    source: str
    rates_from: str
    rates_note: str
    blocks: int
    branches: int

    @property
    def name(self) -> str:
        return self.path or "(the model)"


@dataclass(frozen=True)
class Fallback:
    """A branch that computes every sample although ``mode`` asked to skip dropped ones, and why.

    With mode 'skip' it runs in 'sample' mode (same results, no saving); with 'batch' it keeps the
    one-draw-per-batch semantics but computes the branch before zeroing it.
    """

    block: str
    target: str
    reason: str


@dataclass
class Report:
    """What :func:`~pathsurgeon.add` did. ``max_abs_diff``: eval-output difference against before
    (0.0: bitwise equal; None: not checked).

    ``left_alone``: residual adds left without drop path, and drop-path sites of the library that are
    not residual branches. ``fallbacks``: branches that compute every sample although ``mode`` is
    'skip' or 'batch'. ``rates_from``: where the rates came from: 'timm constructor', 'torchvision
    builder' or 'transformers config' (``schedule="auto"``, the library's own numbers, read from a
    meta-device rebuild), 'recipe' (``recipes/``), 'linear over found units', or the schedule given
    ('linear schedule', 'uniform schedule', 'explicit list'). ``rates_note``: why the library was not
    asked, when ``schedule="auto"`` could not use it. ``timings``: seconds spent per stage of ``add``.
    """

    branches: list[Branch]
    max_abs_diff: float | None
    method: str
    schedule: ScheduleName | list[float]
    formula: str
    left_alone: list[LeftAlone] = field(default_factory=list)
    mode: Mode = "sample"
    fallbacks: list[Fallback] = field(default_factory=list)
    rates_from: str = "linear over found units"
    rates_note: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    parts: list[PartReport] = field(default_factory=list)

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(b.block for b in self.branches))

    @property
    def composite(self) -> bool:
        """True when the model was planned in more than one part, or in one part inside it."""
        return [p.path for p in self.parts] not in ([], [""])

    @property
    def partly_wrapped(self) -> dict[str, int]:
        """Blocks with some residual adds wrapped and some left alone: block -> adds left alone."""
        return partly_wrapped(self.branches, self.left_alone)

    @property
    def skipped(self) -> list[LeftAlone]:
        """The former name of :attr:`left_alone` (pathsurgeon 0.1)."""
        return self.left_alone

    def summary(self) -> str:
        check = (
            "eval check skipped"
            if self.max_abs_diff is None
            else f"eval check passed with max |Δ| = {self.max_abs_diff:g}"
        )
        if self.composite:
            wrapped = [p for p in self.parts if p.branches]
            named = ", ".join(f"{p.name} ({p.rates_from})" for p in wrapped)
            parts = f"{len(wrapped)} part{'s' if len(wrapped) > 1 else ''}"
            text = f"{len(self.branches)} branches in {len(self.blocks)} blocks of {parts}: {named}"
            alone = [p.name for p in self.parts if p.rates_from == "left alone"]  # not parts include= left out
            if alone:
                text += f"; left alone (no library drop path; include= brings them in): {', '.join(alone)}"
            text += f"; {check}"
        else:
            text = f"{len(self.branches)} branches in {len(self.blocks)} blocks; rates from {self.rates_from}; {check}"
        partly = self.partly_wrapped
        if partly:
            shown = ", ".join(f"{block} ({n} left alone)" for block, n in list(partly.items())[:3])
            more = f" and {len(partly) - 3} more" if len(partly) > 3 else ""
            text += f"; {len(partly)} blocks only partly wrapped: {shown}{more} (see left_alone)"
        if self.mode != "sample":
            full = len(self.fallbacks)
            skipping = len(self.branches) - full
            text += f"; mode {self.mode!r}: {skipping} branches skip dropped compute, {full} compute in full"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: what ``pathsurgeon add --json`` writes (with the model spec added)."""
        return {
            "schedule": self.schedule,
            "mode": self.mode,
            "branches": [b.to_dict() for b in self.branches],
            "max_abs_diff": self.max_abs_diff,
            "method": self.method,
            "rates_from": self.rates_from,
            "rates_note": self.rates_note,
            "left_alone": [asdict(s) for s in self.left_alone],
            "computed_in_full": [asdict(f) for f in self.fallbacks],
            "timings": dict(self.timings),
            "parts": [
                {**asdict(p), "branches": [b.to_dict() for b in self.branches if b.part == p.path]}
                for p in self.parts
            ],
        }

    def __str__(self) -> str:
        lines = [format_branches(self.branches, self.parts if self.composite else None), self.summary()]
        lines += [f"  computed in full: {f.target}: {f.reason}" for f in self.fallbacks]
        return "\n".join(lines)


class Preview(list):
    """The branches :func:`~pathsurgeon.preview` returns, with ``rates_from`` and ``rates_note`` as in
    :class:`Report`."""

    def __init__(self, branches: list[Branch], rates_from: str, rates_note: str = "",
                 parts: list[PartReport] | None = None) -> None:
        super().__init__(branches)
        self.rates_from = rates_from
        self.rates_note = rates_note
        self.parts = list(parts or [])


def format_branches(branches: list[Branch], parts: list[PartReport] | None = None) -> str:
    """A table with one row per block: block, depth index, number of branches, rate.

    With ``parts`` (a composite), the rows are grouped by part, each under a line naming the part,
    its library and where its rates came from.
    """
    blocks: dict[str, list[Branch]] = {}
    for branch in branches:
        blocks.setdefault(branch.block, []).append(branch)
    width = max([len("block")] + [len(b) for b in blocks])
    header = f"{'block':<{width}}  {'index':>5}  {'branches':>8}  {'rate':>8}"

    def row(block: str, mine: list[Branch]) -> str:
        return f"{block:<{width}}  {mine[0].index:>5}  {len(mine):>8}  {mine[0].rate:>8.4f}"

    if not parts:
        return "\n".join([header] + [row(block, mine) for block, mine in blocks.items()])
    rows = [header]
    for part in parts:
        if not part.branches:
            continue
        library = part.library or "no library"
        rows.append(f"part {part.name} ({library}, {part.source}): rates from {part.rates_from}")
        rows += [row(block, mine) for block, mine in blocks.items() if mine[0].part == part.path]
    return "\n".join(rows)


def partly_wrapped(branches: list[Branch], left_alone: list[LeftAlone]) -> dict[str, int]:
    """Blocks that have branches with drop path and residual adds left alone: block -> adds left alone."""
    wrapped = {b.block for b in branches}
    counts: dict[str, int] = {}
    for item in left_alone:
        if item.block in wrapped and not item.reason.startswith(("the library drops", "slot ")):
            counts[item.block] = counts.get(item.block, 0) + 1
    return counts
