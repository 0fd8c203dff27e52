"""What the benchmarks share: realistic frames, a resident-memory sampler, the writer ceiling."""

from __future__ import annotations

import importlib
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from scopestream.streaming.zarr_sink import _blosc_codecs, _frame_chunk

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def realistic_frames(shape: tuple[int, int], k: int = 8, seed: int = 0) -> np.ndarray:
    """``k`` distinct noisy cell frames from the simulator (not zeros: compression is honest).

    Parameters
    ----------
    shape
        ``(Y, X)`` of each frame.
    k
        Number of distinct frames.
    seed
        Seed of the simulated sample.

    Returns
    -------
    numpy.ndarray
        ``(k, Y, X)`` uint16 frames.
    """
    from scopestream.acquisition.sample import SimulatedMicroscope

    scope = SimulatedMicroscope(shape, seed=seed, noise_pool=2)
    return np.stack([scope.snap(i * 0.1, "nuclei", 0.0, 10.0) for i in range(k)])


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (``VmRSS``, or psutil off Linux).

    Returns
    -------
    float
        MiB, or NaN where neither ``/proc`` nor psutil is available.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        psutil: Any = importlib.import_module("psutil")
    except ImportError:
        return float("nan")
    return float(psutil.Process().memory_info().rss) / 2**20


class RssSampler:
    """Samples `rss_mb` on a thread every ``interval_s`` while a run goes on.

    Each sample is ``(monotonic time, RSS MiB, progress)`` where ``progress()``
    is the caller's count (frames written). A sample is also taken the moment
    progress first reaches ``mark_at``, so that a short run still has its
    end-of-warm-up sample.

    Parameters
    ----------
    progress
        Returns the current count (read from the sampler's thread).
    interval_s
        Time between periodic samples.
    mark_at
        Count at which one extra sample is taken (the end of warm-up).
    extra
        Called with each sample's time; what it returns is kept beside it
        (e.g. the size of a file). ``None``: nothing.
    """

    def __init__(
        self,
        progress: Callable[[], int],
        interval_s: float = 0.5,
        mark_at: int | None = None,
        extra: Callable[[], float] | None = None,
    ) -> None:
        self.progress = progress
        self.interval_s = interval_s
        self.mark_at = mark_at
        self.extra = extra
        #: (time, rss MiB, progress, extra)
        self.samples: list[tuple[float, float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        """Take one sample now (also callable from the caller's thread, e.g. at the end)."""
        extra = self.extra() if self.extra is not None else float("nan")
        self.samples.append((time.monotonic(), rss_mb(), self.progress(), extra))

    def _loop(self) -> None:
        marked = self.mark_at is None
        last = 0.0
        # poll often (an int read), sample at the interval or when the mark is crossed
        while not self._stop.wait(min(0.02, self.interval_s)):
            now = time.monotonic()
            crossed = not marked and self.progress() >= (self.mark_at or 0)
            if crossed or now - last >= self.interval_s:
                marked = marked or crossed
                last = now
                self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def tensorstore_fps(frames: np.ndarray, n: int, out: Path, in_flight: int) -> float:
    """Frames/s of tensorstore alone: the same chunks, codec and writes in flight as `ZarrSink`.

    Parameters
    ----------
    frames
        ``(k, Y, X)`` frames, cycled.
    n
        Frames to write.
    out
        Array directory to create.
    in_flight
        Chunk writes in flight (the sink's ``max_in_flight``).

    Returns
    -------
    float
        Frames per second, from the first write to the last commit.
    """
    h, w = frames.shape[1:]
    arr = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(out)},
            "metadata": {
                "shape": [n, 1, 1, h, w],
                "data_type": frames.dtype.name,
                "chunk_grid": {
                    "name": "regular",
                    "configuration": {
                        "chunk_shape": [1, 1, 1, *_frame_chunk((h, w), frames.dtype.itemsize)]
                    },
                },
                "codecs": _blosc_codecs(frames.dtype.itemsize),
                "fill_value": 0,
            },
            "create": True,
        }
    ).result()
    pending: list[Any] = []
    t0 = time.perf_counter()
    for i in range(n):
        f = arr[i, 0, 0].write(frames[i % len(frames)])
        f.copy.result()
        pending.append(f)
        if len(pending) >= in_flight:
            pending.pop(0).commit.result()
    for f in pending:
        f.commit.result()
    return n / (time.perf_counter() - t0)


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes, 0 when it does not exist (yet)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def remove_tree(path: Path, threads: int = 8) -> None:
    """``shutil.rmtree``, with the subtrees of a chunk directory removed from ``threads`` threads.

    A store of one chunk per frame is a few directories per frame: 100 000
    frames take minutes to remove one unlink at a time on a busy disk, and the
    unlinks of different subtrees do not wait for each other.
    """
    from concurrent.futures import ThreadPoolExecutor

    # an array's chunks are under c/ (zarr v3 default keys): the array, or an image's 0/
    found = (path / "c", *path.glob("*/c"), *path.glob("*/0/c")) if path.is_dir() else ()
    chunk_dirs = [d for d in found if d.is_dir()]
    subtrees = [e for d in chunk_dirs for e in d.iterdir()]
    if subtrees:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda p: shutil.rmtree(p, ignore_errors=True), subtrees))
    shutil.rmtree(path, ignore_errors=True)
