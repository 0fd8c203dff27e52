"""The live viewer under Xvfb: real napari, real runs, screenshots checked pixel by pixel."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from typing import TYPE_CHECKING

import imageio.v3 as iio
import numpy as np
import pytest

from scopestream.acquisition.replay import ArraySource
from scopestream.streaming.ringbuffer import OverflowPolicy
from scopestream.streaming.runner import SinkSpec, StreamRunner
from scopestream.streaming.zarr_sink import ZarrSink

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult

pytestmark = pytest.mark.qt


@pytest.fixture(autouse=True)
def _xcb() -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


def _cells(png: Path, grid: list[int]) -> list[np.ndarray]:
    img = iio.imread(png)[..., :3].astype(np.float32)
    rows, cols = grid
    h, w = img.shape[0] // rows, img.shape[1] // cols
    return [
        img[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(rows) for c in range(cols)
    ]


def test_demo_viewer_shows_raw_denoised_and_stained_layers_with_content(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    shot = tmp_path / "shot.png"
    r = cli(
        "demo", "--frames", "100", "--shape", "256x256", "--viewer", "--screenshot", str(shot),
        "--out", str(tmp_path / "demo.ome.zarr"), "--json", timeout=300,
    )  # fmt: skip
    assert r.code == 0, r.stderr
    s = r.json
    v = s["viewer"]
    assert set(v["layers"]) == {
        "brightfield (raw)",
        "nuclei (raw)",
        "brightfield (denoised)",
        "nuclei (denoised)",
        "nuclei (predicted)",
        "membrane (predicted)",
    }
    assert v["layers"][:2] == ["brightfield (raw)", "nuclei (raw)"]  # raw first
    assert v["display_updates"] >= 5  # it was live, not one final paint
    cells = _cells(shot, v["grid"])
    with_content = [c for c in cells if c.std() > 8 and c.max() > 40]
    assert len(with_content) == len(v["layers"]), [round(float(c.std()), 1) for c in cells]
    # the widget shows the summary's own numbers
    w = v["widget"]
    assert w["progress"] == f"{s['frames_acquired']}/{s['frames_expected']}"
    assert w["fps in / out"] == f"{s['acquire_fps']} / {s['fps']}"
    assert w["latency p50 / p99 (ms)"] == f"{s['latency_ms']['p50']} / {s['latency_ms']['p99']}"
    assert w["written / lost"] == f"{s['frames_written']} / {s['frames_lost']}"
    assert w["skipped"] == ", ".join(f"{k} {n}" for k, n in s["frames_skipped"].items())
    assert w["model:stain"].startswith("v1 on onnxruntime/cpu")
    assert f"{s['models']['model:stain']['predicted']} predicted" in w["model:stain"]
    # the recording is whole, whatever the display skipped
    assert s["frames_written"] == s["frames_acquired"] == 100 and s["frames_lost"] == 0
    rep = tmp_path / "report.html"
    out = cli("report", str(tmp_path / "demo.ome.zarr"), "--out", str(rep), "--json")
    assert out.code == 0, out.stderr
    page = rep.read_text()
    assert page.count("data:image/png;base64,") == 2
    assert out.json["seconds_in_timeline"] >= 1
    assert out.json["frames_acquired"] == 100
    assert sum(out.json["lost_over_time"]["lost"]) == 0
    assert out.json["panel"][0]["layers"] == [
        "brightfield (raw)",
        "nuclei (raw)",
        "brightfield (denoised)",
        "nuclei (denoised)",
        "nuclei (predicted)",
        "membrane (predicted)",
    ]


def test_viewer_without_display_says_how_to_get_one(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["QT_QPA_PLATFORM"] = "xcb"
    r = cli("demo", "--frames", "5", "--viewer", "--out", str(tmp_path / "x.ome.zarr"), env=env)
    assert r.code == 2
    assert "needs a display" in r.stderr and "xvfb-run" in r.stderr
    r = cli("run", "--source", "sim", "--frames", "2", "--screenshot", str(tmp_path / "s.png"))
    assert r.code == 2 and "--screenshot needs --viewer" in r.stderr


def test_view_opens_a_saved_run_named_coloured_and_scaled(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    out = tmp_path / "z.ome.zarr"
    r = cli(
        "run", "--source", "sim", "--channels", "brightfield:5,nuclei:10", "--z-planes", "3",
        "--time-points", "2", "--shape", "128x128", "--model", "stain", "--model-policy", "all",
        "--out", str(out),
    )  # fmt: skip
    assert r.code == 0, r.stderr
    shot = tmp_path / "v.png"
    v = cli("view", str(out), "--screenshot", str(shot), "--json", timeout=120)
    assert v.code == 0, v.stderr
    shown = v.json
    assert shown["layers"] == [
        "brightfield (raw)",
        "nuclei (raw)",
        "nuclei (predicted)",
        "membrane (predicted)",
    ]
    assert shown["shapes"]["nuclei (predicted)"] == [2, 3, 128, 128]  # t, z, y, x
    cells = _cells(shot, shown["grid"])
    assert sum(c.std() > 8 for c in cells) == 4


def test_saved_run_layers_grow_while_it_is_written(tmp_path: Path) -> None:
    import napari

    from scopestream.viewer.saved import RunFollower, open_run, run_layers

    out = tmp_path / "grow.ome.zarr"
    rng = np.random.default_rng(0)
    frames = rng.integers(100, 4000, (4, 64, 64)).astype(np.uint16)
    src = ArraySource(frames, 150, fps=25)
    src.info = dataclasses.replace(src.info, n_t=None)  # open-ended
    runner = StreamRunner(src, [SinkSpec("zarr", ZarrSink(out, src.info), records=True)])
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while runner.status.frames_acquired < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        spec = run_layers(out)[0]
        assert spec.name == "raw (raw)" and spec.colormap == "green"
        px = src.info.pixel_size_um
        np.testing.assert_allclose(spec.scale[-2:], [px, px])
        viewer = napari.Viewer(show=False)
        try:
            (layer,) = open_run(viewer, out)
            first = layer.data.shape[0]
            follower = RunFollower(viewer, out, interval_ms=60000)  # driven by hand here
            runner.wait(30)
            follower.refresh()
            assert first < 150 and layer.data.shape[0] == 150  # the time axis grew to the end
            assert not follower.timer.isActive()  # the run ended: no more polling
            assert int(viewer.dims.current_step[0]) == 149
            assert layer.data[149].compute().std() > 0
        finally:
            viewer.close()
    finally:
        runner.stop()
        runner.wait(10)


def test_pause_holds_the_source_and_resume_loses_nothing() -> None:
    frames = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    src = ArraySource(frames, 200, fps=200)
    runner = StreamRunner(src, [SinkSpec("sink", _Counter(), records=True)])
    runner.start()
    while runner.status.frames_acquired < 10:
        time.sleep(0.01)
    assert runner.set_paused(True)
    time.sleep(0.1)
    held = runner.status.frames_acquired
    time.sleep(0.4)
    assert runner.status.frames_acquired <= held + 1  # at most the frame in hand
    assert runner.live_summary()["state"] == "paused"
    assert runner.set_paused(False)
    assert runner.wait(20)
    summary = runner.summary
    assert summary is not None
    assert summary["frames_acquired"] == 200 and summary["frames_lost"] == 0
    assert not runner.set_paused(True)  # a finished run cannot pause


class _Counter:
    def __init__(self) -> None:
        self.frames_written = 0
        self._lock = threading.Lock()

    def write(self, data: np.ndarray, meta: object) -> None:
        with self._lock:
            self.frames_written += 1

    def close(self, *a: object, **k: object) -> None:
        pass


def test_closing_the_window_leaves_the_recording_whole(tmp_path: Path) -> None:
    with warnings.catch_warnings():  # third-party import-time warnings, not ours
        warnings.simplefilter("ignore")
        import napari.viewer  # noqa: F401
    from qtpy.QtCore import QTimer

    from scopestream.viewer.frames import LatestFrames
    from scopestream.viewer.live import LiveViewer, RunControls

    frames = np.random.default_rng(0).integers(0, 4000, (4, 64, 64)).astype(np.uint16)
    src = ArraySource(frames, 120, fps=40)  # 3 s of acquisition
    lf = LatestFrames(src.info)
    out = tmp_path / "c.ome.zarr"
    runner = StreamRunner(
        src,
        [
            SinkSpec("zarr", ZarrSink(out, src.info), records=True),
            SinkSpec("viewer", lf, OverflowPolicy.LATEST),
        ],
    )
    live = LiveViewer(
        lf,
        RunControls(
            status=runner.live_summary,
            finished=lambda: runner.summary is not None,
            stop=runner.stop,
            store=out,
        ),
    )
    live.prepare([("raw (raw)", "raw", "raw", None)])
    QTimer.singleShot(800, live.viewer.close)  # the user closes the window mid-run
    live.run(start=runner.start)
    assert runner.summary is None  # still running after the window went away
    assert live.updates > 0
    assert runner.wait(30)
    s = runner.summary
    assert s is not None
    assert s["status"] == "complete" and s["frames_written"] == 120 and s["frames_lost"] == 0


def test_z_stack_runs_show_the_current_stack_with_a_z_slider(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    shot = tmp_path / "z.png"
    r = cli(
        "run", "--source", "sim", "--channels", "brightfield:5,nuclei:10", "--z-planes", "4",
        "--time-points", "6", "--fps", "20", "--shape", "128x128", "--model", "stain",
        "--viewer", "--screenshot", str(shot), "--out", str(tmp_path / "z.ome.zarr"), "--json",
        timeout=300,
    )  # fmt: skip
    assert r.code == 0, r.stderr
    v = r.json["viewer"]
    assert v["shapes"]["nuclei (raw)"] == [4, 128, 128]
    assert v["shapes"]["nuclei (predicted)"] == [4, 128, 128]
    assert sum(c.std() > 8 for c in _cells(shot, v["grid"])) == len(v["layers"]) == 4
