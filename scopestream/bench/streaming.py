"""``scopestream bench streaming``: pipeline throughput against the writer and disk ceilings.

In one run, on the same frames and the same disk, it measures

* ``pipeline``: in-memory replay → ring buffer → `ZarrSink` (the real run path, no model);
* ``tensorstore``: the same frames written with tensorstore directly, same chunking,
  codec and writes in flight (the writer ceiling);
* ``file``: the raw bytes written to one file per frame with fsync and rename from
  the same number of threads (the disk ceiling).

Each is repeated, in a rotating order and after a ``sync``, so that no variant
always pays for another's writeback; the medians and their ratios are reported.
The disks of shared machines are noisy: read ``all_fps`` before the ratios.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scopestream.bench.common import realistic_frames, tensorstore_fps

if TYPE_CHECKING:
    import numpy as np

    from scopestream.streaming.layout import Position


def pipeline_fps(
    frames: np.ndarray,
    n: int,
    out: Path,
    in_flight: int = 8,
    positions: tuple[Position, ...] = (),
) -> float:
    """Frames/s of in-memory frames → ring buffer → `ZarrSink` (with ``positions``: the
    frames visit them in turn, each field its own series)."""
    from scopestream.acquisition.replay import ArraySource
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import ZarrSink

    src = ArraySource(frames, n, positions=positions)
    sink = ZarrSink(out, src.info, max_in_flight=in_flight, source=src.describe())
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=256)
    t0 = time.perf_counter()
    summary = runner.run()
    dt = time.perf_counter() - t0
    if summary["status"] != "complete" or summary["frames_written"] != n:
        raise RuntimeError(f"pipeline run failed: {summary['error']}")
    return n / dt


def _bench_files(frames: np.ndarray, n: int, out: Path, in_flight: int) -> float:
    out.mkdir(parents=True)

    def write(i: int) -> None:
        p = out / f"{i}"
        tmp = out / f".{i}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(frames[i % len(frames)].tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(write, range(n)))
    return n / (time.perf_counter() - t0)


def bench_streaming(
    n_frames: int = 200,
    shape: tuple[int, int] = (2048, 2048),
    repeats: int = 3,
    in_flight: int = 8,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Run the three measurements ``repeats`` times, interleaved; medians and ratios.

    Parameters
    ----------
    n_frames
        Frames per measurement.
    shape
        ``(Y, X)`` of each frame.
    repeats
        Rounds of the three measurements (medians are reported).
    in_flight
        Chunk writes in flight (sink and tensorstore) and writer threads (files).
    workdir
        Where the temporary stores go (default: the system's temp dir); removed at the end.

    Returns
    -------
    dict
        JSON-able: median and all fps per variant, MB/s, and the ratios between them.
    """
    frames = realistic_frames(shape)
    base = Path(tempfile.mkdtemp(prefix="scopestream-bench-", dir=workdir))
    results: dict[str, list[float]] = {"pipeline": [], "tensorstore": [], "file": []}
    runs = {"pipeline": pipeline_fps, "tensorstore": tensorstore_fps, "file": _bench_files}
    names = list(runs)
    try:
        for r in range(repeats):
            # rotate the order so no variant always follows another's writeback
            for name in names[r % 3 :] + names[: r % 3]:
                target = base / f"{name}-{r}"
                os.sync()  # start each measurement with no dirty pages of the last one
                results[name].append(runs[name](frames, n_frames, target, in_flight))
                shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    mb = frames[0].nbytes / 2**20
    return {
        "benchmark": "streaming",
        "frames": n_frames,
        "shape": list(shape),
        "dtype": frames.dtype.name,
        "repeats": repeats,
        "writes_in_flight": in_flight,
        "cpu_count": os.cpu_count(),
        "fps": {k: round(v, 2) for k, v in med.items()},
        "mb_per_s": {k: round(v * mb, 1) for k, v in med.items()},
        "all_fps": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "ratio_pipeline_vs_tensorstore": round(med["pipeline"] / med["tensorstore"], 3),
        "ratio_tensorstore_vs_file": round(med["tensorstore"] / med["file"], 3),
        "ratio_pipeline_vs_file": round(med["pipeline"] / med["file"], 3),
    }
