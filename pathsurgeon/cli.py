"""The ``pathsurgeon`` command line: a thin layer over the Python API.

``--help`` never imports torch, so it answers at once. Exit codes: 0 success, 1 verification failed,
2 bad usage or input (everything pathsurgeon refuses), 3 an internal error (a bug: rerun with --debug and
report it), 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP (staging files removed, nothing
written).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from ._version import __version__
from .choices import MODES, SCHEDULES

if TYPE_CHECKING:
    import re

    from .files import PathInputs

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shell's codes for SIGINT and SIGTERM
EXIT_CODES = {"SIGTERM": 143, "SIGHUP": 129}  # 128 + the signal number, as a shell reports it

DESCRIPTION = """\
Add per-sample stochastic depth (DropPath) to an already-built vision model, check that eval
outputs are unchanged, strip it again, and export the clean model to ONNX.

MODEL SPEC: a timm model name (vit_base_patch16_224), a Hugging Face hub id found in the local
cache (google/vit-base-patch16-224), or a local directory written by `pathsurgeon add --out` or by
save_pretrained. Pretrained weights are used when they are available locally; nothing is
downloaded (set HF_HUB_OFFLINE=0 to allow downloads)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error, like every other pathsurgeon error (argparse prints the usage too)."""

    def error(self, message: str):
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        _say(f"error: {message}; see {self.prog} --help")
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pathsurgeon", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add = commands.add_parser(
        "add", help="put DropPath on a model's residual branches, verify, optionally save",
        description="Put DropPath on every residual branch of MODEL, verify eval outputs, print the plan.",
    )
    add.add_argument("--model", required=True, metavar="SPEC", help="timm name, HF hub id, or local directory")
    add.add_argument(
        "--rate", required=True, type=_rate_or_published, metavar="R",
        help="drop-path rate in [0, 1), or 'published': the rate the model's authors fine-tuned with "
        "(pathsurgeon inspect shows it and its source; refused where none is recorded)",
    )
    _schedule_argument(add)
    add.add_argument(
        "--mode", default="sample", choices=MODES,
        help="sample: timm's per-sample drop path (default); skip: per-sample, dropped samples not computed; "
        "batch: one draw per branch per mini-batch, a dropped branch not computed; fixed_count: DINOv2's "
        "efficient stochastic depth, exactly max(int(B*(1-rate)), 1) samples computed, scaled by B/k",
    )
    add.add_argument("--weights", metavar="FILE", help="load a local checkpoint (.safetensors, or a torch state_dict)")
    _allow_missing_argument(add)
    add.add_argument("--out", metavar="DIR", help="write DIR/model.safetensors and DIR/pathsurgeon.json")
    add.add_argument("--json", metavar="FILE", help="write the plan and the check result as JSON")
    add.add_argument(
        "--require-pretrained", action="store_true",
        help="fail instead of continuing on random initialisation when no local pretrained weights exist",
    )
    add.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    inspect = commands.add_parser(
        "inspect", help="list the residual branches (and the rates a rate would give); changes nothing",
        description="List MODEL's residual branches and current rates; with --rate, the rates add would set.",
    )
    inspect.add_argument("--model", required=True, metavar="SPEC", help="timm name, HF hub id, or local directory")
    inspect.add_argument("--rate", type=float, metavar="R", help="show the rates this rate would give")
    _schedule_argument(inspect)
    inspect.add_argument("--weights", metavar="FILE", help="load a local checkpoint first")
    _allow_missing_argument(inspect)
    inspect.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    strip = commands.add_parser(
        "strip", help="write a clean checkpoint of the original architecture from a surgered one",
        description="Read a directory written by `add --out`, strip the surgery, write a clean checkpoint.",
    )
    strip.add_argument("--in", dest="source", required=True, metavar="DIR", help="directory written by add --out")
    strip.add_argument("--out", required=True, metavar="DIR", help="where to write the clean checkpoint")
    strip.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    export = commands.add_parser(
        "export", help="export a clean (stripped) model to ONNX and check it with onnxruntime",
        description="Export to ONNX in eval mode, without any pathsurgeon module (a surgered --in directory is "
        "stripped on the way). The batch axis is dynamic unless --static; onnxruntime's outputs are compared with "
        "PyTorch's at the traced batch and at batch 1 before the file is written.",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--in", dest="source", metavar="DIR", help="directory written by add --out or strip --out")
    source.add_argument("--model", metavar="SPEC", help="timm name, HF hub id, or local directory")
    export.add_argument("--weights", metavar="FILE", help="with --model: load a local checkpoint first")
    _allow_missing_argument(export)
    export.add_argument("--onnx", required=True, metavar="FILE", help="where to write the .onnx file")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: the exporter's)")
    export.add_argument(
        "--input-size", metavar="C,H,W",
        help="the image size to export at (default: the size the model's config states); height and width "
        "are fixed in the file",
    )
    export.add_argument(
        "--static", action="store_true",
        help="fix the batch size too, for runtimes that want static shapes (default: the batch axis is "
        "dynamic, the file takes any batch size)",
    )
    export.add_argument("--batch", type=int, metavar="N", help="with --static: the batch size to fix (default 1)")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _allow_missing_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-missing-keys", action="store_true",
        help="accept a checkpoint that lacks some of the model's weights (they stay randomly initialised); "
        "by default such a checkpoint is refused",
    )


def _schedule_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schedule", choices=SCHEDULES,
        help="auto: what the model's library does for its family (default; with --rate published, the "
        "authors' schedule); linear: 0 to R over depth; uniform: R everywhere",
    )


def _rate_or_published(text: str) -> float | str:
    if text == "published":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'published', got {text!r}") from None


_RATE_OPTION = {"what": "--rate", "example": "--rate 0.1"}  # a rate error in command-line words
_PATH_OPTIONS = {"model": "--model", "weights": "--weights", "source": "--in", "out": "--out", "json": "--json",
                 "onnx": "--onnx"}


EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away (| head -1)

# Outputs this run has put in place, so that a signal or a closed stdout afterwards says so, not "nothing
# was written".
_written: list[str] = []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _written.clear()
    # the whole run, reports included: a second signal while it stops is ignored; the program itself (no
    # argv: the console script) keeps ignoring them until it has exited
    with _terminate_as_exception(for_good=argv is None):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        with _offline_by_default(), _stdout_guarded():
            from .files import check_path_text

            for attribute, option in _PATH_OPTIONS.items():
                check_path_text(option, getattr(args, attribute, None))
            if getattr(args, "weights", None) is not None:  # before minutes of loading the model
                from .weights import check_weights_file

                check_weights_file(args.weights)
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _say(f"interrupted; {_what_was_written()}")
        return EXIT_INTERRUPTED
    except _Terminated as signal_received:
        _say(f"{signal_received.name} received; {_what_was_written()}")
        return EXIT_CODES[signal_received.name]
    except _StdoutFailed as failure:
        _stdout_to_devnull()  # the interpreter's last flush would fail the same way
        if failure.error.errno == errno.EPIPE:  # the reader went away (| head -1): not an error of ours
            return EXIT_PIPE
        _say(f"error: cannot write to standard output ({failure.error.strerror or failure.error}); "
             f"{_what_was_written()}: redirect it somewhere writable")
        return EXIT_USAGE
    except Exception as error:  # the one place errors become exit codes
        from .errors import PathSurgeonError, VerificationError

        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(error, VerificationError):
            _say(f"error: {_in_option_words(str(error))}")
            return EXIT_VERIFY
        if isinstance(error, PathSurgeonError):
            _say(f"error: {_in_option_words(str(error))}")
            return EXIT_USAGE
        _say(f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; "
             "rerun with --debug and report it")
        return EXIT_INTERNAL


# The library words a fix for a Python caller (a keyword argument, pathsurgeon.save); a command-line user
# reads the same fix in the options' words. No module but this one names an option (tests/test_layout.py).
_OPTION_WORDS: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (r"\bweights=FILE\b", "--weights FILE"),
    (r"\bweights=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", lambda found: f"--weights {ast.literal_eval(found[1])}"),
    (r"\bpass allow_missing_keys=True\b", "pass --allow-missing-keys"),
    (r"\bpass require_pretrained=False\b", "drop --require-pretrained"),
    (r"\b(written by|with) pathsurgeon\.save\b", r"\1 pathsurgeon add --out"),
    (r"\bpass the architecture as the spec and the file as\b",
     "give the architecture with --model NAME and the file with"),
    (r"\b(weights file .*; check the path)$", r"\1 given to --weights"),
    (r"\bcheck that the model is the checkpoint's\b", "check that --model names the checkpoint's"),
    (r"\bcheck that the model \(and its num_classes\) match\b", "check that --model (and num_classes) match"),
    (r"\bpass an opset between\b", "pass --opset between"),
    (r"^input size (?=['\"])", "--input-size "),
    (r"\binput_size=\((\d+), (\d+), (\d+)\)", r"--input-size \1,\2,\3"),
    (r"^input_size sets\b", "--input-size sets"),
    (r"\bdynamic_batch=False\b", "--static"),
    (r"\bbatch_size=(N|\d+)\b", r"--batch \1"),
)


def _in_option_words(message: str) -> str:
    """An error message of the library with each fix it names in the command line's options."""
    import re

    for pattern, words in _OPTION_WORDS:
        message = re.sub(pattern, words, message)
    return message


