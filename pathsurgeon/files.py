"""Writing outputs safely: paths checked before any work, staged next to their target, renamed into place.

Every file or directory pathsurgeon writes is first built under a *staging* name in the target's own
folder (``.NAME.pathsurgeon-PID-RANDOM``), then renamed over the target in one step, so a reader never
sees half a checkpoint. Several outputs of one command are committed together: if the second rename
fails, the first is undone. A staging path left behind by a killed process (SIGKILL, power loss) is
recognised by its name and removed by the next run for the same target, once its process is gone.

>>> with staged(Path("out/model")) as (staging,):    # doctest: +SKIP
...     write_checkpoint(staging)                      # an exception here leaves nothing behind
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import OutputPathError

__all__ = ["OutputPathError", "check_outputs", "remove_stale_staging", "staged", "write_json_atomic"]

_STAGING = "pathsurgeon"
_STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.pathsurgeon-(?P<pid>\d+)-[A-Za-z0-9_]+(?:\.\w+)?$")


def check_outputs(
    outputs: dict[str, tuple[str | os.PathLike | None, str]],
    inputs: dict[str, str | os.PathLike | None] | None = None,
) -> None:
    """Refuse output paths that cannot or must not be written, before anything is loaded or computed.

    ``outputs`` maps an option name (``--out``) to ``(path, kind)`` with kind ``"dir"`` (must not exist,
    or be an empty directory) or ``"file"`` (may be replaced, but must not be a directory); ``None``
    paths are skipped. ``inputs`` maps option names to files or directories that are read: an output
    may not be, or lie inside, any of them, and two outputs may not overlap.
    """
    resolved: dict[str, Path] = {}
    for option, (value, kind) in outputs.items():
        if value is None:
            continue
        if str(value).strip() == "":
            raise OutputPathError(f"{option} is empty; pass a path")
        path = Path(value)
        if path.is_symlink():
            raise OutputPathError(f"{option} {path} is a symbolic link; pass a plain path (the link is not followed)")
        if kind == "dir":
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise OutputPathError(f"{option} {path} already exists; choose another path or remove it first")
        elif path.is_dir():
            raise OutputPathError(f"{option} {path} is a directory; pass a file path")
        _check_parent_writable(option, path)
        resolved[option] = path.resolve()
    for option, path in resolved.items():
        for other, other_path in resolved.items():
            if other != option and (path == other_path or other_path in path.parents):
                where = "is the same path as" if path == other_path else "lies inside"
                raise OutputPathError(f"{option} {path} {where} {other} {other_path}; give each output its own path")
        for name, value in (inputs or {}).items():
            if value is None or str(value).strip() == "":
                continue
            source = Path(value).resolve()
            if path == source or source in path.parents:
                where = "is" if path == source else "lies inside"
                raise OutputPathError(
                    f"{option} {path} {where} the input {name} {source}; write outputs somewhere else"
                )


def _check_parent_writable(option: str, path: Path) -> None:
    """The nearest existing ancestor must be a directory we can create entries in (tested, not guessed)."""
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link on the way
            raise OutputPathError(f"{option} {path} goes through the broken symbolic link {parent}; fix the path")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path} is under {parent}, which is a file; choose a path under a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{_STAGING}-probe-", dir=parent)
    except OSError as error:
        raise OutputPathError(
            f"{option} {path}: cannot write in {parent} ({error.strerror or error}); choose a writable location"
        ) from error
    os.close(handle)
    os.unlink(probe)


def _staging_path(target: Path) -> str:
    return f".{target.name}.{_STAGING}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove staging paths for ``target`` left by processes that no longer run; return what was removed."""
    parent = target.absolute().parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _STAGING_NAME.match(entry.name)
        if match is None or match["name"] != target.name or _pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged(targets: Sequence[tuple[Path, str]]) -> Iterator[list[Path]]:
    """Staging paths for ``(target, kind)`` pairs (kind ``"dir"`` or ``"file"``); commit them on success.

    The body writes each staging path; when it returns, the stagings are renamed over their targets
    in order (an empty target directory is replaced). Any exception, in the body or while committing,
    leaves every target as it was before and removes every staging path.
    """
    stagings: list[Path] = []
    try:
        for target, kind in targets:
            target.absolute().parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(target)
            suffix = target.suffix if kind == "file" else ""
            if kind == "dir":
                stagings.append(Path(tempfile.mkdtemp(prefix=_staging_path(target), dir=target.absolute().parent)))
            else:
                handle, name = tempfile.mkstemp(prefix=_staging_path(target), suffix=suffix,
                                                dir=target.absolute().parent)
                os.close(handle)
                stagings.append(Path(name))
            # tempfile makes private (0700 / 0600) paths; the outputs get the permissions of any new file
            stagings[-1].chmod((0o777 if kind == "dir" else 0o666) & ~_umask())
        yield list(stagings)
        for staging in stagings:  # libraries writing into a staged directory may also make private files
            for file in [staging] if staging.is_file() else staging.rglob("*"):
                if file.is_file() and not file.is_symlink():
                    file.chmod(0o666 & ~_umask())
        _commit(list(zip(stagings, [t for t, _ in targets], [k for _, k in targets], strict=True)))
    except BaseException as error:
        for staging in stagings:
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, a vanished directory: the environment, not a bug
            names = ", ".join(str(t) for t, _ in targets)
            raise OutputPathError(
                f"cannot write {names} ({error.strerror or error}); nothing was written: free some space or "
                "choose another location"
            ) from error
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _commit(moves: list[tuple[Path, Path, str]]) -> None:
    """Rename each staging path over its target; on failure put the earlier targets back."""
    # (target, backup of the file it replaced, staging, whether it replaced an empty directory)
    done: list[tuple[Path, Path | None, Path, bool]] = []
    try:
        for staging, target, kind in moves:
            backup, was_empty_dir = None, False
            if kind == "dir" and target.is_dir() and not any(target.iterdir()):
                target.rmdir()  # an empty directory the user made for us
                was_empty_dir = True
            elif kind == "file" and target.exists():
                backup = Path(tempfile.mkdtemp(prefix=_staging_path(target), dir=target.absolute().parent))
                os.replace(target, backup / "previous")
            try:
                os.replace(staging, target)
            except BaseException:
                _put_back(target, backup, was_empty_dir)
                raise
            done.append((target, backup, staging, was_empty_dir))
    except BaseException:
        for target, backup, staging, was_empty_dir in reversed(done):
            os.replace(target, staging)  # moved back to staging: the caller's cleanup removes it
            _put_back(target, backup, was_empty_dir)
        raise
    for _, backup, _, _ in done:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _put_back(target: Path, backup: Path | None, was_empty_dir: bool) -> None:
    if backup is not None:
        os.replace(backup / "previous", target)
        backup.rmdir()
    elif was_empty_dir:
        target.mkdir()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a staging file."""
    with staged([(Path(path), "file")]) as (staging,):
        staging.write_text(json.dumps(data, indent=2) + "\n")
