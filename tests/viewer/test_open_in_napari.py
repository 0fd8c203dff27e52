"""A recorded run opens in a real napari window through the napari-ome-zarr plugin."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np
import pytest

from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.acquisition.sim import SimulatedSource
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.runner import SinkSpec, StreamRunner
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.zarr_sink import ZarrSink

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.qt


def test_run_opens_in_napari_with_ome_zarr_plugin(tmp_path: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    napari = pytest.importorskip("napari")
    out = tmp_path / "run.ome.zarr"
    plan = AcquisitionPlan.timelapse(12, channels=(ChannelSpec(name="nuclei", exposure_ms=10),))
    src = SimulatedSource((128, 96), plan, seed=2)
    summary = StreamRunner(src, [SinkSpec("zarr", ZarrSink(out, src.info), records=True)]).run(30)
    assert summary["frames_written"] == 12

    viewer = napari.Viewer(show=False)
    try:
        layers = viewer.open(str(out), plugin="napari-ome-zarr")
        assert [layer.name for layer in layers] == ["raw: nuclei"]
        layer = layers[0]
        data = layer.data[0] if layer.multiscale else layer.data
        assert tuple(data.shape) == (12, 1, 128, 96)  # t, z, y, x (channel split into layers)
        frame = np.asarray(data[11, 0])
        assert frame.std() > 1  # pixels, not the fill value
        np.testing.assert_allclose(layer.scale[-2:], [0.325, 0.325])
    finally:
        viewer.close()


def _run_with_skipped_predictions(tmp_path: Path) -> Path:
    """Raw at t = 0..3; a 'latest' model predicted t = 0 and 2 only."""
    info = StreamInfo(frame_shape=(32, 40), dtype="uint16", n_t=4, channel_names=("nuclei",))
    sink = ZarrSink(tmp_path / "run.ome.zarr", info)
    out = sink.add_output("denoise", channel_names=("nuclei",), provenance={"task": "denoise"})
    rng = np.random.default_rng(0)
    for t in range(4):
        sink.write(rng.normal(400, 30, (32, 40)).astype(np.uint16), make_meta(t=t))
        if t % 2 == 0:
            out.write(rng.normal(0.5, 0.1, (32, 40)).astype(np.float32), make_meta(t=t))
    sink.close()
    return tmp_path / "run.ome.zarr"


def test_time_points_an_output_lacks_are_marked_not_predicted(tmp_path: Path) -> None:
    from scopestream.viewer.saved import not_predicted, run_layers, time_point_text

    run = _run_with_skipped_predictions(tmp_path)
    specs = run_layers(run)
    assert [s.name for s in specs] == ["nuclei (raw)", "nuclei (denoised)"]
    assert not_predicted(run, specs, 0) == [] and not_predicted(run, specs, 2) == []
    assert not_predicted(run, specs, 1) == ["nuclei (denoised)"]
    assert "not predicted" in time_point_text(run, specs, 3)
    assert "nuclei (denoised)" in time_point_text(run, specs, 3)
    assert time_point_text(run, specs, 2) == ""
    assert np.isnan(np.asarray(specs[1].data[1])).all()  # missing, not a prediction of 0
    lo, hi = specs[1].contrast_limits
    assert 0.1 < lo < hi < 0.9

    # a run recorded before NaN fill: its skipped frames read 0, and are still marked
    meta_file = SavedRun(run).image("denoise").path / "0" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["fill_value"] = 0.0
    meta_file.write_text(json.dumps(meta))
    old = run_layers(run)
    assert (np.asarray(old[1].data[1]) == 0).all()
    assert not_predicted(run, old, 1) == ["nuclei (denoised)"]


def test_view_overlays_not_predicted_on_a_skipped_time_point(tmp_path: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    napari = pytest.importorskip("napari")
    from scopestream.viewer.saved import open_run

    run = _run_with_skipped_predictions(tmp_path)
    viewer = napari.Viewer(show=False)
    try:
        open_run(viewer, run)
        text = viewer.canvas.overlays.text
        assert viewer.dims.current_step[0] == 2  # the newest time point both images have
        assert not text.visible
        viewer.dims.set_current_step(0, 3)
        assert text.visible and "not predicted: nuclei (denoised)" in text.text
        viewer.dims.set_current_step(0, 0)
        assert not text.visible
    finally:
        viewer.close()


def test_napari_ome_zarr_shows_raw_and_output_in_their_data_windows(tmp_path: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    napari = pytest.importorskip("napari")
    run = _run_with_skipped_predictions(tmp_path)
    viewer = napari.Viewer(show=False)
    try:
        # the run is one collection: its series (raw, then the output) open together
        raw, out = viewer.open(str(run), plugin="napari-ome-zarr")
        assert [raw.name, out.name] == ["raw: nuclei", "denoise: nuclei"]
        lo, hi = raw.contrast_limits
        assert 250 < lo < 400 < hi < 550  # not 0..65535: the frames are visible
        lo, hi = out.contrast_limits
        assert 0.1 < lo < 0.5 < hi < 0.9  # not (0, 1): not flat saturated colour
        # and the output's image group opens on its own too
        (alone,) = viewer.open(str(SavedRun(run).image("denoise").path), plugin="napari-ome-zarr")
        assert alone.contrast_limits == pytest.approx(out.contrast_limits)
    finally:
        viewer.close()
