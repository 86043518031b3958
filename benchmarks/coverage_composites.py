"""Composites sweep: does every part of a composite get exactly what its own library builds?

Not a test. For every open_clip model config with a timm trunk, every segmentation_models_pytorch
encoder (its own, and ``tu-NAME`` for one timm model per timm family) and every Hugging Face class in
transformers' vision auto-mappings whose config holds a sub-config, it builds the composite on the
meta device (no weights, no downloads; Hugging Face configs at their defaults with every
``image_size`` cut to 64 pixels and ``num_hidden_layers`` to at most 6), asks
:func:`pathsurgeon.preview` for the rates ``add`` would give at rate R, and compares each part's
rates with the part's library built directly at R:

- a timm part: ``timm.create_model(architecture, drop_path_rate=R)`` (``features_only=True`` with the
  part's ``out_indices`` for a feature extractor), every drop-path module with a rate > 0, by name;
- a Hugging Face part: its class built from its own sub-config with ``drop_path_rate=R``;
- a part whose library has no drop path: pathsurgeon's rates must be linear over the part's own
  depth units (``torch.linspace(0, R, n)``), starting again at 0 in every part.

A row *agrees* when every part does, bitwise. Rows are JSON lines in
``benchmarks/coverage_results/composites.jsonl``; ``--write-doc`` writes docs/coverage-composites.md.

    nice -n 10 .venv/bin/python benchmarks/coverage_composites.py --budget 900 --row-timeout 60
    .venv/bin/python benchmarks/coverage_composites.py --source smp --only "dpn*" --redo error   # a re-check
    .venv/bin/python benchmarks/coverage_composites.py --write-doc
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fnmatch
import itertools
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

RATE = 0.2
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "coverage_results" / "composites.jsonl"
DOC = ROOT / "docs" / "coverage-composites.md"
SOURCES = ("open_clip", "smp", "transformers")
HF_MAPPINGS = (
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_MASK_GENERATION_MAPPING_NAMES", "MODEL_FOR_KEYPOINT_DETECTION_MAPPING_NAMES",
)


class RowTimeout(Exception):
    pass


# --- what to build -----------------------------------------------------------------------------------


def open_clip_names() -> list[str]:
    import open_clip

    names = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name) or {}
        if (config.get("vision_cfg") or {}).get("timm_model_name"):
            names.append(name)
    return sorted(names)


def smp_names() -> list[str]:
    import segmentation_models_pytorch as smp
    import timm
    from timm.models._registry import _model_to_module, get_arch_name

    own = sorted(smp.encoders.get_encoder_names())
    families: dict[str, str] = {}
    for name in timm.list_models():  # one timm model per family (module), the first by name
        families.setdefault(_model_to_module.get(get_arch_name(name), name), name)
    return own + [f"tu-{name}" for name in sorted(families.values())]


def transformers_names() -> list[str]:
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    names: set[str] = set()
    for mapping_name in HF_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, {})
        for key, classes in mapping.items():
            config_name = configuration_auto.CONFIG_MAPPING_NAMES.get(key)
            config_class = getattr(transformers, config_name, None) if config_name else None
            if config_class is None:
                continue
            holds = bool(getattr(config_class, "sub_configs", None)) or "backbone_config" in getattr(
                config_class.__init__, "__code__", type("", (), {"co_varnames": ()})
            ).co_varnames
            if not holds:
                continue
            for cls in classes if isinstance(classes, tuple) else (classes,):
                names.add(f"{key}:{cls}")
    return sorted(names)


def build(source: str, name: str):
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if source == "open_clip":
            import open_clip

            return open_clip.create_model(name, pretrained=None, device="meta")
        if source == "smp":
            import segmentation_models_pytorch as smp

            return smp.Unet(name, encoder_weights=None)
        import transformers
        from transformers.models.auto import configuration_auto

        key, class_name = name.split(":")
        config = getattr(transformers, configuration_auto.CONFIG_MAPPING_NAMES[key])()
        _small_images(config, set())
        return getattr(transformers, class_name)(config)


SMALL_IMAGE = 64
FEW_LAYERS = 6


def _small_images(config, seen: set[int]) -> None:
    """Every (sub-)config's ``image_size`` down to 64 pixels and ``num_hidden_layers`` to at most 6:
    capturing a default-size model (SAM's 1024 pixels, ALIGN's EfficientNet-B7 and BERT) takes
    minutes on the shared machine. The reference is built from the same cut config, so the comparison
    holds; per-stage ``depths`` lists are kept."""
    import transformers

    if id(config) in seen:
        return
    seen.add(id(config))
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and size > SMALL_IMAGE:
        with contextlib.suppress(Exception):
            config.image_size = SMALL_IMAGE
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > FEW_LAYERS:
        with contextlib.suppress(Exception):
            config.num_hidden_layers = FEW_LAYERS
    for value in vars(config).values():
        if isinstance(value, transformers.PretrainedConfig):
            _small_images(value, seen)


# --- the library's own rates for a part ------------------------------------------------------------------


def drop_rates(model, prefix: str) -> dict[str, float]:
    from pathsurgeon import slots as slot_lib

    return {
        (f"{prefix}.{n}" if prefix else n): slot_lib.existing_rate(m)
        for n, m in model.named_modules()
        if slot_lib.is_drop_path_module(m) and slot_lib.existing_rate(m) > 0
    }


def library_reference(model, part) -> tuple[dict[str, float] | None, str]:
    """(rates the part's library builds at RATE by slot name, how built); None: its library has none."""
    import timm
    import torch

    module = model.get_submodule(part.path) if part.path else model
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if part.library == "timm":
            architecture = module.pretrained_cfg["architecture"]
            kwargs = {}
            info = getattr(module, "feature_info", None)
            if hasattr(info, "out_indices") and not hasattr(module, "num_classes"):
                kwargs = {"features_only": True, "out_indices": tuple(info.out_indices)}
                deepest = max(info.reduction())
                if deepest < 32:
                    kwargs["output_stride"] = deepest
            built = timm.create_model(architecture, drop_path_rate=RATE, **kwargs)
            return drop_rates(built, part.path), f"timm.create_model({architecture!r}, drop_path_rate={RATE}, ...)"
        if part.library == "transformers":
            config = copy.deepcopy(module.config)
            if not isinstance(getattr(config, "drop_path_rate", None), (int, float)):
                return None, f"{type(config).__name__} has no drop_path_rate"
            config.drop_path_rate = RATE
            built = type(module)(config)
            return drop_rates(built, part.path), f"{type(module).__name__}(config, drop_path_rate={RATE})"
    return None, "no library"


def check(source: str, name: str) -> dict:
    import torch

    import pathsurgeon
    from pathsurgeon.parts import library_parts

    started = time.perf_counter()
    model = build(source, name)
    parameters = sum(p.numel() for p in model.parameters())
    parts = library_parts(model)
    row = {"parameters": parameters, "parts": [{"path": p.path, "library": p.library, "source": p.source,
                                                "verdict": "no branches"} for p in parts]}
    try:
        preview = pathsurgeon.preview(model, RATE)
    except pathsurgeon.NoBranchesError as error:
        return {**row, "status": "no branches", "error": str(error)[:200],
                "seconds": round(time.perf_counter() - started, 2)}
    row["parts"] = []
    verdicts = []
    for report in preview.parts:
        if not report.branches:
            row["parts"].append({"path": report.path, "source": report.source, "verdict": "left alone",
                                 "library": None})
            continue
        part = next(p for p in parts + [report] if p.path == report.path)
        got = {b.target: b.rate for b in preview if b.part == report.path}
        library = getattr(part, "library", None)
        reference, how = library_reference(model, part) if library in ("timm", "transformers") else (None, "")
        if reference is not None:
            positive = {k: v for k, v in got.items() if v > 0}
            missing = sorted(set(reference) - set(positive))
            extra = sorted(set(positive) - set(reference))
            off = sorted(k for k in set(reference) & set(positive) if reference[k] != positive[k])
            verdict = "agrees" if not (missing or extra or off) else "differs"
            detail = {"missing": missing[:3], "extra": extra[:3],
                      "off": [(k, reference[k], positive[k]) for k in off[:3]]}
        else:  # no library drop path: linear over the part's own depth units, from 0
            units = list(dict.fromkeys(b.unit for b in preview if b.part == report.path))
            expected = dict(zip(units, torch.linspace(0, RATE, len(units)).tolist(), strict=True))
            wrong = [b.block for b in preview if b.part == report.path and b.rate != expected[b.unit]]
            verdict = "agrees (linear)" if not wrong else "differs"
            detail = {"wrong": wrong[:3]}
            how = how or "linear over the part's own depth"
        verdicts.append(verdict)
        row["parts"].append({"path": report.path, "library": report.library, "source": report.source,
                             "rates_from": report.rates_from, "rates_note": report.rates_note[:200],
                             "branches": report.branches, "verdict": verdict,
                             "reference": how, **({"detail": detail} if verdict == "differs" else {})})
    if not verdicts:
        row["status"] = "no branches"
    elif any(v == "differs" for v in verdicts):
        row["status"] = "differs"
    else:
        row["status"] = "agrees"
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


# --- running -------------------------------------------------------------------------------------------


def names_of(source: str) -> list[str]:
    return {"open_clip": open_clip_names, "smp": smp_names, "transformers": transformers_names}[source]()


def done_rows() -> set[tuple[str, str]]:
    if not RESULTS.exists():
        return set()
    return {(r["source"], r["name"]) for r in map(json.loads, RESULTS.read_text().splitlines()) if r}


def forget(only: str, statuses: set[str]) -> None:
    """Remove the rows of the models ``only`` matches whose status is in ``statuses`` (they run again)."""
    if not RESULTS.exists():
        return
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
    kept = [r for r in rows if not (fnmatch.fnmatch(r["name"], only) and r["status"] in statuses)]
    staging = RESULTS.with_name(f".{RESULTS.name}.staging")
    staging.write_text("".join(json.dumps(r) + "\n" for r in kept))
    staging.replace(RESULTS)


def run(sources: list[str], budget: float, row_timeout: int, limit: int | None = None, only: str | None = None) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    start = time.monotonic()

    def alarm(signum, frame):
        raise RowTimeout

    signal.signal(signal.SIGALRM, alarm)
    # round robin over the sources, so that a run cut short by the budget covers each of them
    queues = [[(source, name) for name in names_of(source)[:limit]] for source in sources]
    order = [item for group in itertools.zip_longest(*queues) for item in group if item is not None]
    for source, name in order:
        if (source, name) in done or (only and not fnmatch.fnmatch(name, only)):
            continue
        if time.monotonic() - start > budget:
            print(f"budget of {budget:.0f} s spent; rerun to continue", flush=True)
            return
        row = {"source": source, "name": name, "commit": commit}
        signal.alarm(row_timeout)
        try:
            row.update(check(source, name))
        except RowTimeout:
            row.update(status="timeout", error=f"over {row_timeout} s")
        except Exception as error:  # noqa: BLE001 - a row, not a crash
            first = (str(error).strip().splitlines() or [""])[0][:300]
            row.update(status="error", error=f"{type(error).__name__}: {first}",
                       where=traceback.format_exc().strip().splitlines()[-3:][0][:200])
        finally:
            signal.alarm(0)
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{source:12} {name:50} {row['status']}", flush=True)


def write_doc(command: str) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
    import open_clip
    import segmentation_models_pytorch as smp
    import timm
    import torch
    import transformers

    lines = [
        "# Composites coverage",
        "",
        "Generated by `benchmarks/coverage_composites.py` (see its docstring for what is compared). Every",
        "composite is built on the meta device (no weights, no downloads) and `pathsurgeon.preview(model, "
        f"{RATE})` is compared, part by part, with the part's own library built at that rate: timm parts with",
        "`timm.create_model(architecture, drop_path_rate=R)` (features_only with the part's out_indices for",
        "feature extractors), Hugging Face parts with their class built from their own sub-config with",
        "`drop_path_rate=R`; parts whose library has no drop path must be linear over their own depth.",
        "Blocks outside every library part are left alone by default (see the README, *Models inside models*).",
        "",
        f"Versions: torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
        f"open_clip {open_clip.__version__}, segmentation_models_pytorch {smp.__version__}; Python "
        f"{platform.python_version()}. Run: `{command}`.",
        "",
        "| source | models listed | run | agrees | differs | no branches | error | timeout |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        counts = Counter(r["status"] for r in mine)
        lines.append(f"| {source} | {len(names_of(source))} | {len(mine)} | {counts['agrees']} | "
                     f"{counts['differs']} | {counts['no branches']} | {counts['error']} | {counts['timeout']} |")
    lines += ["", "Models listed but not run: the run's time budget was spent first (round robin over the three "
              "sources, so each is covered in part); rerunning the command resumes where it stopped."]
    lines += ["", "| source | model | status | parts (path: library, rates from, branches, verdict) | note |",
              "| --- | --- | --- | --- | --- |"]
    for row in rows:
        parts = "; ".join(
            f"`{p['path'] or '(model)'}`: " + (
                p["verdict"] if p["verdict"] in ("left alone", "no branches") else
                f"{p.get('library') or 'none'}, {p['rates_from']}, {p['branches']}, {p['verdict']}"
            )
            for p in row.get("parts", [])
        )
        note = row.get("error") or "; ".join(
            json.dumps(p["detail"]) for p in row.get("parts", []) if p.get("detail")
        )
        note = note.replace("|", "\\|")[:200]
        lines.append(f"| {row['source']} | {row['name']} | {row['status']} | {parts} | {note} |")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"Written {stamp}."]
    temporary = DOC.with_suffix(".md.tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(DOC)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", choices=SOURCES, help="default: all three")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    parser.add_argument("--row-timeout", type=int, default=120, help="seconds per model (default 120)")
    parser.add_argument("--limit", type=int, help="only the first N models of each source (a trial run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file (default: %(default)s)")
    parser.add_argument("--only", help="glob over model names: run only those")
    parser.add_argument("--redo", default="", help="comma-separated statuses of --only's rows to run again (error)")
    parser.add_argument("--write-doc", metavar="COMMAND", nargs="?", const="",
                        help="write docs/coverage-composites.md from the results; COMMAND: how they were run")
    arguments = parser.parse_args()
    RESULTS = arguments.results
    if arguments.write_doc is not None:
        write_doc(arguments.write_doc or "see the docstring")
        return
    with contextlib.suppress(KeyboardInterrupt):
        if arguments.only and arguments.redo:
            forget(arguments.only, set(arguments.redo.split(",")))
        run(arguments.source or list(SOURCES), arguments.budget, arguments.row_timeout, arguments.limit,
            arguments.only)


if __name__ == "__main__":
    sys.exit(main())
