"""Which field the window shows: the plate's wells, thumbnails, and the display's per-field
frames (no Qt), then the selector and plate overview in a real napari window."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import Position, StreamInfo
from scopestream.viewer.frames import LatestFrames
from scopestream.viewer.plate import plate_layout, thumbnail

if TYPE_CHECKING:
    from pathlib import Path


def _fields(*wells: str, per_well: int = 1) -> tuple[Position, ...]:
    return tuple(
        Position(f"{w}_{k:04d}", x_um=100.0 * i, y_um=10.0 * k, well=w, field=k)
        for i, w in enumerate(wells)
        for k in range(per_well)
    )


def test_plate_layout_spans_the_wells_imaged() -> None:
    lay = plate_layout(_fields("A1", "A2", "B3", per_well=2))
    assert lay is not None
    assert (lay.rows, lay.columns) == (["A", "B"], [1, 2, 3])
    assert lay.wells == {"A1": [0, 1], "A2": [2, 3], "B3": [4, 5]}
    assert lay.cells == {"A1": (0, 0), "A2": (0, 1), "B3": (1, 2)}
    assert lay.well_of(5) == "B3" and lay.well_of(9) is None
    # 1536-well plates have two-letter rows: Z, AA, AB follow each other
    wide = plate_layout(_fields("Z1", "AB1"))
    assert wide is not None and wide.rows == ["Z", "AA", "AB"]
    # positions that name no well are not a plate
    assert plate_layout((Position("left", x_um=0.0), Position("right", x_um=9.0))) is None


def test_thumbnail_is_small_uint8_and_uses_the_data_range() -> None:
    frame = np.zeros((512, 300), np.float32)
    frame[:, 150:] = 1000.0
    frame[0, 0] = np.nan  # a float output's "not predicted" fill
    pic = thumbnail(frame, size=64)
    assert pic.dtype == np.uint8 and max(pic.shape) <= 64
    assert pic[:, : pic.shape[1] // 3].max() == 0 and pic[:, -2:].min() == 255
    assert (thumbnail(np.full((8, 8), np.nan)) == 0).all()


def _two_fields() -> StreamInfo:
    return StreamInfo(
        frame_shape=(8, 8),
        dtype="uint16",
        n_t=4,
        channel_names=("bf", "nuclei"),
        positions=_fields("A1", "B2"),
    )


def test_display_keeps_each_field_and_shows_one_at_a_time() -> None:
    lf = LatestFrames(_two_fields(), max_hz=0)
    lf.write(np.full((8, 8), 10, np.uint16), make_meta(t=0, c=0, p=0))
    lf.write(np.full((8, 8), 11, np.uint16), make_meta(t=0, c=1, p=0))
    lf.put_prediction("denoise", "denoised", ("nuclei",),
                      np.full((1, 8, 8), 0.5, np.float32), make_meta(t=0, c=1, p=0))  # fmt: skip
    lf.write(np.full((8, 8), 20, np.uint16), make_meta(t=0, c=0, p=1))
    seen: dict[str, tuple[int, int]] = {}
    # following the acquisition: the field imaged last, and only its images
    shown = {s.key: s for s in lf.changed(seen)}
    assert lf.showing == 1 and set(shown) == {"bf (raw)"}
    assert int(shown["bf (raw)"].data[0, 0]) == 20 and shown["bf (raw)"].p == 1
    # choosing field 0 hands over every image of field 0, even those seen before
    lf.select(0)
    shown = {s.key: s for s in lf.changed(seen)}
    assert set(shown) == {"bf (raw)", "nuclei (raw)", "nuclei (denoised)"}
    assert {k: float(s.data[0, 0]) for k, s in shown.items()} == {
        "bf (raw)": 10.0, "nuclei (raw)": 11.0, "nuclei (denoised)": 0.5
    }  # fmt: skip
    assert all(s.p == 0 for s in shown.values())
    lf.write(np.full((8, 8), 21, np.uint16), make_meta(t=1, c=0, p=1))
    assert lf.changed(seen) == []  # field 1 moved on; field 0 is shown
    lf.select(None)
    assert [int(s.data[0, 0]) for s in lf.changed(seen)] == [21]
    # a thumbnail per field from its newest first-channel frame, once per new frame
    thumbs_seen: dict[int, int] = {}
    assert set(lf.thumbnails(thumbs_seen)) == {0, 1}
    assert lf.thumbnails(thumbs_seen) == {}
    lf.write(np.full((8, 8), 12, np.uint16), make_meta(t=1, c=0, p=0))
    assert set(lf.thumbnails(thumbs_seen)) == {0}


def test_a_single_field_run_has_no_thumbnails() -> None:
    info = StreamInfo(frame_shape=(8, 8), dtype="uint16", n_t=2, channel_names=("bf",))
    lf = LatestFrames(info, max_hz=0)
    lf.write(np.full((8, 8), 3, np.uint16), make_meta(t=0, c=0))
    assert lf.thumbnails({}) == {} and [s.key for s in lf.changed({})] == ["bf (raw)"]


# -- in napari ------------------------------------------------------------------------------


def _plate_run(tmp_path: Path) -> tuple[Path, dict[tuple[int, int, int], np.ndarray]]:
    """A recorded 2-well × 2-field run with a denoise output; each frame's pixels."""
    from scopestream.streaming.zarr_sink import ZarrSink

    info = StreamInfo(
        frame_shape=(16, 16), dtype="uint16", n_t=2, channel_names=("nuclei",),
        positions=_fields("A1", "A2", per_well=2),
    )  # fmt: skip
    sink = ZarrSink(tmp_path / "P.ome.zarr", info)
    out = sink.add_output("denoise", channel_names=("nuclei",), provenance={"task": "denoise"})
    rng = np.random.default_rng(0)
    frames = {}
    for t in range(2):
        for p in range(4):
            frame = rng.integers(100 * (p + 1), 100 * (p + 1) + 50, (16, 16)).astype(np.uint16)
            frames[t, p, 0] = frame
            sink.write(frame, make_meta(t=t, p=p))
            out.write(frame.astype(np.float32) / 1000, make_meta(t=t, p=p))
    sink.close()
    return tmp_path / "P.ome.zarr", frames


