"""The viewer benchmark's Qt half (``scopestream bench viewer``, see `scopestream.bench.viewer`).

It lives under ``scopestream.viewer`` because only the viewer imports Qt or napari;
`scopestream.bench.viewer` imports it when the benchmark runs.

Frames (``realistic_frames``) stream from memory at the camera rate through the
real pipeline (ring buffer, OME-Zarr recording, `LatestFrames`) into the real
napari window. Reported: display updates per second while streaming (ticks that
put new pixels on screen), the timer's tick time, and resident memory from the
end of warm-up to the end (growth must stay flat). The baseline, measured in
the same run, is napari alone: a loop that sets the same layer's data as fast as
it can, the ceiling any live display on this machine can reach.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.bench.common import rss_mb


def _napari_ceiling(frames: np.ndarray, seconds: float = 3.0) -> float:
    """Updates/s of napari alone: set a layer's data and paint, as fast as possible."""
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    try:
        layer = viewer.add_image(frames[0], contrast_limits=(0, 4000))
        app = QApplication.instance()
        assert app is not None
        for _ in range(10):
            app.processEvents()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            layer.data = frames[n % len(frames)]
            app.processEvents()
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        viewer.close()


def bench_viewer(
    n_frames: int = 1000, shape: tuple[int, int] = (1024, 1024), fps: float = 100.0
) -> dict[str, Any]:
    """Stream ``n_frames`` into the live viewer; JSON-able results (see the module docstring).

    Needs a display (see `scopestream.bench.viewer.ensure_display`).
    """
    from qtpy.QtCore import QTimer

    from scopestream.acquisition.replay import ArraySource
    from scopestream.bench.common import realistic_frames
    from scopestream.streaming.ringbuffer import OverflowPolicy
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import ZarrSink
    from scopestream.viewer.frames import LatestFrames, layer_name
    from scopestream.viewer.live import LiveViewer, RunControls

    frames = realistic_frames(shape)
    ceiling = _napari_ceiling(frames)
    with tempfile.TemporaryDirectory() as tmp:
        src = ArraySource(frames, n_frames, fps=fps, channel="nuclei")
        lf = LatestFrames(src.info)
        out = Path(tmp) / "bench.ome.zarr"
        runner = StreamRunner(
            src,
            [
                SinkSpec("zarr", ZarrSink(out, src.info), records=True),
                SinkSpec("viewer", lf, OverflowPolicy.LATEST),
            ],
        )
        controls = RunControls(
            status=runner.live_summary,
            finished=lambda: runner.summary is not None,
            stop=runner.stop,
            pause=runner.set_paused,
            store=out,
            scales=(1.0, 1.0, 1.0),
        )
        live = LiveViewer(
            lf,
            controls,
            limits={layer_name("raw", "nuclei"): (0.0, 4000.0)},
            screenshot=Path(tmp) / "end.png",
        )
        live.prepare([(layer_name("raw", "nuclei"), "raw", "nuclei", None)])
        samples: list[tuple[float, float, int]] = []  # (time, rss MB, frames acquired)
        sampler = QTimer()
        sampler.setInterval(250)
        sampler.timeout.connect(
            lambda: samples.append((time.monotonic(), rss_mb(), runner.status.frames_acquired))
        )
        sampler.start()
        updates_at: list[tuple[float, int]] = []
        marker = QTimer()
        marker.setInterval(100)
        marker.timeout.connect(lambda: updates_at.append((time.monotonic(), live.updates)))
        marker.start()
        live.run(start=runner.start)
        sampler.stop()
        marker.stop()
        summary = runner.summary or {}
        tick_ms = list(live.tick_ms)
    # updates/s over the streaming part: first to last acquired frame
    stream = [(t, r) for t, r, n in samples if 0 < n < n_frames]
    warm = [s for s in samples if s[2] >= min(100, n_frames // 10)]
    t_first = next((t for t, _, n in samples if n > 0), None)
    t_last = next((t for t, _, n in samples if n >= n_frames), None)
    ups = 0.0
    if t_first is not None and t_last is not None and t_last > t_first:
        u = [(t, k) for t, k in updates_at if t_first <= t <= t_last]
        if len(u) >= 2:
            ups = (u[-1][1] - u[0][1]) / (u[-1][0] - u[0][0])
    growth = (max(r for _, r, _ in warm[1:]) - warm[0][1]) if len(warm) > 1 else 0.0
    return {
        "benchmark": "viewer",
        "frames": n_frames,
        "shape": list(shape),
        "camera_fps": fps,
        "acquired": summary.get("frames_acquired"),
        "written": summary.get("frames_written"),
        "display_updates_per_s": round(ups, 2),
        "napari_ceiling_updates_per_s": round(ceiling, 2),
        "ratio_to_ceiling": round(ups / ceiling, 3) if ceiling else None,
        "tick_ms": {
            "p50": round(float(np.percentile(tick_ms, 50)), 2) if tick_ms else None,
            "p99": round(float(np.percentile(tick_ms, 99)), 2) if tick_ms else None,
        },
        "frames_copied_for_display": lf.frames_copied,
        "rss_mb": {
            "after_warmup": round(warm[0][1], 1) if warm else None,
            "max_after": round(max(r for _, r, _ in warm), 1) if warm else None,
            "growth": round(growth, 1),
        },
        "samples": len(stream),
        "goal": {"updates_per_s": 15, "rss_growth_mb": 50},
        "ok": ups >= 15 and growth < 50,
    }
