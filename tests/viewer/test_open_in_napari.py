"""A recorded run opens in a real napari window through the napari-ome-zarr plugin."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pytest

from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.acquisition.sim import SimulatedSource
from scopestream.streaming.runner import SinkSpec, StreamRunner
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
