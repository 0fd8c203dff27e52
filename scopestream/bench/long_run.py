"""``scopestream bench long-run``: a long open-ended recording of small frames.

``n_frames`` frames (default 100 000 of 64×64 uint16, the simulator's cells,
cycled) stream from memory as fast as the recorder takes them, through the real
run path: an open-ended source (``n_t`` unknown, the store grows) →
`StreamRunner` → ring buffer → `ZarrSink` (``records=True``). A thread samples
the resident memory (``VmRSS``) every ``sample_s`` and the size of the root
``zarr.json``. Reported:

* ``fps`` of the pipeline, and of tensorstore alone writing the same frames
  with the same chunks, codec and writes in flight, measured in the same run
  (``ratio_pipeline_vs_tensorstore`` is the result; the absolute rates depend
  on the disk);
* RSS at the end of warm-up (the first 10 % of frames written), at the end,
  the growth between them and the largest excursion from the warm-up value;
* the size of the root ``zarr.json`` (its largest while recording, and at the
  end) and of ``frames.npy`` (the per-frame index: 96 bytes a frame);
* ``ok``: the goals, RSS flat within 50 MB after warm-up and the root
  ``zarr.json`` under 64 kB however long the run.

What it guards against: anything kept per frame in memory (a growing index,
metadata lists) or in the run's attributes (per-frame or per-second entries in
``zarr.json``, rewritten every second, so quadratic in the run's length).

Measured once (2 shared cores, load ~10, 100 000 frames of 64×64): pipeline
367 fps vs tensorstore alone 476 fps (ratio 0.77); RSS 139.1 MB after warm-up,
140.8 MB at the end (growth 1.7 MB, max excursion 1.7 MB); root ``zarr.json``
3 626 B (largest while recording too); ``frames.npy`` 9.6 MB (96 B a frame);
``timeline.json`` 31 kB. Both goals met. Removing the two 100 000-chunk stores
takes longer than writing them on such a disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scopestream.acquisition.replay import ArraySource
from scopestream.bench.common import (
    RssSampler,
    file_size,
    realistic_frames,
    remove_tree,
    tensorstore_fps,
)
from scopestream.streaming.frame_index import FILE_NAME as FRAMES_FILE
from scopestream.streaming.saved_run import SavedRun

if TYPE_CHECKING:
    import numpy as np

#: the goals the run is checked against
RSS_FLAT_MB = 50.0
ROOT_ATTRS_MAX_BYTES = 64 * 1024
#: fraction of the frames that counts as warm-up (caches, the ring's first lap)
WARMUP_FRACTION = 0.1
#: at most this many (frames, RSS) points are reported
SERIES_POINTS = 40


class OpenEndedArraySource(ArraySource):
    """`ArraySource` whose stream has no planned length (``n_t=None``): the store grows.

    It still stops after ``n_frames``, as a user stopping a time-lapse would.
    """

    def __init__(self, frames: np.ndarray, n_frames: int, *, channel: str = "raw") -> None:
        super().__init__(frames, n_frames, fps=0.0, channel=channel)
        self.info = dataclasses.replace(self.info, n_t=None)


def _record(
    frames: np.ndarray, n: int, out: Path, in_flight: int, buffer_mb: float, sample_s: float
) -> tuple[int, float, RssSampler]:
    """Record ``n`` frames to ``out`` through the runner; frames written, frames/s, samples."""
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import ZarrSink

    src = OpenEndedArraySource(frames, n)
    sink = ZarrSink(out, src.info, max_in_flight=in_flight, source=src.describe())
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=buffer_mb)
    sampler = RssSampler(
        lambda: sink.frames_written,
        interval_s=sample_s,
        mark_at=max(1, math.ceil(n * WARMUP_FRACTION)),
        extra=lambda: float(file_size(out / "zarr.json")),
    )
    with sampler:
        t0 = time.perf_counter()
        summary = runner.run()
        dt = time.perf_counter() - t0
    if summary["status"] != "complete" or summary["frames_written"] != n:
        raise RuntimeError(
            f"long run failed: {summary['status']}, {summary['frames_written']} of {n} "
            f"frames written: {summary.get('error')}"
        )
    return int(summary["frames_written"]), n / dt, sampler


def _series(samples: list[tuple[float, float, int, float]]) -> list[list[float]]:
    """At most `SERIES_POINTS` ``[frames written, RSS MiB]`` points, evenly spread."""
    step = max(1, math.ceil(len(samples) / SERIES_POINTS))
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    return [[n, round(r, 1)] for _, r, n, _ in picked]


def bench_long_run(
    n_frames: int = 100_000,
    shape: tuple[int, int] = (64, 64),
    in_flight: int = 8,
    buffer_mb: float = 512.0,
    sample_s: float = 0.5,
    baseline: bool = True,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Record ``n_frames`` open-ended, then write them with tensorstore alone; JSON-able results.

    Parameters
    ----------
    n_frames
        Frames to record (and to write for the baseline).
    shape
        ``(Y, X)`` of each frame.
    in_flight
        Chunk writes in flight, in the sink and in the baseline.
    buffer_mb
        Ring-buffer budget (MiB), the run's default.
    sample_s
        Interval between memory samples.
    baseline
        Also measure tensorstore alone (``False``: the ``tensorstore`` fps and
        the ratio are ``None``).
    workdir
        Where the temporary stores go (default: the system's temp dir); they
        are removed at the end.

    Returns
    -------
    dict
        See the module docstring; ``ok`` holds the pass/fail flags.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    frames = realistic_frames(shape)
    base = Path(tempfile.mkdtemp(prefix="scopestream-bench-", dir=workdir))
    out = base / "long-run.ome.zarr"
    ts_fps: float | None = None
    try:
        os.sync()  # start with no dirty pages of whatever ran before
        written, fps, sampler = _record(frames, n_frames, out, in_flight, buffer_mb, sample_s)
        root_bytes = file_size(out / "zarr.json")
        index_bytes = file_size(SavedRun(out).raw.path / FRAMES_FILE)
        timeline_bytes = file_size(out / "timeline.json")
        if baseline:
            # the recording stays until the end: removing 100 000 chunks takes longer than
            # writing them, and the baseline starts after a sync either way
            os.sync()
            ts_fps = tensorstore_fps(frames, n_frames, base / "tensorstore", in_flight)
    finally:
        for path in (out, base / "tensorstore", base):
            remove_tree(path)

    samples = sampler.samples
    warmup = max(1, math.ceil(n_frames * WARMUP_FRACTION))
    after = [s for s in samples if s[2] >= warmup]  # never empty: the last sample is at the end
    rss_warm, rss_end = after[0][1], samples[-1][1]
    excursion = max(abs(r - rss_warm) for _, r, _, _ in after)
    root_max = max([root_bytes, *(int(x) for *_, x in samples if not math.isnan(x))])
    rss_flat = excursion <= RSS_FLAT_MB
    root_small = root_max < ROOT_ATTRS_MAX_BYTES
    return {
        "benchmark": "long_run",
        "frames": n_frames,
        "frames_written": written,
        "shape": list(shape),
        "dtype": frames.dtype.name,
        "writes_in_flight": in_flight,
        "buffer_mb": buffer_mb,
        "cpu_count": os.cpu_count(),
        "fps": {
            "pipeline": round(fps, 1),
            "tensorstore": round(ts_fps, 1) if ts_fps is not None else None,
        },
        "ratio_pipeline_vs_tensorstore": round(fps / ts_fps, 3) if ts_fps else None,
        "rss_mb": {
            "warmup_frames": warmup,
            "after_warmup": round(rss_warm, 1),
            "end": round(rss_end, 1),
            "growth": round(rss_end - rss_warm, 1),
            "max_excursion": round(excursion, 1),
            "peak": round(max(r for _, r, _, _ in samples), 1),
            "samples": len(samples),
            "series": _series(samples),
        },
        "bytes": {
            "root_zarr_json": root_bytes,
            "root_zarr_json_max": root_max,
            "frames_npy": index_bytes,
            "frames_npy_per_frame": round(index_bytes / n_frames, 2),
            "timeline_json": timeline_bytes,
        },
        "goal": {"rss_flat_mb": RSS_FLAT_MB, "root_zarr_json_max_bytes": ROOT_ATTRS_MAX_BYTES},
        "ok": {
            "rss_flat": rss_flat,
            "root_zarr_json_small": root_small,
            "all": rss_flat and root_small,
        },
    }
