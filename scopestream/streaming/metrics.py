"""Per-stage throughput and latency, cheap enough for every frame."""

from __future__ import annotations

import threading
import time

import numpy as np


class StageMetrics:
    """Counts frames through one stage and keeps a bounded window of latencies.

    Latency is measured from a frame's acquisition timestamp to the moment the
    stage finished with it. The window holds the last ``window`` samples, so
    memory is fixed however long the run.
    """

    def __init__(self, name: str, window: int = 65536) -> None:
        self.name = name
        self.count = 0
        self._lat_ms = np.zeros(window, dtype=np.float32)
        self._lock = threading.Lock()
        self._t_first: float | None = None
        self._t_last: float | None = None
        #: per second of monotonic time: [frames, latency sum (ms), latency max (ms)]
        self._per_second: dict[int, list[float]] = {}

    def record(self, timestamp_ns: int, now_ns: int | None = None) -> None:
        """Record one frame finished now (or at ``now_ns``)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        lat = (now - timestamp_ns) / 1e6
        with self._lock:
            self._lat_ms[self.count % self._lat_ms.size] = lat
            self.count += 1
            b = self._per_second.get(now // 1_000_000_000)
            if b is None:
                self._per_second[now // 1_000_000_000] = [1.0, lat, lat]
            else:
                b[0] += 1
                b[1] += lat
                b[2] = max(b[2], lat)
            t = now / 1e9
            if self._t_first is None:
                self._t_first = t
            self._t_last = t

    def fps(self) -> float:
        """Frames per second between the first and last recorded frame."""
        with self._lock:
            if self.count < 2 or self._t_first is None or self._t_last is None:
                return 0.0
            span = self._t_last - self._t_first
            return (self.count - 1) / span if span > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        """Median and 99th percentile latency over the window (ms)."""
        with self._lock:
            n = min(self.count, self._lat_ms.size)
            if n == 0:
                return {"p50": 0.0, "p99": 0.0}
            p50, p99 = np.percentile(self._lat_ms[:n], [50, 99])
        return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}

    def timeline(self, origin_s: int) -> dict[str, list[float]]:
        """Per second since ``origin_s`` (monotonic seconds): frames, mean and max latency."""
        with self._lock:
            items = sorted(self._per_second.items())
        if not items:
            return {"t_s": [], "frames": [], "latency_mean_ms": [], "latency_max_ms": []}
        return {
            "t_s": [int(k - origin_s) for k, _ in items],
            "frames": [int(v[0]) for _, v in items],
            "latency_mean_ms": [round(v[1] / v[0], 3) for _, v in items],
            "latency_max_ms": [round(v[2], 3) for _, v in items],
        }

    def snapshot(self) -> dict[str, object]:
        """JSON-able summary."""
        return {"frames": self.count, "fps": round(self.fps(), 2), "latency_ms": self.latency_ms()}


class DurationStats:
    """Bounded window of durations (e.g. the acquisition callback's copy time)."""

    def __init__(self, window: int = 65536) -> None:
        self._us = np.zeros(window, dtype=np.float32)
        self.count = 0

    def add(self, seconds: float) -> None:
        """Add one duration."""
        self._us[self.count % self._us.size] = seconds * 1e6
        self.count += 1

    def summary_us(self) -> dict[str, float]:
        """Median, 99th percentile and max (µs)."""
        n = min(self.count, self._us.size)
        if n == 0:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        w = self._us[:n]
        p50, p99 = np.percentile(w, [50, 99])
        return {
            "p50": round(float(p50), 1),
            "p99": round(float(p99), 1),
            "max": round(float(w.max()), 1),
        }
