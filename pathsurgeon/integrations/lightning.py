"""Lightning ``Trainer``: a callback that steps a :class:`~pathsurgeon.RateScheduler` and logs the rate.

>>> scheduler = pathsurgeon.RateScheduler.warmup(module.model, 0.1, steps=500)
>>> trainer = lightning.Trainer(max_steps=2000, callbacks=[DropPathCallback(scheduler)])

Steps are optimizer steps (``trainer.global_step``): before every training batch the model is put at
``fn(global_step)`` (with gradient accumulation every micro-batch of an update gets the same rate, and a
resumed run continues the schedule), and the rate is logged with the LightningModule's own ``log`` as
``drop_path_rate``, so it goes wherever the trainer's loggers write. Needs ``lightning`` (the package that
provides ``lightning.pytorch``): ``pip install lightning``.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError as error:  # an optional dependency: say which package, in one line
    raise ImportError(
        "pathsurgeon.integrations.lightning needs Lightning (lightning.pytorch); pip install lightning"
    ) from error

from ..schedulers import RateScheduler, require_scheduler

__all__ = ["DropPathCallback"]


class DropPathCallback(Callback):
    """Keeps ``scheduler``'s model at ``fn(trainer.global_step)`` and logs the rate as ``log_name``."""

    def __init__(self, scheduler: RateScheduler, *, log_name: str = "drop_path_rate") -> None:
        self.scheduler = require_scheduler(scheduler, "DropPathCallback")
        self.log_name = log_name

    def on_train_start(self, trainer, pl_module) -> None:
        self.scheduler.set_step(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self.scheduler.set_step(trainer.global_step)
        pl_module.log(self.log_name, self.scheduler.rate, on_step=True, on_epoch=False, batch_size=1)
