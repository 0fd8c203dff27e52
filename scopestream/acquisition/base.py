"""A threaded base for sources that generate frames (`FrameSource` lives in streaming.seams)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from scopestream.streaming.frame import stamp
from scopestream.streaming.seams import FrameSource

__all__ = ["FrameSource", "SourceError", "ThreadedSource"]

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo
    from scopestream.streaming.seams import FrameCallback, SpaceWaiter


class SourceError(RuntimeError):
    """A source cannot be opened or failed while acquiring."""


class ThreadedSource:
    """Base for sources that produce frames from a generator on their own thread.

    Subclasses implement `frames`. Pacing: ``fps > 0`` emits on a fixed clock
    (late frames are not made up); ``fps == 0`` emits as fast as the pipeline
    takes them, waiting on the ring buffer's free space.
    """

    kind = "threaded"
    info: StreamInfo
    hands_over_frames = False
    #: at fps 0, wait for ring-buffer space (replay, simulation); a live stream never waits
    paced_by_pipeline = True
    #: stamp the acquisition time when the frame is emitted (sources that know better: False)
    stamp_frames = True

    def __init__(self, fps: float = 0.0) -> None:
        if fps < 0:
            raise ValueError(f"fps must be >= 0, got {fps}")
        self.fps = float(fps)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._running = threading.Event()  # cleared while paused
        self._running.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.emitted = 0

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Yield frames in acquisition order (timestamps are stamped on emission)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description saved with the run."""
        return {"kind": self.kind, "fps": self.fps, "stream": self.info.to_json()}

    def counters(self) -> dict[str, int]:
        """Source-side counters."""
        return {"emitted": self.emitted}

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the source, if any."""
        return self._error

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Start the acquisition thread."""
        if self._thread is not None:
            raise SourceError("a source can be started once")
        self._thread = threading.Thread(
            target=self._run, args=(sink, wait_for_space), name=f"source-{self.kind}", daemon=True
        )
        self._thread.start()

    def _run(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None) -> None:
        try:
            t0 = time.perf_counter()
            for i, (data, meta) in enumerate(self.frames()):
                if self._stop.is_set():
                    break
                if not self._running.is_set():  # paused: the clock restarts on resume
                    t_pause = time.perf_counter()
                    while not self._running.wait(0.1):
                        if self._stop.is_set():
                            return
                    t0 += time.perf_counter() - t_pause
                if self.fps > 0:
                    delay = t0 + i / self.fps - time.perf_counter()
                    if delay > 0 and self._stop.wait(delay):
                        break
                elif wait_for_space is not None and self.paced_by_pipeline:
                    while not wait_for_space(0.1):
                        if self._stop.is_set():
                            return
                if self.stamp_frames:
                    stamp(meta)
                sink(data, meta)
                self.emitted += 1
        except BaseException as e:  # reported through .error, the runner decides
            self._error = e
        finally:
            self.finished()
            self._done.set()

    def finished(self) -> None:
        """Called on the source's thread when it ends (release resources here)."""

    def set_paused(self, paused: bool) -> None:
        """Hold (or release) the next frame."""
        if paused:
            self._running.clear()
        else:
            self._running.set()

    def stop(self) -> None:
        """Ask the thread to stop after the current frame."""
        self._stop.set()
        self._running.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the thread to finish."""
        if self._thread is None:
            return True
        return self._done.wait(timeout)
