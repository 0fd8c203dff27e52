"""Per-stage throughput and latency, cheap enough for every frame."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np


class StageMetrics:
    """Counts frames through one stage and keeps a bounded window of latencies.

    Latency is measured from a frame's acquisition timestamp to the moment the
    stage finished with it. The window holds the last ``window`` samples, so
    memory is fixed however long the run.
    """

    def __init__(self, name: str, window: int = 65536, max_buckets: int = 4096) -> None:
        self.name = name
        self.count = 0
        self._lat_ms = np.zeros(window, dtype=np.float32)
        self._lock = threading.Lock()
        self._t_first: float | None = None
        self._t_last: float | None = None
        #: per bucket of ``bucket_s`` seconds of monotonic time: [frames, latency sum (ms),
        #: latency max (ms)]; at most ``max_buckets`` of them: when full, neighbouring
        #: buckets merge and ``bucket_s`` doubles (a day at 1 s buckets stays ~4k entries)
        self._per_second: dict[int, list[float]] = {}
        self.bucket_s = 1
        self._max_buckets = max(2, max_buckets)

    def record(self, timestamp_ns: int, now_ns: int | None = None) -> None:
        """Record one frame finished now (or at ``now_ns``)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        lat = (now - timestamp_ns) / 1e6
        with self._lock:
            self._lat_ms[self.count % self._lat_ms.size] = lat
            self.count += 1
            key = now // 1_000_000_000 // self.bucket_s * self.bucket_s
            b = self._per_second.get(key)
            if b is None:
                if len(self._per_second) >= self._max_buckets:
                    self._coarsen()
                    key = now // 1_000_000_000 // self.bucket_s * self.bucket_s
                b = self._per_second.get(key)
            if b is None:
                self._per_second[key] = [1.0, lat, lat]
            else:
                b[0] += 1
                b[1] += lat
                b[2] = max(b[2], lat)
            t = now / 1e9
            if self._t_first is None:
                self._t_first = t
            self._t_last = t

    def tally(self, n: int, now_ns: int | None = None) -> None:
        """Count ``n`` events in the current bucket (no latency: e.g. skipped frames)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            key = now // 1_000_000_000 // self.bucket_s * self.bucket_s
            if key not in self._per_second and len(self._per_second) >= self._max_buckets:
                self._coarsen()
                key = now // 1_000_000_000 // self.bucket_s * self.bucket_s
            b = self._per_second.setdefault(key, [0.0, 0.0, 0.0])
            b[0] += n

    def _coarsen(self) -> None:
        """Merge neighbouring buckets: twice as long, half as many (lock held)."""
        self.bucket_s *= 2
        merged: dict[int, list[float]] = {}
        for k, (n, total, mx) in self._per_second.items():
            key = k // self.bucket_s * self.bucket_s
            m = merged.get(key)
            if m is None:
                merged[key] = [n, total, mx]
            else:
                m[0] += n
                m[1] += total
                m[2] = max(m[2], mx)
        self._per_second = merged

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

    def timeline(self, origin_s: int) -> dict[str, Any]:
        """Per bucket since ``origin_s`` (monotonic seconds): frames, mean and max latency.

        ``frames`` are per bucket of ``bucket_s`` seconds (1 unless the run was long).
        """
        with self._lock:
            items = sorted(self._per_second.items())
            bucket = self.bucket_s
        if not items:
            return {
                "bucket_s": bucket,
                "t_s": [],
                "frames": [],
                "latency_mean_ms": [],
                "latency_max_ms": [],
            }
        return {
            "bucket_s": bucket,
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
