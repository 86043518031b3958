"""Trainer integrations: step a :class:`~pathsurgeon.RateScheduler` with the trainer and log the rate.

- :mod:`pathsurgeon.integrations.transformers`: ``DropPathCallback`` for the Hugging Face ``Trainer``.
- :mod:`pathsurgeon.integrations.lightning`: ``DropPathCallback`` for Lightning's ``Trainer``.

Each module imports its trainer library when it is imported, never before: ``import pathsurgeon`` needs
neither. Both put the model at ``fn(k)`` before optimizer step ``k`` (counted by the trainer, so a resumed
run continues the schedule where it stopped) and log the rate each step trained with as
``drop_path_rate``, with the trainer's own logging.
"""