def _what_was_written() -> str:
    if not _written:
        return "nothing was written"
    return f"{' and '.join(_written)} {'was' if len(_written) == 1 else 'were'} written completely"


class _StdoutFailed(BaseException):
    """Standard output could not be written (a closed pipe, a full disk): the environment, not a bug."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _GuardedStream:
    """``sys.stdout`` with its write errors raised as :class:`_StdoutFailed`."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise _StdoutFailed(error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise _StdoutFailed(error) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _stdout_guarded() -> Iterator[None]:
    stream = sys.stdout
    sys.stdout = _GuardedStream(stream)
    try:
        yield
        sys.stdout.flush()  # a full disk shows at the flush: still a result of this run
    finally:
        sys.stdout = stream


def _stdout_to_devnull() -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # pytest's capture has no descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal), raised where the process is, so that staging files are cleaned
    up on the way out."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _terminate_as_exception(for_good: bool = False) -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`_Terminated`, SIGINT (where Python's default handler has it) raises
    KeyboardInterrupt; only the first signal does: the run is then stopping, and a second one (Ctrl-C twice,
    SIGTERM then SIGHUP) must neither cut its clean-up short nor change its exit code. ``for_good``: once
    a signal was taken, leave all three ignored (the process is exiting) instead of restoring them."""
    stopping: list[int] = []

    def handler(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(signal.Signals(signum).name)

    wanted = [getattr(signal, name) for name in EXIT_CODES if hasattr(signal, name)]  # no SIGHUP on Windows
    with contextlib.suppress(ValueError):  # not the main thread: getsignal works, signal() would not
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not one ignored (`cmd &`) or the caller's
            wanted.append(signal.SIGINT)
    try:
        previous = {number: signal.signal(number, handler) for number in wanted}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, signal.SIG_IGN if for_good and stopping else handler_before)


@contextlib.contextmanager
def _offline_by_default() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 unless the user set it (downloads are opt-in); the environment is restored after."""
    saved = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        for name in saved:
            os.environ.setdefault(name, "1")
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _say(message: str) -> None:
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # one line, whatever a path holds
    print(f"pathsurgeon: {message}", file=sys.stderr, flush=True)


