"""What the finder finds on every model a library lists: the net for a change to ``finder.py``.

Not a test. For every model of a library (the lists of ``benchmarks/coverage.py``), captures the
model as ``add`` does (on the meta device; on the CPU where capture needs real tensors) and records
the residual adds ``find_residual_adds`` takes, and which of them ``add`` would change, with no
forward and no surgery: about 25 minutes for all of timm on one core. Run it before and after a
finder change (each run writes one JSON lines file) and compare the two::

    .venv/bin/python benchmarks/finder_adds.py --library timm --out /tmp/before.jsonl   # old commit
    .venv/bin/python benchmarks/finder_adds.py --library timm --out /tmp/after.jsonl    # new commit
    .venv/bin/python benchmarks/finder_adds.py --compare /tmp/before.jsonl /tmp/after.jsonl

Every model whose adds moved is then a row to re-run in ``coverage.py`` (``--models``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import signal
import sys
import time
import warnings
from pathlib import Path

from coverage_composites import main_sweep  # benchmarks/, the script's own directory, is on sys.path

LIBRARIES = ("timm", "torchvision", "transformers")


class RowTimeout(Exception):
    pass


def build(library: str, name: str, device: str, small: bool):
    import torch

    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        if library == "timm":
            import timm

            return timm.create_model(name)
        if library == "torchvision":
            import torchvision

            return torchvision.models.get_model(name)
        cls, config = main_sweep()._hf_build(*name.split(":"), None, small)
        return cls(config)


def adds_of(library: str, name: str) -> dict:
    """The residual adds of one model: their count, blocks and the producers a hook would wrap."""
    from pathsurgeon.capture import capture
    from pathsurgeon.finder import find_residual_adds
    from pathsurgeon.surgery import _inputs

    error: Exception | None = None
    for device, small in (("meta", True), ("cpu", True), ("cpu", False)):
        try:
            model = build(library, name, device, small).eval()
            view = capture(model, _inputs(model, None, required=True)).view
        except Exception as failure:  # noqa: BLE001 - tried another way, or reported
            error = failure
            continue
        adds = find_residual_adds(view)
        return {"adds": len(adds), "on": device,
                "found": sorted(f"{a.block} <- {a.slot or a.producer or '(inline)'}" for a in adds)}
    raise error


def run(library: str, out: Path, timeout: int, only: str | None = None) -> None:
    def alarm(signum, frame):
        raise RowTimeout

    signal.signal(signal.SIGALRM, alarm)
    names = [n for n in main_sweep().model_names(library) if only is None or fnmatch.fnmatch(n, only)]
    done = {json.loads(line)["model"] for line in out.read_text().splitlines()} if out.exists() else set()
    with out.open("a") as handle:
        for name in names:
            if name in done:
                continue
            started = time.perf_counter()
            row = {"library": library, "model": name}
            signal.alarm(timeout)
            try:
                row.update(adds_of(library, name))
            except RowTimeout:
                row["error"] = f"over {timeout} s"
            except Exception as error:  # noqa: BLE001 - a row, not a crash
                row["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            finally:
                signal.alarm(0)
            row["seconds"] = round(time.perf_counter() - started, 1)
            handle.write(json.dumps(row) + "\n")
            handle.flush()


def compare(before: Path, after: Path) -> int:
    """Print every model whose adds moved between two runs; the number of such models."""
    def rows(path: Path) -> dict[str, dict]:
        return {r["model"]: r for r in map(json.loads, path.read_text().splitlines())}

    old, new = rows(before), rows(after)
    moved = 0
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        if a.get("found") == b.get("found") and a.get("error") == b.get("error"):
            continue
        moved += 1
        gone = sorted(set(a.get("found", [])) - set(b.get("found", [])))
        came = sorted(set(b.get("found", [])) - set(a.get("found", [])))
        print(f"{name}: {a.get('adds', a.get('error'))} -> {b.get('adds', b.get('error'))}; "
              f"gone {gone[:3]}{' ...' if len(gone) > 3 else ''}; new {came[:3]}{' ...' if len(came) > 3 else ''}")
    print(f"{moved} of {len(old.keys() & new.keys())} models moved; only in one run: "
          f"{len(old.keys() ^ new.keys())}")
    return moved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=LIBRARIES)
    parser.add_argument("--out", type=Path, help="JSON lines file to write (resumes where it stopped)")
    parser.add_argument("--only", help="glob over model names: only those")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model (default 120)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    arguments = parser.parse_args()
    if arguments.compare:
        compare(*arguments.compare)
        return 0
    if not (arguments.library and arguments.out):
        parser.error("pass --library and --out, or --compare BEFORE AFTER")
    run(arguments.library, arguments.out, arguments.timeout, arguments.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
