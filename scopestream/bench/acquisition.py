"""``scopestream bench acquisition``: simulator frame rate and the acquisition callback's cost.

In one run: the simulated microscope alone, the ``sim`` source driven by
pymmcore-plus's MDA engine into the ring buffer (a null sink, no storage), the
callback's wall and thread-CPU time there, and `RingBuffer.put` copying vs
adopting a frame (the ratio is the result; the absolute times depend on the box).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np


class _NullSink:
    """Takes frames and drops them: measures acquisition, not storage."""

    frames_written = 0

    def write(self, data: np.ndarray, meta: Any) -> None:
        self.frames_written += 1

    def close(
        self, status: str = "complete", error: str | None = None, summary: Any = None
    ) -> None:
        pass


def _callback_cost(shape: tuple[int, int], n: int, adopt: bool) -> dict[str, float]:
    """Wall time of `RingBuffer.put` for fresh frames, copying or adopting them."""
    from scopestream.streaming.frame import make_meta
    from scopestream.streaming.ringbuffer import RingBuffer

    ring = RingBuffer.for_memory(shape, "uint16", budget_mb=256, adopt=adopt)
    src = np.random.default_rng(0).integers(0, 4096, (4, *shape), dtype=np.uint16)
    times = []
    for i in range(n):
        frame = src[i % 4].copy()  # a fresh array per frame, as the engines hand over
        t0 = time.perf_counter()
        ring.put(frame, make_meta(t=i))
        times.append(time.perf_counter() - t0)
    us = np.array(times) * 1e6
    p50, p99 = np.percentile(us, [50, 99])
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}


def bench_acquisition(
    shape: tuple[int, int] = (2048, 2048), frames: int = 300, repeats: int = 3
) -> dict[str, Any]:
    """Simulator frame rate and acquisition-callback cost, in one run.

    * ``renderer_fps``: the simulated microscope alone (noise, drift, and the
      re-renders of the moving sample over 15 s of simulated time);
    * ``sim_mda_fps``: the ``sim`` source driven by pymmcore-plus's MDA engine
      into the ring buffer (a null sink: no storage);
    * ``callback_us``: wall and thread-CPU time of the acquisition callback in
      that run, and the cost of copying vs adopting a frame.

    Parameters
    ----------
    shape
        ``(Y, X)`` of each frame.
    frames
        Frames per measurement.
    repeats
        Rounds (medians are reported).

    Returns
    -------
    dict
        JSON-able: the rates, callback and ``put`` times (µs), ``ratio_adopt_vs_copy_p50``.
    """
    from scopestream.acquisition.plan import AcquisitionPlan
    from scopestream.acquisition.sample import SimulatedMicroscope
    from scopestream.acquisition.sim import DEFAULT_SIM_CHANNEL, SimulatedSource
    from scopestream.streaming.runner import SinkSpec, StreamRunner

    render: list[float] = []
    mda: list[float] = []
    cb_wall: list[dict[str, float]] = []
    cb_cpu: list[dict[str, float]] = []
    for r in range(repeats):
        scope = SimulatedMicroscope(shape, seed=r)
        out = np.empty(shape, np.uint16)
        t0 = time.perf_counter()
        for i in range(frames):
            scope.snap(i * 0.05, "nuclei", 0.0, 10.0, out=out)
        render.append(frames / (time.perf_counter() - t0))

        plan = AcquisitionPlan.timelapse(frames, channels=(DEFAULT_SIM_CHANNEL,))
        src = SimulatedSource(shape, plan, seed=r)
        runner = StreamRunner(src, [SinkSpec("null", _NullSink(), records=True)], buffer_mb=512)
        s = runner.run()
        if s["status"] != "complete":
            raise RuntimeError(f"sim run failed: {s['error']}")
        mda.append(s["acquire_fps"])
        cb_wall.append(s["callback_us"])
        cb_cpu.append(s["callback_cpu_us"])
    med = statistics.median
    copy = _callback_cost(shape, 100, adopt=False)
    adopt = _callback_cost(shape, 100, adopt=True)
    return {
        "benchmark": "acquisition",
        "shape": list(shape),
        "frames": frames,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "renderer_fps": round(med(render), 1),
        "sim_mda_fps": round(med(mda), 1),
        "all": {
            "renderer_fps": [round(x, 1) for x in render],
            "sim_mda_fps": [round(x, 1) for x in mda],
        },
        "callback_us": {
            "wall_p50": med(c["p50"] for c in cb_wall),
            "wall_p99": med(c["p99"] for c in cb_wall),
            "cpu_p50": med(c["p50"] for c in cb_cpu),
            "cpu_p99": med(c["p99"] for c in cb_cpu),
        },
        "put_us": {"copy": copy, "adopt": adopt},
        "ratio_adopt_vs_copy_p50": round(adopt["p50"] / copy["p50"], 4),
    }