class _Progress:
    """One line per stage on stderr, with the time the previous stage took."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        _say(f"[{time.perf_counter() - self.start:5.1f}s] {message}")


def _load_spec(args, progress):
    from .specs import load_model

    loaded = load_model(
        args.model, weights=getattr(args, "weights", None),
        require_pretrained=getattr(args, "require_pretrained", False),
        allow_missing_keys=getattr(args, "allow_missing_keys", False), say=progress,
    )
    for note in loaded.notes:
        _say(note)
    if loaded.saved_surgery is not None:
        _say(_saved_surgery_note(args, loaded.saved_surgery))
    return loaded


def _saved_surgery_note(args, surgery: dict) -> str:
    """One line for a directory written by ``add --out``: commands start from its weights, without the saved
    DropPath (``pathsurgeon.load(DIR)`` is what re-applies it)."""
    rate, mode = surgery.get("rate"), surgery.get("config", {}).get("mode", "sample")
    saved = f"rate {rate}" if isinstance(rate, (int, float)) else "per-block rates"
    if args.command == "add":
        what = f"this add drops it and applies --rate {args.rate} to the saved weights"
    elif args.command == "inspect":
        what = f"the rates shown are the model's without it (pathsurgeon.load({args.model!r}) re-applies it)"
    else:
        what = "the exported file has none of it"
    return f"{args.model} holds a model saved with DropPath ({saved}, mode {mode}); {what}"


def _model_inputs(args) -> PathInputs:
    """The paths a command reads, which no output may overwrite: for a hub id or timm name, the files in
    the Hugging Face (or torch hub) cache that loading it reads."""
    from .hub import spec_reads

    return {
        "--model": spec_reads(getattr(args, "model", None)),
        "--weights": getattr(args, "weights", None),
        "--in": getattr(args, "source", None),
    }


def _run_add(args) -> int:
    import json
    from pathlib import Path

    from .checkpoint import describe, write_checkpoint
    from .config import validate_rate
    from .files import check_outputs, staged
    from .surgery import add

    published = None
    if args.rate == "published":
        published = _published_by_name(args.model)  # a timm name or hub id: refused before loading
    else:
        rate = validate_rate(args.rate, **_RATE_OPTION)  # fail on bad input before loading anything
    inputs = _model_inputs(args)
    seen = check_outputs({"--out": (args.out, "dir"), "--json": (args.json, "file")}, inputs)
    progress = _Progress()
    loaded = _load_spec(args, progress)
    model = loaded.model
    if args.rate == "published":
        from .published import published_rate

        published = published or published_rate(model)
        rate = published.rate
    args.schedule = args.schedule or (published.schedule if published else "auto")
    count = sum(p.numel() for p in model.parameters())
    progress(f"finding residual branches and checking eval outputs ({count / 1e6:.1f}M parameters)")
    report = add(model, rate, schedule=args.schedule, mode=args.mode)
    progress("done")
    targets = [(Path(path), kind) for path, kind in ((args.out, "dir"), (args.json, "file")) if path is not None]
    if targets:  # written before anything is printed: a stdout that fails must not cost the outputs
        source, surgery = describe(model) if args.out is not None else (None, None)  # refused before writing
        with staged(targets, inputs, seen=seen) as stagings:  # both outputs appear together, or neither does
            staging = dict(zip([kind for _, kind in targets], stagings, strict=True))
            if args.out is not None:
                assert source is not None  # described above when args.out is set
                write_checkpoint(model, staging["dir"], source, surgery)
            if args.json is not None:
                plan = {"model": args.model, "rate": rate, "pretrained": loaded.pretrained, **report.to_dict()}
                staging["file"].write_text(json.dumps(plan, indent=2) + "\n")
        _written.extend(str(target) for target, _ in targets)
    if published is not None:
        print(f"published rate: {published}")
    print(report)
    if args.out is not None:
        print(f"wrote {args.out} (load it with pathsurgeon.load({args.out!r}))")
    if args.json is not None:
        print(f"wrote {args.json}")
    return EXIT_OK


def _published_by_name(spec: str):
    """The published rate for a timm name or hub id, None for a local directory (looked up once loaded)."""
    from pathlib import Path

    from .published import published_rate

    if Path(spec).exists():
        return None
    return published_rate(spec)


def _run_inspect(args) -> int:
    from .config import validate_rate
    from .published import model_names, published_rates
    from .report import Preview, format_branches
    from .surgery import find, preview

    rate = validate_rate(args.rate, **_RATE_OPTION) if args.rate is not None else None
    args.schedule = args.schedule or "auto"
    progress = _Progress()
    model = _load_spec(args, progress).model
    progress("finding residual branches")
    branches = find(model) if rate is None else preview(model, rate, schedule=args.schedule)
    heading = "current rates" if rate is None else f"rates for --rate {rate} --schedule {args.schedule}"
    print(f"{heading}:")
    print(format_branches(branches))
    blocks = len({b.block for b in branches})
    source = ""
    if rate is not None:
        assert isinstance(branches, Preview)  # preview() ran, which says where the rates come from
        source = f"; rates from {branches.rates_from}"
        if branches.rates_note:
            source += f" ({branches.rates_note})"
    print(f"{len(branches)} branches in {blocks} blocks{source}; nothing was changed")
    published = published_rates(model)
    names = " / ".join(model_names(model)) or type(model).__name__
    if not published:
        print(f"published fine-tuning rate for {names}: none recorded (recipes/published.toml)")
    for entry in published:
        print(f"published fine-tuning rate for {entry.matched}: {entry}")
    return EXIT_OK


def _run_strip(args) -> int:
    from pathlib import Path

    from .checkpoint import describe, load, write_checkpoint
    from .files import check_outputs, staged

    inputs = _model_inputs(args)
    seen = check_outputs({"--out": (args.out, "dir")}, inputs)
    progress = _Progress()
    progress(f"reading {args.source}")
    model = load(args.source, surgery=False)  # the weights, without re-applying the surgery
    source, surgery = describe(model)
    with staged([(Path(args.out), "dir")], inputs, seen=seen) as (staging,):  # never cleans up the --in directory
        write_checkpoint(model, staging, source, surgery)
    _written.append(str(args.out))
    print(f"wrote {args.out}: {type(model).__name__} with no pathsurgeon plan; {_after_strip(args.out, source)}")
    return EXIT_OK


def _after_strip(out: str, source: dict) -> str:
    """What a user does with a stripped checkpoint: export it, or load it in Python."""
    import shlex

    also = (f"{source['class']}.from_pretrained({out!r}) too" if source.get("library") == "transformers"
            else f"{out}/model.safetensors holds {source.get('library')}'s own keys")
    from . import versions

    python = f"pathsurgeon.load({out!r}) ({also})"
    if (versions.installed("torch") or ()) < versions.ONNX_EXPORT_TORCH:  # export would be refused here
        wanted = ".".join(map(str, versions.ONNX_EXPORT_TORCH))
        return f"next: in Python {python}; ONNX export (pathsurgeon export) needs torch >= {wanted}"
    return f"next: pathsurgeon export --in {shlex.quote(out)} --onnx model.onnx, or in Python {python}"


def _run_export(args) -> int:
    from .checkpoint import load
    from .errors import PathSurgeonError
    from .export import export_onnx, format_shape, parse_input_size, require_export, validate_opset
    from .files import check_outputs

    if args.source is not None and args.weights is not None:
        raise PathSurgeonError("--weights goes with --model; a --in directory already holds its weights")
    if args.opset is not None:
        validate_opset(args.opset)
    if args.batch is not None and not args.static:
        raise PathSurgeonError("--batch fixes the batch of a --static export; pass --static too, or leave --batch "
                               "out: without --static the file takes any batch size")
    if args.batch is not None and args.batch < 1:
        raise PathSurgeonError(f"--batch {args.batch} is not a positive integer; pass e.g. --batch 1")
    input_size = parse_input_size(args.input_size) if args.input_size is not None else None
    check_outputs({"--onnx": (args.onnx, "file")}, _model_inputs(args))
    require_export()  # before anything is read or built
    progress = _Progress()
    if args.source is not None:
        progress(f"reading {args.source}")
        model = load(args.source, surgery=False)  # the weights only: stripped on the way
    else:
        args.require_pretrained = False
        model = _load_spec(args, progress).model
    progress(f"exporting {type(model).__name__} to {args.onnx}")
    report = export_onnx(model, args.onnx, opset=args.opset, input_size=input_size,
                         dynamic_batch=not args.static, batch_size=args.batch)
    _written.append(str(args.onnx))
    progress("done")
    nodes = sum(report.op_types.values())
    signature = ", ".join(f"{name} {format_shape(shape)}" for name, shape in report.inputs.items())
    signature += " -> " + ", ".join(f"{name} {format_shape(shape)}" for name, shape in report.outputs.items())
    batches = " and ".join(str(b) for b in report.checked_batches)
    print(f"wrote {args.onnx}: {signature}; {nodes} nodes, no random ops; "
          f"onnxruntime vs PyTorch max |Δ| = {report.max_abs_diff:.3g} at batch {batches}")
    return EXIT_OK


_COMMANDS = {"add": _run_add, "inspect": _run_inspect, "strip": _run_strip, "export": _run_export}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
