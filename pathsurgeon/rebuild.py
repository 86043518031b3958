"""Reading a pathsurgeon directory: the model its manifest names, rebuilt with its weights, without surgery.

``pathsurgeon.json`` is validated against the schema (:mod:`pathsurgeon.manifest`), and only
allow-listed plain architecture arguments reach a constructor. Before anything is allocated, the
architecture is built on the meta device against the weights' shapes, and run once there where the
manifest's arguments change it. Re-applying the saved surgery is :func:`pathsurgeon.load`'s part.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ManifestError, ModelSpecError, first_line
from .hf_models import load_transformers
from .hub import timm_pretrained_cfg
from .manifest import MANIFEST, read_manifest
from .untrusted import check_build_against_weights
from .weights import WEIGHTS, load_weights, weights_shapes


def rebuild(
    directory: Path, say: Callable[[str], None], *, allow_missing_keys: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a pathsurgeon directory with its weights, without surgery; and the checked manifest."""
    if not (directory / MANIFEST).exists():  # one that is there but no regular file: read_manifest says so
        raise ModelSpecError(f"{directory} has no {MANIFEST}; pass a directory written by pathsurgeon.save")
    manifest = read_manifest(directory)
    source = manifest["source"]
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in source.get("kwargs", {}).items()}
    where = directory / MANIFEST
    if source["library"] == "timm":
        import timm

        name = source["name"]
        if not timm.is_model(name) or ("." in name and timm_pretrained_cfg(name) is None):
            raise ManifestError(f"{where} names timm model {name!r}, which timm "
                                f"{timm.__version__} does not know; upgrade timm or fix the name")
        build = lambda: timm.create_model(name, pretrained=False, **kwargs)  # noqa: E731
    elif source["library"] == "torchvision":
        import torchvision

        name = source["name"]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ManifestError(f"{where} names torchvision builder {name!r}, which torchvision "
                                f"{torchvision.__version__} does not have; upgrade torchvision or fix the name")
        build = lambda: torchvision.models.get_model(name, weights=None, **kwargs)  # noqa: E731
    if source["library"] in ("timm", "torchvision"):
        # the weights file first (a 0-byte file is noticed before a large model is built), then the
        # architecture on the meta device against the weights' shapes: nothing is allocated for a manifest
        # whose arguments the weights do not fit (img_size 65536) or the constructor refuses (global_pool 'zzz')
        shapes = weights_shapes(directory / WEIGHTS)
        check_build_against_weights(
            build, shapes, f"{where}'s {source['library']} model {name} with {source.get('kwargs', {})}",
            "rewrite the directory with pathsurgeon.save", error_class=ManifestError,
        )
        _check_meta_forward(build, source, name, where)
        say(f"rebuilding {source['library']} model {name} from {directory}")
        try:
            model = build()
        except Exception as error:  # noqa: BLE001 - the meta build passed; this is the same constructor
            raise ManifestError(f"{where}: {name} cannot be built with {source.get('kwargs', {})} "
                                f"({type(error).__name__}: {first_line(error)}); rewrite the directory with "
                                "pathsurgeon.save") from error
        load_weights(model, directory / WEIGHTS, allow_missing_keys=allow_missing_keys)
    else:
        model, _ = load_transformers(
            str(directory), say, class_name=source["class"], allow_missing_keys=allow_missing_keys
        )
    return model, manifest


def _check_meta_forward(build: Callable[[], nn.Module], source: dict[str, Any], name: str, where: Path) -> None:
    """A manifest's arguments may build a model whose own forward fails (timm ResNet with ``global_pool: ""``
    feeds unpooled maps to its classifier). A forward on the meta device costs nothing: refuse the
    arguments when it fails and the same model without them runs."""
    from .libraries import meta_build

    kwargs = source.get("kwargs", {})
    if not kwargs:
        return

    def forward_error(make: Callable[[], nn.Module]) -> str | None:
        try:
            model = meta_build(make).eval()
            if source["library"] == "timm":
                default = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
                size = kwargs.get("img_size", default[1:])
                size = [size, size] if isinstance(size, int) else list(size)
                shape = (1, kwargs.get("in_chans", default[0]), *size)
            else:
                size = kwargs.get("image_size", 224)
                shape = (1, 3, size, size)
            with torch.no_grad():
                model(torch.empty(shape, device="meta"))
        except Exception as error:  # noqa: BLE001 - any failure of the model's own forward
            return f"{type(error).__name__}: {first_line(error)}"
        return None

    error = forward_error(build)
    if error is None:
        return
    import timm
    import torchvision

    plain = (lambda: timm.create_model(name, pretrained=False)) if source["library"] == "timm" else (
        lambda: torchvision.models.get_model(name, weights=None))
    if forward_error(plain) is None:
        raise ManifestError(f"{where}: {name} built with {kwargs} cannot run its own forward ({error}); rewrite "
                            "the directory with pathsurgeon.save")
