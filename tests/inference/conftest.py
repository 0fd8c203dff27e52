from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import pytest
import torch

from scopestream.inference.architectures import build, receptive_radius
from scopestream.inference.manifest import Architecture, Manifest, Normalization
from scopestream.inference.package import ModelPackage, save_package
from scopestream.inference.predictor import halo_for

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from scopestream.inference.guard import Fingerprint

_counter = itertools.count()


def package(
    root: Path,
    *,
    name: str = "denoise",
    kind: str = "denoise_unet",
    params: dict[str, Any] | None = None,
    inputs: tuple[str, ...] = ("*",),
    outputs: tuple[str, ...] = ("*",),
    spatial: str = "2d",
    window: int = 1,
    seed: int = 0,
    norm: tuple[float, float] = (100.0, 300.0),
    fingerprint: Fingerprint | None = None,
) -> ModelPackage:
    """A real package: fresh weights (seeded), measured halo, ONNX export."""
    torch.manual_seed(seed)
    params = dict(params or {})
    module = build(kind, params)  # type: ignore[arg-type]
    task = "denoise" if kind == "denoise_unet" else "stain"
    man = Manifest(
        name=name,
        task=task,
        architecture=Architecture(kind=kind, params=params),  # type: ignore[arg-type]
        inputs=inputs,
        outputs=outputs,
        spatial=spatial,  # type: ignore[arg-type]
        window=window,
        size_multiple=module.size_multiple,
        halo=halo_for(receptive_radius(module), module.size_multiple),
        input_norm=Normalization(offset=(norm[0],), scale=(norm[1],)),
        output_norm=Normalization(offset=(norm[0],), scale=(norm[1],)),
        training={"data": "none (test weights)"},
        fingerprint=fingerprint,
    )
    return save_package(root / f"pkg{next(_counter)}", module, man)


@pytest.fixture
def make_package(tmp_path: Path) -> Callable[..., ModelPackage]:
    def make(**kw: Any) -> ModelPackage:
        return package(tmp_path, **kw)

    return make