@pytest.mark.qt
def test_view_shows_one_field_at_a_time_with_a_selector_and_plate_overview(
    tmp_path: Path,
) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    napari = pytest.importorskip("napari")
    from scopestream.viewer.saved import field_panel, open_run

    path, frames = _plate_run(tmp_path)
    viewer = napari.Viewer(show=False)
    try:
        layers = open_run(viewer, path)
        assert [layer.name for layer in layers] == ["nuclei (raw)", "nuclei (denoised)"]
        raw = layers[0]
        assert tuple(raw.data.shape) == (2, 4, 16, 16)  # t, p, y, x
        assert tuple(viewer.dims.axis_labels) == ("t", "p", "y", "x")
        panel = field_panel(viewer, path)
        assert panel is not None and panel.overview is not None
        assert viewer.dims.current_step[1] == 0 and panel.combo.currentText() == "A1_0000"
        assert panel.overview.imaged == {"A1", "A2"}
        panel.select(3)  # the user picks A2's second field
        assert viewer.dims.current_step[1] == 3
        assert viewer.canvas.overlays.text.text.startswith("field A2_0001")
        t = int(viewer.dims.current_step[0])
        np.testing.assert_array_equal(np.asarray(raw.data[t, 3]), frames[t, 3, 0])
        np.testing.assert_allclose(
            np.asarray(layers[1].data[t, 3]), frames[t, 3, 0] / 1000, rtol=1e-6
        )
        assert panel.overview.buttons["A2"].isChecked()
        viewer.dims.set_current_step(1, 1)  # the slider moves the selector too
        assert panel.combo.currentText() == "A1_0001"
        assert panel.overview.buttons["A1"].isChecked()
    finally:
        viewer.close()


@pytest.mark.qt
def test_live_display_follows_the_field_imaged_or_the_one_chosen() -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    pytest.importorskip("napari")
    from scopestream.viewer.live import LiveViewer, RunControls

    lf = LatestFrames(_two_fields(), max_hz=0)
    status: dict[str, Any] = {"state": "running", "frames_acquired": 0}
    controls = RunControls(status=lambda: status, finished=lambda: False, stop=lambda: None)
    live = LiveViewer(lf, controls, show=False)
    try:
        live.prepare([("bf (raw)", "raw", "bf", None), ("nuclei (raw)", "raw", "nuclei", None)])
        lf.write(np.full((8, 8), 10, np.uint16), make_meta(t=0, c=0, p=0))
        lf.write(np.full((8, 8), 11, np.uint16), make_meta(t=0, c=1, p=0))
        lf.write(np.full((8, 8), 20, np.uint16), make_meta(t=0, c=0, p=1))
        live._t_status = 0.0  # the next tick also updates the status and the plate overview
        live._update()
        layers = live.viewer.layers
        assert int(layers["bf (raw)"].data[0, 0]) == 20  # following: field B2 is imaged
        # B2 has no nuclei frame yet: blank, never A1's nuclei under B2's name
        assert float(np.asarray(layers["nuclei (raw)"].data).max()) == 0.0
        assert live.viewer.canvas.overlays.text.text == "field B2_0000"
        panel = live.widget.positions
        assert panel is not None and panel.overview is not None
        assert panel.overview.imaged == {"A1", "B2"}
        panel.select(0)  # the user picks A1
        assert int(layers["bf (raw)"].data[0, 0]) == 10
        assert int(layers["nuclei (raw)"].data[0, 0]) == 11
        assert live.viewer.canvas.overlays.text.text == "field A1_0000"
        d = live.describe()
        assert (d["field_shown"], d["following"]) == ("A1_0000", False)
        lf.write(np.full((8, 8), 22, np.uint16), make_meta(t=1, c=0, p=1))
        live._update()
        assert int(layers["bf (raw)"].data[0, 0]) == 10  # A1 stays on screen
        panel.select(None)
        assert int(layers["bf (raw)"].data[0, 0]) == 22
    finally:
        live.timer.stop()
        live.viewer.close()
