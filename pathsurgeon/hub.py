"""The Hugging Face and timm caches, and the offline policy: where a model's files come from.

Offline-first: the hub is contacted only when the user set ``HF_HUB_OFFLINE=0``
(:func:`downloads_allowed`); otherwise pretrained weights and configs come from the local cache, looked
up without touching the network. ``HF_HUB_CACHE`` is read at each call, not at import time.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from .errors import ModelSpecError, first_line

HF_CONFIG = "config.json"


def downloads_allowed() -> bool:
    """Offline-first: the hub is only contacted when the user set ``HF_HUB_OFFLINE=0``."""
    return os.environ.get("HF_HUB_OFFLINE") == "0"


def timm_pretrained_cfg(name: str):
    """timm's pretrained config for ``name``, None for an unknown tag (timm raises RuntimeError there)."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return None


def cached_timm_weights(name: str) -> str | None:
    """The pretrained weights file of a timm model in the local Hugging Face cache, if it is there.

    Looked up without touching the network, whatever HF_HUB_OFFLINE says; HF_HUB_CACHE is read now,
    not at import time.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # no pretrained cfg for this name
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id.split("@")[0]
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        path = try_to_load_from_cache(repo, filename, cache_dir=os.environ.get("HF_HUB_CACHE"))
        if isinstance(path, str):
            return path
    return None


def spec_reads(spec: str | None) -> list[Path]:
    """The files and folders loading ``spec`` reads, for the output-path checks.

    A local path is itself. A hub id, or a timm name with pretrained weights on the hub, reads its
    repository's folder in the Hugging Face cache (snapshots and the blobs their links point to), and
    a timm name with a download URL its file in torch's hub cache; the check resolves links, so an
    output named by the blob's path or by a link to it is refused too.
    """
    if not spec or not str(spec).strip():
        return []
    try:
        if Path(spec).exists():
            return [Path(spec)]
    except OSError:  # a name too long to be a path
        return []
    reads: list[Path] = []
    repos: list[str] = []
    import timm

    if timm.is_model(spec):
        try:
            cfg = timm.models.get_pretrained_cfg(spec)
        except Exception:  # noqa: BLE001 - no pretrained cfg for this name
            cfg = None
        if cfg is not None and cfg.hf_hub_id:
            repos.append(cfg.hf_hub_id.split("@")[0])
        if cfg is not None and isinstance(cfg.url, str) and cfg.url:
            reads.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0]))
        cached = cached_timm_weights(spec)
        if cached is not None:
            reads.append(Path(cached))
    elif "/" in spec:
        repos.append(spec)
    if repos:
        from huggingface_hub import constants

        cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
        reads += [cache / ("models--" + repo.replace("/", "--")) for repo in repos]
    return [path for path in reads if os.path.lexists(path)]


def hf_config_file(spec: str) -> Path:
    """The ``config.json`` of a local directory or of a hub id (from the cache, or downloaded if allowed)."""
    local = Path(spec)
    if local.is_dir():
        return local / HF_CONFIG
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        if downloads_allowed():
            return Path(hf_hub_download(spec, HF_CONFIG))
        cached = try_to_load_from_cache(spec, HF_CONFIG, cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception as error:  # an invalid repo id, a network failure, ...
        raise ModelSpecError(f"{spec} is not a usable Hugging Face hub id ({first_line(error)}); "
                             "pass a timm name, a hub id like owner/name, or a local directory") from error
    if not isinstance(cached, str):
        raise ModelSpecError(
            f"{spec} is not in the local Hugging Face cache nor a local directory; download it once with "
            "network (hf download), or pass a directory written by save_pretrained"
        )
    return Path(cached)


@contextlib.contextmanager
def transformers_quiet():
    """transformers prints a multi-line load report (and warnings) for a checkpoint that does not fit; our one
    error line says what matters."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%|███|" is a second line on every load
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
