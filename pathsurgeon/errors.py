"""Exceptions raised by pathsurgeon. Every message is one line: the problem, then the fix."""

from __future__ import annotations

import os
import sys
import types
import warnings

__all__ = [
    "AlreadySurgeredError",
    "CaptureError",
    "CheckpointError",
    "ExampleInputsError",
    "ManifestError",
    "ModelSpecError",
    "OutputPathError",
    "UntrustedCodeError",
    "InvalidModeError",
    "InvalidRateError",
    "InvalidScheduleError",
    "NoBranchesError",
    "NoPublishedRateError",
    "PathSurgeonError",
    "SavedBranchesMovedError",
    "ScriptingError",
    "UnsupportedVersionError",
    "VerificationError",
    "WrappedModelError",
    "first_line",
    "warn_user",
]


class PathSurgeonError(Exception):
    """Base class of every error pathsurgeon raises on purpose. The model is left as it was."""

    def __str__(self) -> str:
        # one line, whatever a path in it holds: a newline or a control character is shown escaped
        text = super().__str__()
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class InvalidRateError(PathSurgeonError, ValueError):
    """A drop-path rate that is not a number in [0, 1)."""


class InvalidModeError(PathSurgeonError, ValueError):
    """A mode that is not one of :data:`~pathsurgeon.choices.MODES` ('sample', 'skip', 'batch', 'fixed_count')."""


class InvalidScheduleError(PathSurgeonError, ValueError):
    """A schedule that is not 'auto', 'linear', 'uniform' or a list with one rate per depth unit."""


class NoBranchesError(PathSurgeonError, ValueError):
    """The model has no residual branch that stochastic depth could be put on."""


class NoPublishedRateError(PathSurgeonError, LookupError):
    """No published fine-tuning rate is known for the model (``rate="published"``)."""


class WrappedModelError(PathSurgeonError, TypeError):
    """A model inside a DDP / DataParallel / FSDP / torch.compile wrapper, or already sharded for ``add``."""


class AlreadySurgeredError(PathSurgeonError, ValueError):
    """``add`` on a model that already carries pathsurgeon's DropPath."""


class CaptureError(PathSurgeonError):
    """Neither torch.fx nor torch.export could capture a graph of the model."""


class ExampleInputsError(PathSurgeonError, ValueError):
    """The model does not run on the example inputs pathsurgeon made from its config; pass your own."""


class VerificationError(PathSurgeonError):
    """Eval-mode outputs changed after surgery; the model was rolled back."""


class ModelSpecError(PathSurgeonError, ValueError):
    """A model spec that names no timm model, Hugging Face model or local checkpoint."""


class CheckpointError(PathSurgeonError, ValueError):
    """A weights file that cannot be read safely or does not fit the model."""


class ManifestError(PathSurgeonError, ValueError):
    """A ``pathsurgeon.json`` that does not follow the manifest schema or names something unknown."""


class UntrustedCodeError(PathSurgeonError, ValueError):
    """A model directory that would need its own Python code to load; pathsurgeon never runs it."""


class OutputPathError(PathSurgeonError, ValueError):
    """An output path that cannot or must not be written (exists, is an input, is not writable)."""


class UnsupportedVersionError(PathSurgeonError, RuntimeError):
    """A capability that needs a newer torch, timm or transformers than the one installed (see
    :mod:`pathsurgeon.versions`); the message names the release."""


class SavedBranchesMovedError(PathSurgeonError):
    """``pathsurgeon.load`` found other branches in the rebuilt model than the checkpoint saved."""


class ScriptingError(PathSurgeonError, AttributeError):
    """torch.jit.script met one of pathsurgeon's Python hooks, which TorchScript cannot compile.

    An AttributeError too: TorchScript raises it where it reads the hook's ``__name__``, and code that
    probes with ``getattr(hook, "__name__", default)`` must keep getting its default.
    """


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (at most 200 characters), or its type's name: what a one-line
    message quotes of an exception raised by torch, timm or transformers."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame outside pathsurgeon, however many of
    its functions and decorators lie in between (a fixed ``stacklevel`` breaks when one is added)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: types.FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
