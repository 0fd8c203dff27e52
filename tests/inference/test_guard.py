"""The domain-shift guard: warnings when live data is unlike a model's training data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.acquisition.sample import OpticsModel, SimulatedMicroscope
from scopestream.acquisition.sim import SimulatedSource
from scopestream.inference.guard import DomainGuard, Fingerprint, fingerprint_of
from scopestream.inference.package import Registry
from scopestream.pipeline import Pipeline
from scopestream.streaming.frame import make_meta

if TYPE_CHECKING:
    from pathlib import Path


def _frames(n: int, mean: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.poisson(mean, (128, 128)).astype(np.uint16) + 100 for _ in range(n)]


def _meta(seq: int, exposure: float = 10.0, p: int = 0) -> Any:
    return {**make_meta(t=seq, c=0, exposure_ms=exposure, p=p), "seq": seq}


def test_matching_frames_raise_nothing_and_shifted_ones_each_kind_once() -> None:
    fp = fingerprint_of(
        _frames(8, 50.0), channels=["nuclei"], pixel_size_um=0.325, exposures_ms=[5, 10],
        dtype="uint16",
    )  # fmt: skip
    assert fp.exposure_ms == (5.0, 10.0) and fp.channels == ("nuclei",)
    ok = DomainGuard(fp, ("nuclei",), pixel_size_um=0.33, every=1)  # 1.5 % off: the same
    assert ok.check_stream([0]) == []
    for i, f in enumerate(_frames(12, 50.0, seed=1)):
        assert ok.check_frame(f, _meta(i)) is None
    assert ok.describe()["warnings"] == [] and ok.checked_frames == 12

    off = DomainGuard(fp, ("brightfield",), pixel_size_um=0.65, every=1, run_length=3)
    assert {w.kind for w in off.check_stream([0])} == {"pixel_size", "channel"}
    bright = _frames(6, 500.0, seed=2)  # ten times the signal
    new = [off.check_frame(f, _meta(i, exposure=100.0)) for i, f in enumerate(bright)]
    assert new[0] is not None and new[0].kind == "exposure"  # at once
    assert new[1] is None and new[2] is not None and new[2].kind == "statistics"  # 3 in a row
    assert "p1" in new[2].message and "training range" in new[2].message
    assert off.counts() == {"pixel_size": 1, "channel": 1, "exposure": 6, "statistics": 4}


def test_one_odd_frame_is_not_a_shift_and_fields_are_kept_apart() -> None:
    fp = fingerprint_of(_frames(8, 50.0))
    g = DomainGuard(fp, ("raw",), every=1, run_length=2)
    normal, bright = _frames(4, 50.0, seed=3), _frames(4, 500.0, seed=4)
    g.check_frame(bright[0], _meta(0))  # one odd frame ...
    g.check_frame(normal[0], _meta(1))  # ... then normal again: the run is broken
    g.check_frame(bright[1], _meta(2, p=1))  # field 1's first: not field 0's second
    assert g.warnings == {}
    g.check_frame(bright[2], _meta(3, p=1))
    assert [(w.kind, w.p) for w in g.warnings.values()] == [("statistics", 1)]
    assert g.describe(0)["warnings"] == [] and len(g.describe(1)["warnings"]) == 1


def test_without_a_fingerprint_nothing_is_checked() -> None:
    g = DomainGuard(None, ("raw",), pixel_size_um=5.0, every=1)
    assert g.check_stream([0]) == []
    assert g.check_frame(_frames(1, 5000.0)[0], _meta(0, exposure=1e4)) is None
    assert g.describe() == {"fingerprint": False, "checked_frames": 0, "counts": {},
                            "warnings": []}  # fmt: skip


def _run(tmp_path: Path, name: str, channel: ChannelSpec, pixel_um: float, model: str) -> Any:
    plan = AcquisitionPlan(channels=(channel,), time_points=16)
    src = SimulatedSource(
        (128, 128), plan, seed=7,
        microscope=SimulatedMicroscope((128, 128), seed=7, optics=OpticsModel(pixel_um)),
    )  # fmt: skip
    cfg = {"models": [model], "model_policy": "all", "out": str(tmp_path / f"{name}.ome.zarr"),
           "watch_registry": False, "backend": "onnxruntime"}  # fmt: skip
    with Pipeline.from_config(cfg) as pipe:
        pipe.build(source=src)
        summary = pipe.run()
    assert summary["status"] == "complete"
    return summary["models"][f"model:{model}"]["domain_shift"]


@pytest.mark.parametrize(
    ("model", "channel"),
    [("denoise", ChannelSpec(name="nuclei", exposure_ms=50.0)),
     ("stain", ChannelSpec(name="brightfield", exposure_ms=5.0))],
)  # fmt: skip
def test_the_bundled_models_warn_on_shifted_data_and_not_on_matching_data(
    tmp_path: Path, model: str, channel: ChannelSpec
) -> None:
    fp = Registry().resolve(model).manifest.fingerprint
    assert isinstance(fp, Fingerprint) and fp.exposure_ms and fp.pixel_size_um
    top = fp.exposure_ms[1]
    assert channel.exposure_ms == top  # the regime it was trained in
    same = _run(tmp_path, "same", channel, fp.pixel_size_um, model)
    assert same["fingerprint"] and same["checked_frames"] >= 2
    assert same["warnings"] == [], same["warnings"]
    shifted = channel.model_copy(update={"exposure_ms": 10 * top})
    ds = _run(tmp_path, "shifted", shifted, 2 * fp.pixel_size_um, model)
    kinds = {w["kind"] for w in ds["warnings"]}
    assert {"exposure", "pixel_size"} <= kinds, ds
    assert ds["counts"]["exposure"] == 16  # every frame given to the model
