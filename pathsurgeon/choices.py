"""The settings a user picks by name — schedules, modes, BatchNorm handling — each one ``Literal``.

The one definition of each: :mod:`pathsurgeon.config` validates against them, the manifest schema
(:mod:`pathsurgeon.manifest`) and the command line's ``choices`` (:mod:`pathsurgeon.cli`) are made from
them, and type hints name them. Plain strings, so JSON, manifests and reports hold the same values as
ever. Imports nothing heavy: ``pathsurgeon --help`` reads them without importing torch.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["BATCH_NORM_CHOICES", "MODES", "SCHEDULES", "BatchNormChoice", "Mode", "ScheduleName"]

ScheduleName = Literal["auto", "linear", "uniform"]  # a schedule by name; a list of per-unit rates is the other kind
Mode = Literal["sample", "skip", "batch", "fixed_count"]
# What a branch holding a BatchNorm does in the modes that compute part of the batch ('skip',
# 'fixed_count'): "fallback" computes every sample (the BatchNorm sees the statistics mode 'sample' gives
# it); "kept_rows" computes the kept samples only, so the BatchNorm normalises with, and updates its
# running statistics from, the kept samples alone — another estimator, taken only on request. Mode
# 'batch' needs neither: a kept branch sees the whole batch, a dropped one runs nothing.
BatchNormChoice = Literal["fallback", "kept_rows"]

SCHEDULES: tuple[ScheduleName, ...] = get_args(ScheduleName)
MODES: tuple[Mode, ...] = get_args(Mode)
BATCH_NORM_CHOICES: tuple[BatchNormChoice, ...] = get_args(BatchNormChoice)
