"""`evaluate` scores each of a stain model's outputs against its own target."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from scopestream.inference.architectures import build, receptive_radius
from scopestream.inference.backends import make_backend
from scopestream.inference.manifest import Architecture, Manifest, Normalization
from scopestream.inference.package import save_package
from scopestream.inference.predictor import Predictor, halo_for
from scopestream.training.data import FieldData, Region
from scopestream.training.train import evaluate

if TYPE_CHECKING:
    from pathlib import Path


def test_each_stain_output_is_scored_against_the_target_of_its_index(tmp_path: Path) -> None:
    torch.manual_seed(0)
    params = {"base": 8, "depth": 2, "out_channels": 2}
    net = build("stain_unet", params)
    man = Manifest(
        name="stain2",
        task="stain",
        architecture=Architecture(kind="stain_unet", params=params),
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
        size_multiple=net.size_multiple,
        halo=halo_for(receptive_radius(net), net.size_multiple),
        input_norm=Normalization(offset=(100.0,), scale=(50.0,)),
        output_norm=Normalization(offset=(0.0, 0.0), scale=(1.0, 1.0)),
        training={"data": "none (test weights)"},
    )
    pkg = save_package(tmp_path / "pkg", net, man)
    rng = np.random.default_rng(0)
    frames = rng.normal(100, 50, (2, 64, 64)).astype(np.float32)
    pred = Predictor(pkg, make_backend(pkg, "auto"))
    outs = np.stack([pred.predict(f) for f in frames])  # (N, 2, Y, X)
    unrelated = rng.normal(0, 1, frames.shape).astype(np.float32)
    # target 0 has nothing to do with the model; target 1 is exactly its second output
    field = FieldData("f", frames, targets=[unrelated, outs[:, 1]], target_names=["n", "m"])
    regions = [Region(0, slice(0, 64), slice(0, 64))]
    second = evaluate(pkg, [field], regions, target_index=1)["metrics"]["pearson"]
    first = evaluate(pkg, [field], regions, target_index=0)["metrics"]["pearson"]
    assert second > 0.999
    assert abs(first) < 0.2

