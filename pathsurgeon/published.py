"""Published fine-tuning rates: the drop-path rate a model family's authors fine-tuned with, and where it is written.

The data is ``recipes/published.toml`` (one entry per setting, each with a permalink to the line its
number comes from). A model is matched by its timm name and pretrained tag (``deit_base_patch16_224.fb_in1k``;
a bare name means timm's default tag) or by its Hugging Face hub id.

>>> pathsurgeon.published_rate("convnext_base.fb_in22k").rate
0.2
>>> pathsurgeon.add(model, pathsurgeon.published_rate(model).rate, schedule=pathsurgeon.published_rate(model).schedule)
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import validate_rate
from .errors import NoPublishedRateError
from .tables import table

__all__ = ["PublishedRate", "model_names", "published_rate", "published_rates"]


@dataclass(frozen=True)
class PublishedRate:
    """One published fine-tuning rate. ``schedule``: how the authors' code spreads it over depth
    ('auto': as timm does for the family, 'uniform': every block the same); ``matched``: the model name
    or hub id the entry matched."""

    family: str
    rate: float
    schedule: str
    setting: str
    source: str
    schedule_source: str | None = None
    note: str | None = None
    matched: str | None = None

    def __str__(self) -> str:
        text = f"{self.rate:g} (schedule {self.schedule!r}) {self.family}: {self.setting}; source: {self.source}"
        return text + (f"; note: {self.note}" if self.note else "")


@functools.cache
def _entries() -> tuple[dict, ...]:
    entries = tuple(table("published").get("rate", ()))
    for index, entry in enumerate(entries):  # a broken data file is our bug: say which entry
        missing = {"family", "rate", "schedule", "setting", "source"} - entry.keys()
        if missing or entry["schedule"] not in ("auto", "uniform", "linear"):
            raise RuntimeError(f"recipes/published.toml: entry {index} ({entry.get('family')}) is malformed")
        validate_rate(entry["rate"], what=f"recipes/published.toml entry {index} rate")
    return entries


def model_names(model_or_name: nn.Module | str) -> list[str]:
    """The names a model is looked up by: ``architecture.tag`` for timm, the hub id for Hugging Face."""
    if isinstance(model_or_name, str):
        name = model_or_name.strip()
        if "/" in name:  # a hub id (or a path, which matches nothing); timm's own hub ids name a timm model
            repository = name.removeprefix("hf-hub:")
            if repository.startswith("timm/"):
                return [*model_names(repository.split("/", 1)[1]), name]
            return [name]
        architecture, _, tag = name.partition(".")
        return [f"{architecture}.{tag or _default_tag(architecture)}".rstrip(".")]
    names = []
    config = getattr(model_or_name, "pretrained_cfg", None)  # timm sets it, pretrained or not
    if isinstance(config, dict) and config.get("architecture"):
        names.append(f"{config['architecture']}.{config.get('tag') or ''}".rstrip("."))
    hub_id = getattr(getattr(model_or_name, "config", None), "_name_or_path", None)
    if isinstance(hub_id, str) and hub_id:
        names.append(hub_id)
    return names


def _default_tag(architecture: str) -> str:
    try:
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(architecture)
    except Exception:  # noqa: BLE001 - not a timm name: it just has no tag
        return ""
    return getattr(config, "tag", None) or ""


def published_rates(model_or_name: nn.Module | str) -> list[PublishedRate]:
    """Every published fine-tuning rate recorded for the model (a model object, timm name or hub id)."""
    found = []
    for name in model_names(model_or_name):
        for entry in _entries():
            patterns = entry.get("timm", []) if "/" not in name else entry.get("hf", [])
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                fields: dict[str, Any] = {k: entry.get(k) for k in ("family", "rate", "schedule", "setting", "source",
                                                     "schedule_source", "note")}
                found.append(PublishedRate(**fields, matched=name))
    return found


def published_rate(model_or_name: nn.Module | str) -> PublishedRate:
    """The published fine-tuning rate to use for the model: the first recorded one; raises if none is known."""
    found = published_rates(model_or_name)
    if not found:
        names = model_names(model_or_name)
        what = names[0] if names else type(model_or_name).__name__
        raise NoPublishedRateError(
            f"no published fine-tuning rate is recorded for {what}; pass a rate yourself (e.g. 0.1), "
            "see recipes/published.toml for the models that have one"
        )
    return found[0]
