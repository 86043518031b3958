"""Writing outputs safely: paths checked before any work, staged next to their target, renamed into place.

Every file or directory pathsurgeon writes is first built inside a *staging* directory in the target's
own folder (``.NAME.pathsurgeon-PID-RANDOM/``), then renamed over the target in one step, so a reader
never sees half a checkpoint. Several outputs of one command are committed together: if the second
rename fails, the first is undone. Each staging directory holds a marker file naming its creator (pid,
host, boot and PID-namespace ids, a random token); a staging directory left behind by a killed process
(SIGKILL, power loss) is removed by the next run for the same target only when its marker says this
machine and PID namespace made it and that process is gone. Anything else that merely looks like one
(a user's directory or file with such a name, an input, one made in another container sharing the
volume) is left alone.

>>> with staged([(Path("out/model"), "dir")]) as (staging,):    # doctest: +SKIP
...     write_checkpoint(staging)                      # an exception here leaves nothing behind
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import OutputPathError, PathSurgeonError

__all__ = [
    "OutputPathError",
    "check_outputs",
    "Seen",
    "check_path_text",
    "remove_stale_staging",
    "staged",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

_STAGING = "pathsurgeon"
# .NAME.pathsurgeon-PID-MACHINE-RANDOM: MACHINE (hash of host, boot, PID namespace) lets a directory whose
# maker died before its marker was written still be recognised as this machine's (older names lack it)
_STAGING_NAME = re.compile(
    r"^\.(?P<name>.+)\.pathsurgeon-(?P<pid>\d+)-(?:(?P<machine>[0-9a-f]{12})-)?[A-Za-z0-9_]+$"
)
MARKER = ".pathsurgeon-staging"  # inside every staging directory: who made it
_MAX_NAME_BYTES = 255  # NAME_MAX on Linux, macOS and Windows filesystems
_MAX_WALK = 100_000  # entries looked at under one input directory (symbolic links, hard links)

PathInputs = dict[str, "str | os.PathLike | Sequence[str | os.PathLike] | None"]


def check_path_text(option: str, value: str | os.PathLike | None) -> None:
    """Refuse a path no filesystem can hold (a NUL byte, a name over 255 bytes) with one line, not an OSError."""
    if value is None:
        return
    text = os.fspath(value)
    if "\0" in str(text):
        raise OutputPathError(f"{option} {text!r} contains a NUL byte; pass a plain path")
    for part in Path(text).parts:
        if len(os.fsencode(part)) > _MAX_NAME_BYTES:
            raise OutputPathError(f"{option}: the path component {part[:40]!r}... is longer than "
                                  f"{_MAX_NAME_BYTES} bytes, which no filesystem accepts; shorten it")


def check_outputs(
    outputs: dict[str, tuple[str | os.PathLike | None, str]],
    inputs: PathInputs | None = None,
) -> Seen:
    """Refuse output paths that cannot or must not be written, before anything is loaded or computed.

    ``outputs`` maps an option name (``--out``) to ``(path, kind)`` with kind ``"dir"`` (must not exist,
    or be an empty directory) or ``"file"`` (may be replaced if it is a regular file); ``None`` paths
    are skipped. An existing output that is neither a regular file nor a directory (a device, a FIFO, a
    socket) is refused: replacing it would delete it. ``inputs`` maps option names to the paths (or
    lists of paths) that are read: an output may not be, or lie inside, any of them, nor any file a
    symbolic link inside them points to, nor a hard link to a file in them; two outputs may not overlap.

    Returns what stands at each output path now (:data:`Seen`): pass it to :func:`staged`, which refuses
    to commit over anything that appeared or changed there since (another run's output, a directory made
    meanwhile): a run only ever replaces what was there when it was checked.
    """
    resolved: dict[str, Path] = {}
    seen: Seen = {}
    value: str | os.PathLike | Sequence[str | os.PathLike] | None  # an output's path, then an input's
    for option, (value, kind) in outputs.items():
        if value is None:
            continue
        if str(value).strip() == "":
            raise OutputPathError(f"{option} is empty; pass a path")
        check_path_text(option, value)
        path = Path(value)
        if path.name in ("", ".", ".."):
            raise OutputPathError(f"{option} {str(value)!r} names no new entry in a folder; pass a path such as "
                                  f"{'DIR/out' if kind == 'dir' else 'DIR/out.json'}")
        if path.is_symlink():
            raise OutputPathError(f"{option} {path} is a symbolic link; pass a plain path (the link is not followed)")
        mode = _lstat_mode(path)
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise OutputPathError(f"{option} {path} exists and is a {_kind_name(mode)}, not a regular file; "
                                  "pathsurgeon only replaces regular files: choose another path")
        if kind == "dir":
            if mode is not None and (not stat.S_ISDIR(mode) or any(path.iterdir())):
                raise OutputPathError(f"{option} {path} already exists; choose another path or remove it first")
        elif mode is not None and stat.S_ISDIR(mode):
            raise OutputPathError(f"{option} {path} is a directory; pass a file path")
        _check_parent_writable(option, path)
        resolved[option] = path.resolve()
        seen[_absolute(path)] = _state(path)
    for option, path in resolved.items():
        for other, other_path in resolved.items():
            if other != option and (path == other_path or other_path in path.parents):
                where = "is the same path as" if path == other_path else "lies inside"
                raise OutputPathError(f"{option} {path} {where} {other} {other_path}; give each output its own path")
    if not resolved:
        return seen
    for name, value in (inputs or {}).items():
        for source, identities in _read_paths(value):
            for option, path in resolved.items():
                same_file = _identity(path) in identities
                if path == source or source in path.parents or same_file:
                    where = "lies inside" if source in path.parents else "is"
                    raise OutputPathError(
                        f"{option} {path} {where} the input {name} {source}"
                        f"{' (the same file, hard-linked)' if same_file and path != source else ''}; "
                        "write outputs somewhere else"
                    )
    return seen


# What stood at an output path when a run looked: None (nothing), or the kind of entry and its
# (device, inode), which a rename or a new entry changes: ("file" | "dir" | "emptydir" | "other", dev, ino).
State = tuple[str, int, int] | None
Seen = dict[Path, State]


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _state(path: Path) -> State:
    try:
        info = os.lstat(path)
    except OSError:  # absent, or under something that is not a directory: nothing of anyone's stands there
        return None
    if stat.S_ISREG(info.st_mode):
        kind = "file"
    elif stat.S_ISDIR(info.st_mode):
        try:
            kind = "dir" if any(os.scandir(path)) else "emptydir"
        except OSError:
            kind = "dir"
    else:
        kind = "other"
    return (kind, info.st_dev, info.st_ino)


def _describe_state(state: State) -> str:
    return {None: "nothing", "file": "a file", "dir": "a directory", "emptydir": "an empty directory",
            "other": "a special file"}[None if state is None else state[0]]


def _lstat_mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as error:  # a name too long, a loop, a component that is a file
        if error.errno == 20:  # ENOTDIR: a file on the way; _check_parent_writable says which
            return None
        raise OutputPathError(f"cannot look at {path} ({error.strerror or error}); fix the path") from error


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else None


def _read_paths(value: Any) -> Iterator[tuple[Path, set[tuple[int, int]]]]:
    """Every path an input reads, resolved: the input itself and the targets of symbolic links inside it,
    each with the (device, inode) of the regular files it holds (to catch hard links)."""
    if value is None:
        return
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    for item in values:
        if item is None or str(item).strip() == "":
            continue
        path = Path(item)
        try:
            if not path.exists():
                yield path.resolve(), set()
                continue
        except OSError:
            continue
        targets, identities = [path.resolve()], set()
        if path.is_dir():
            for count, entry in enumerate(path.rglob("*")):
                if count >= _MAX_WALK:
                    break
                if entry.is_symlink():
                    with contextlib.suppress(OSError, RuntimeError):
                        targets.append(entry.resolve())
                identity = _identity(entry)
                if identity is not None:
                    identities.add(identity)
        else:
            identity = _identity(path)
            if identity is not None:
                identities.add(identity)
        for target in dict.fromkeys(targets):
            yield target, identities


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


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.{_STAGING}-{os.getpid()}-{_machine_tag()}-"


def _machine_tag() -> str:
    identity = _machine_identity()
    text = "\0".join(identity[key] for key in sorted(identity))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _machine_identity() -> dict[str, str]:
    """What makes a pid meaningful: the host, this boot, and the PID namespace (containers have their own)."""
    def read(how) -> str:
        try:
            return how().strip()
        except OSError:
            return ""

    return {
        "host": socket.gethostname(),
        "boot_id": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text()),
        "pid_namespace": read(lambda: os.readlink("/proc/self/ns/pid")),
    }


def _make_staging_dir(target: Path) -> Path:
    """A new private directory next to ``target``, with the marker that says this process made it."""
    directory = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.absolute().parent))
    _write_marker(directory)
    return directory


def _write_marker(directory: Path) -> None:
    """The marker, in one write (a process killed before it leaves an empty directory, or an empty
    marker: :func:`_unfinished` recognises both by the name)."""
    marker = {"creator": _STAGING, "pid": os.getpid(), **_machine_identity(), "token": secrets.token_hex(16),
              "created": time.time()}
    handle = os.open(directory / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(handle, json.dumps(marker).encode())
    finally:
        os.close(handle)


def _unfinished(entry: Path, match: re.Match) -> bool:
    """A staging directory whose maker died between creating it and writing its marker: its name says this
    machine made it, its process is gone, and it holds nothing but (at most) an empty marker."""
    if match["machine"] != _machine_tag() or _pid_alive(int(match["pid"])):
        return False
    try:
        if entry.is_symlink() or not entry.is_dir():
            return False
        contents = list(entry.iterdir())
        return all(item.name == MARKER and not item.is_symlink() and item.is_file() and item.stat().st_size == 0
                   for item in contents)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's live process; a pid no kernel has
        return True
    return True


def _marker(entry: Path) -> dict[str, Any] | None:
    """The marker of a staging directory pathsurgeon made, or None when ``entry`` is anything else."""
    try:
        if entry.is_symlink() or not entry.is_dir():
            return None
        marker = entry / MARKER
        info = os.lstat(marker)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # '[' * 3000 is not a marker either
        return None
    if not isinstance(data, dict) or data.get("creator") != _STAGING or not isinstance(data.get("pid"), int):
        return None
    return data


def remove_stale_staging(target: Path, inputs: PathInputs | None = None) -> list[Path]:
    """Remove staging directories for ``target`` that this machine's pathsurgeon made and whose process is gone.

    Removed only when all hold: the name is a staging name for ``target``; it is a directory (not a
    link) holding pathsurgeon's marker; the marker names this host, boot and PID namespace (a pid from
    another container sharing the volume says nothing here); that pid no longer runs; and it is not, nor
    holds, any of ``inputs``. A directory from another machine or namespace is left and a warning says
    so. Returns what was removed.
    """
    parent = target.absolute().parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    read = [source for value in (inputs or {}).values() for source, _ in _read_paths(value)]
    here = _machine_identity()
    for entry in parent.iterdir():
        match = _STAGING_NAME.match(entry.name)
        if match is None or match["name"] != target.name:
            continue
        marker = _marker(entry)
        if marker is None:
            if _unfinished(entry, match):
                with contextlib.suppress(OSError):
                    (entry / MARKER).unlink(missing_ok=True)
                    entry.rmdir()  # fails if anything went into it meanwhile
                    removed.append(entry)
            continue  # otherwise not ours: a user's file or directory with a look-alike name
        resolved = entry.resolve()
        if any(source == resolved or resolved in source.parents for source in read):
            continue  # being read by this run
        if any(marker.get(key) != value for key, value in here.items()):
            warnings.warn(f"left {entry} alone: a pathsurgeon staging directory made by pid {marker['pid']} on "
                          f"{marker.get('host')!r} in another PID namespace or boot; remove it by hand once no "
                          "run uses it", stacklevel=2)
            continue
        if _pid_alive(marker["pid"]):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed %s: a staging directory left by pathsurgeon pid %s, which no longer runs", entry,
                 marker["pid"])
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged(
    targets: Sequence[tuple[Path, str]],
    inputs: PathInputs | None = None,
    *,
    seen: Seen | None = None,
    check: Callable[[], None] | None = None,
) -> Iterator[list[Path]]:
    """Staging paths for ``(target, kind)`` pairs (kind ``"dir"``, ``"file"`` or ``"optional file"``);
    commit them on success.

    The body writes each staging path (a directory, or a file named like the target inside a staging
    directory; an ``"optional file"`` the body deletes is not written); when it returns, they are
    renamed over their targets in order (an empty target directory is replaced). Only what stood at a
    target when the run looked is ever replaced: ``seen`` is what :func:`check_outputs` returned (by
    default, what stands there when this is entered); anything that appeared or changed since (a
    directory made meanwhile, another run's output) is refused, and nothing is written. ``check`` runs
    once every output is in place, before what they replaced is dropped: if it raises, everything is
    put back. Any exception, in the body or while committing, leaves every target as it was before and
    removes every staging directory. ``inputs``: paths the caller reads, which the clean-up of stale
    staging never touches.
    """
    directories: list[Path] = []
    stagings: list[Path] = []
    made: list[Path] = []  # folders made for the targets (--out a/b/c): removed again when nothing is written
    expected = dict(seen or {})
    for target, _ in targets:
        expected.setdefault(_absolute(target), _state(target))
    try:
        for target, kind in targets:
            made += _make_folders(target.absolute().parent)
            remove_stale_staging(target, inputs)
            directories.append(_make_staging_dir(target))
            if kind == "dir":
                stagings.append(directories[-1] / "content")
                stagings[-1].mkdir()
            else:
                stagings.append(directories[-1] / target.name)
                stagings[-1].touch()
            # the outputs get the permissions of any new file (tempfile makes the staging directory 0700)
            stagings[-1].chmod((0o777 if kind == "dir" else 0o666) & ~_umask())
        yield list(stagings)
        for staging in stagings:  # libraries writing into a staged directory may also make private files
            for file in [staging] if not staging.is_dir() else staging.rglob("*"):
                if file.is_file() and not file.is_symlink():  # an optional file deleted by the body: skipped
                    file.chmod(0o666 & ~_umask())
        moves = [(staging, target, kind, expected[_absolute(target)])
                 for staging, (target, kind) in zip(stagings, targets, strict=True)]
        _commit(moves, check)
    except BaseException as error:
        from .changes import _signals_deferred  # here: this module is read before torch is imported

        with _signals_deferred():  # a second Ctrl-C or SIGTERM must not stop the clean-up half-way
            for directory in directories:
                shutil.rmtree(directory, ignore_errors=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty: another program may have put something there meanwhile
        system_error = _system_error(error)
        if system_error is not None:  # a full disk, a file size limit, a vanished directory: not a bug
            names = ", ".join(str(t) for t, _ in targets)
            if system_error.errno == errno.ENOSPC:
                problem = f"no space left on the device holding {names}"
            else:
                problem = f"cannot write {names} ({system_error.strerror or system_error})"
            raise OutputPathError(
                f"{problem}; nothing was written: free some space or choose another location"
            ) from error
        raise
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders this call made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        made.append(path)
    return made


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def _system_error(error: BaseException) -> OSError | None:
    """The operating-system error behind ``error``: itself, or one a library wrapped in its own exception
    (safetensors' Rust writer says "... (os error 28)")."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, Exception) and not isinstance(error, PathSurgeonError):
        match = _OS_ERROR_IN_TEXT.search(str(error))
        if match:
            number = int(match[1] or match[2])
            return OSError(number, os.strerror(number))
    return None


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _commit(moves: list[tuple[Path, Path, str, State]], check: Callable[[], None] | None = None) -> None:
    """Rename each staging path over its target; on failure put the earlier targets back.

    A target is replaced only if it is still what the run saw (``State``); a new file goes in with a
    hard link, which never replaces an entry, so one that appears at the last moment is not lost either.
    """
    # (target, backup directory holding the file it replaced, staging, whether it replaced an empty directory)
    done: list[tuple[Path, Path | None, Path, bool]] = []
    try:
        for staging, target, kind, expected in moves:
            if kind == "optional file" and not staging.exists():
                continue  # the body had nothing to write there
            backup, was_empty_dir = None, False
            now = _state(target)
            if now != expected:
                raise _changed(target, expected, now)
            if now is not None and now[0] != ("emptydir" if kind == "dir" else "file"):
                raise OutputPathError(f"{target} is {_describe_state(now)}, where pathsurgeon writes a "
                                      f"{'directory' if kind == 'dir' else 'file'}; nothing was written: remove "
                                      "it or choose another path")
            if now is not None and kind == "dir":
                try:
                    target.rmdir()  # an empty directory the user made for us; fails if anything went into it
                except OSError as error:
                    raise _changed(target, expected, _state(target)) from error
                was_empty_dir = True
            elif now is not None:
                backup = _make_staging_dir(target)
                os.replace(target, backup / "previous")
                if _state(backup / "previous") != expected:  # swapped in the instant between the look and the move
                    _put_back(target, backup, False)
                    raise _changed(target, expected, _state(target))
            try:
                _place(staging, target, kind)
            except BaseException:
                _put_back(target, backup, was_empty_dir)
                raise
            done.append((target, backup, staging, was_empty_dir))
        if check is not None:
            check()
    except BaseException:
        for target, backup, staging, was_empty_dir in reversed(done):
            if _same_file(target, staging):
                target.unlink()  # placed by a hard link: rename() between two links of one file does nothing
            else:
                os.replace(target, staging)  # moved back to staging: the caller's cleanup removes it
            _put_back(target, backup, was_empty_dir)
        raise
    for _, backup, _, _ in done:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _place(staging: Path, target: Path, kind: str) -> None:
    """Put ``staging`` at ``target``, where nothing stands now, without ever replacing what appears there."""
    if kind == "dir":
        os.rename(staging, target)  # fails if a non-empty directory or a file appeared; an empty one holds nothing
        return
    try:
        os.link(staging, target)  # unlike rename, never replaces: a file that appeared meanwhile stays
    except FileExistsError as error:
        raise _changed(target, None, _state(target)) from error
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        os.rename(staging, target)  # a filesystem without hard links (FAT, some network mounts)


def _changed(target: Path, expected: State, now: State) -> OutputPathError:
    return OutputPathError(
        f"{target} changed while pathsurgeon ran (it held {_describe_state(expected)} when checked, now "
        f"{_describe_state(now)}: another program or run wrote there); nothing was written and it was left "
        "alone: choose another path, or remove it and run again"
    )


def _put_back(target: Path, backup: Path | None, was_empty_dir: bool) -> None:
    if backup is not None:
        os.replace(backup / "previous", target)
        shutil.rmtree(backup, ignore_errors=True)
    elif was_empty_dir:
        target.mkdir()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a staging file."""
    with staged([(Path(path), "file")]) as (staging,):
        staging.write_text(json.dumps(data, indent=2) + "\n")
