"""``scopestream bench viewer``: the live napari display under a fast stream.

Frames stream from memory at the camera rate through the real pipeline (ring
buffer, OME-Zarr recording, `LatestFrames`) into the real napari window.
Reported: display updates per second while streaming, the timer's tick time,
and resident memory from the end of warm-up to the end. The baseline, measured
in the same run, is napari alone setting the same layer's data as fast as it can.

Only ``scopestream.viewer`` imports Qt or napari: the Qt half lives in
``scopestream.viewer._bench_impl`` and is imported when the benchmark runs, so
importing this module needs neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def ensure_display() -> subprocess.Popen[bytes] | None:
    """A display for the benchmark: the user's, or an Xvfb started here.

    Returns
    -------
    subprocess.Popen or None
        The Xvfb started (terminate it when done), ``None`` when a display was there.

    Raises
    ------
    RuntimeError
        No display, and no Xvfb to start (or no free display number).
    """
    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError("no display and no Xvfb: run under xvfb-run or install xvfb")
    for n in range(90, 120):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            proc = subprocess.Popen(
                [xvfb, f":{n}", "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            os.environ["DISPLAY"] = f":{n}"
            os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
            time.sleep(1.0)
            return proc
    raise RuntimeError("no free X display number for Xvfb")


def bench_viewer(
    n_frames: int = 1000, shape: tuple[int, int] = (1024, 1024), fps: float = 100.0
) -> dict[str, Any]:
    """Stream ``n_frames`` into the live viewer (a display must exist: `ensure_display`).

    Parameters
    ----------
    n_frames
        Frames to stream.
    shape
        ``(Y, X)`` of each frame.
    fps
        Camera frame rate.

    Returns
    -------
    dict
        Updates/s, napari's ceiling and their ratio, tick times, RSS growth, ``ok``.
    """
    from scopestream.viewer._bench_impl import bench_viewer as run

    return run(n_frames=n_frames, shape=shape, fps=fps)


def bench_viewer_with_display(**kwargs: Any) -> dict[str, Any]:
    """`bench_viewer` with a display: the user's, or an Xvfb started and stopped here.

    Parameters
    ----------
    **kwargs
        Passed to `bench_viewer`.

    Returns
    -------
    dict
        What `bench_viewer` returns.
    """
    xvfb = ensure_display()
    try:
        return bench_viewer(**kwargs)
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=5)
