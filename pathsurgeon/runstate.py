"""The state every forward pathsurgeon runs must leave as it found: train/eval flags and the RNG.

Capture, verification and the skip-mode checks all run the user's model; each does so inside
:func:`training_flags_kept` (every module's own flag back afterwards) and, where outputs are compared,
:func:`private_rng` (a fork of the generators from a fixed seed, the caller's state untouched).

Some of that state is the process's, not the model's: torch has one global generator per device, and a
torch.fx trace patches ``nn.Module.__call__`` for every thread while it runs. So the public calls that
run models (``add``, ``find``, ``preview``, ``set_rate``, ``strip``, ``load``, ``save``,
``export_onnx``) are :func:`serialised`: one at a time per process, the others wait (the lock is
re-entrant, so one call may make another).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

__all__ = ["private_rng", "serialised", "training_flags_kept"]

_CALL = TypeVar("_CALL", bound=Callable)
_ONE_AT_A_TIME = threading.RLock()  # re-entrant: add calls find's machinery, load calls add


def serialised(function: _CALL) -> _CALL:
    """Run ``function`` holding the process-wide pathsurgeon lock (other threads' calls wait their turn).

    Two surgeries at once would fork and restore the global generators out of order and nest torch.fx's
    process-wide patches, which then outlive both calls and break every later forward in the process.
    """
    @functools.wraps(function)
    def one_at_a_time(*args, **kwargs):
        with _ONE_AT_A_TIME:
            return function(*args, **kwargs)

    return one_at_a_time  # type: ignore[return-value]


@contextlib.contextmanager
def training_flags_kept(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Optionally switch the model to train/eval; restore every module's own flag afterwards.

    The restore goes through ``model.train(flag)`` first, so that modules whose ``train()`` does more
    than set a flag (timm LeViT / TinyViT drop their eval-mode attention-bias cache) see it, then puts
    back any per-module flag that differed (a frozen BatchNorm left in eval, say).
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        if training is not None:
            model.train(flags[0][1])
        for module, flag in flags:
            module.training = flag


_SEED = 0


@contextlib.contextmanager
def private_rng(model: nn.Module, seed: int = _SEED) -> Iterator[None]:
    """Run the block from a fixed RNG state on a fork of the generators; the caller's state is restored.

    Every forward pathsurgeon runs goes through this, so that models whose eval forward draws random
    numbers (ViTMAE's masking) give the same outputs before and after surgery, and so that ``add``
    leaves the user's global RNG exactly where it was. Covers the CPU generator and the CUDA devices the
    model lives on.
    """
    devices = sorted(
        {t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers()) if t.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
