"""`evaluate` scores each of a stain model's outputs against its own target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scopestream.inference.architectures import build, receptive_radius
from scopestream.inference.backends import make_backend
from scopestream.inference.manifest import Architecture, Manifest, Normalization
from scopestream.inference.package import save_package
from scopestream.inference.predictor import Predictor, halo_for
from scopestream.training.data import FieldData, Region
from scopestream.training.metrics import mean_metrics, region_metrics
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
    ev = evaluate(pkg, [field], regions, target_index=1)["metrics"]
    assert {"objects", "objects_target", "centroid_distance", "iou", "matched"} <= set(ev)



def _discs(centres: list[tuple[int, int]], r: float, shape: tuple[int, int] = (96, 96)) -> Any:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape, np.float64)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
    return img


def test_region_metrics_count_objects_and_measure_centroids_and_overlap() -> None:
    target = _discs([(20, 20), (20, 70), (70, 45)], 8)
    same = region_metrics(target * 3 + 5, target)  # units do not matter
    assert same["objects"] == same["objects_target"] == 3
    assert same["centroid_distance"] == 0 and same["iou"] == 1 and same["matched"] == 1
    # one nucleus missing, the others 3 px off: the count drops, distance 3 for those two
    # and the missing one's distance is to its nearest neighbour, far away
    moved = _discs([(23, 20), (20, 73)], 8)
    m = region_metrics(moved, target)
    assert m["objects"] == 2 and m["objects_target"] == 3
    assert m["matched"] == round(2 / 3, 4)
    iou3 = region_metrics(_discs([(23, 20)], 8), _discs([(20, 20)], 8))["iou"]
    assert iou3 is not None and 0.6 < iou3 < 0.8
    assert m["centroid_distance"] is not None and m["centroid_distance"] > 10
    # a flat prediction has no object: no distance or IoU is made up
    flat = region_metrics(np.zeros_like(target), target)
    assert flat["objects"] == 0 and flat["centroid_distance"] is None and flat["iou"] is None
    assert flat["matched"] == 0
    # noise specks below the minimum size are not objects
    specks = target.copy()
    specks[90, 5] = specks[5, 90] = 1.0
    assert region_metrics(specks, target)["objects"] == 3


def test_mean_metrics_leave_out_what_an_image_has_no_value_for() -> None:
    rows = [{"iou": 0.5, "objects": 2.0}, {"iou": None, "objects": 0.0}]
    assert mean_metrics(rows) == {"iou": 0.5, "objects": 1.0}
    assert mean_metrics([{"iou": None}]) == {"iou": None}
