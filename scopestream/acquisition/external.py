"""Sources fed by the user's own acquisition: a pycromanager ``Acquisition``, a pymmcore-plus MDA.

The lab's scripts (or napari-micromanager, pymmcore-gui) run the acquisition;
scopestream only listens. `PushSource` is a `FrameSource` whose frames are
pushed to it from the engine's thread: the push hands the frame to the ring
buffer and returns, exactly like our own sources' callbacks.

`PycromanagerHook`
    ``image_process_fn`` for ``pycromanager.Acquisition(image_process_fn=...)``;
    returns the image (so pycromanager saves its own copy too) or ``None``.
`CoreListener`
    Listens to an existing ``CMMCorePlus``: ``mda.events.frameReady``,
    ``sequenceStarted`` / ``sequenceFinished`` / ``sequenceCanceled``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

from scopestream.acquisition.base import SourceError
from scopestream.acquisition.mmcore import frame_meta_from_mda
from scopestream.acquisition.pycromanager_source import frame_meta_from_pycromanager

if TYPE_CHECKING:
    import numpy as np

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo
    from scopestream.streaming.seams import FrameCallback, SpaceWaiter


class PushSource:
    """A source whose frames are pushed in by someone else's acquisition.

    It ends when `finish` is called (the acquisition is over: the run is
    complete), or `stop` (the run is stopped early). Frames pushed before
    `start` or after the end are counted as ``refused`` and never recorded.
    """

    kind = "push"
    #: engines hand over a fresh array for every frame: the ring adopts it
    hands_over_frames = True

    def __init__(self, info: StreamInfo, *, label: str = "push") -> None:
        self.info = info
        self.label = label
        self._sink: FrameCallback | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.received = 0
        self.refused = 0

    def describe(self) -> dict[str, Any]:
        """What feeds the run."""
        return {"kind": self.label, "stream": self.info.to_json()}

    def counters(self) -> dict[str, int]:
        """Frames received, and frames pushed outside the run."""
        return {"received": self.received, "refused": self.refused}

    @property
    def error(self) -> BaseException | None:
        """Why the acquisition ended early, if it did."""
        return self._error

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Accept frames from now on (the acquisition is the user's: nothing to start)."""
        with self._lock:
            if self._sink is not None:
                raise SourceError("a source can be started once")
            self._sink = sink

    def push(self, image: np.ndarray, meta: FrameMeta) -> bool:
        """Hand one frame to the pipeline; False if the run is not accepting frames."""
        sink = self._sink
        if sink is None or self._done.is_set():
            self.refused += 1
            return False
        sink(image, meta)
        self.received += 1
        return True

    def fail(self, error: BaseException) -> None:
        """End the run as failed (e.g. a frame the run cannot record)."""
        self._error = self._error or error
        self._done.set()

    def finish(self) -> None:
        """The acquisition is over."""
        self._done.set()

    def stop(self) -> None:
        """Stop recording (the user's acquisition is not ours to abort)."""
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the acquisition is over."""
        return self._done.wait(timeout)


class PycromanagerHook(PushSource):
    """Frames from the user's own ``pycromanager.Acquisition`` (see `image_process_fn`)."""

    kind = "pycromanager-hook"

    def __init__(self, info: StreamInfo, *, pass_through: bool = False) -> None:
        super().__init__(info, label=self.kind)
        self.pass_through = pass_through

    def image_process_fn(
        self, image: np.ndarray, metadata: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]] | None:
        """Hand the frame to the ring buffer; return it (pycromanager saves it too) or None."""
        try:
            meta = frame_meta_from_pycromanager(
                metadata, self.info.channel_names, source=self.kind
            )
        except SourceError as e:
            self.fail(e)
            raise  # pycromanager aborts the acquisition on an exception in the processor
        self.push(image, meta)
        return (image, metadata) if self.pass_through else None


class CoreListener(PushSource):
    """Frames of MDAs the user runs on their own ``CMMCorePlus``.

    Listens to ``core.mda.events`` from `start` on; the run ends when the
    sequence finishes (complete) or is cancelled (stopped). With
    ``sequences=N`` it waits for N sequences before ending.
    """

    kind = "mmcore-attach"

    def __init__(self, core: Any, info: StreamInfo, *, sequences: int = 1) -> None:
        super().__init__(info, label=self.kind)
        self.core = core
        self.sequences = max(1, sequences)
        self._finished = 0
        self.cancelled = False

    def describe(self) -> dict[str, Any]:
        """The core and camera listened to."""
        return {
            **super().describe(),
            "engine": "pymmcore-plus (user's MDA)",
            "camera": str(self.core.getCameraDevice()),
        }

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Connect to the core's MDA signals."""
        super().start(sink, wait_for_space)
        ev = self.core.mda.events
        ev.frameReady.connect(self._on_frame)
        ev.sequenceFinished.connect(self._on_finished)
        ev.sequenceCanceled.connect(self._on_cancelled)

    def _on_frame(self, img: np.ndarray, event: Any, meta: Any) -> None:
        try:
            m = frame_meta_from_mda(event, meta or {}, self.info.channel_names, source=self.kind)
        except SourceError as e:
            self.fail(e)
            return
        self.push(img, m)

    def _on_finished(self, sequence: Any) -> None:
        self._finished += 1
        if self._finished >= self.sequences:
            self._disconnect()
            self.finish()

    def _on_cancelled(self, sequence: Any) -> None:
        self.cancelled = True
        self._disconnect()
        self.stop()

    def _disconnect(self) -> None:
        ev = self.core.mda.events
        for sig, slot in (
            (ev.frameReady, self._on_frame),
            (ev.sequenceFinished, self._on_finished),
            (ev.sequenceCanceled, self._on_cancelled),
        ):
            with contextlib.suppress(ValueError, RuntimeError):  # already disconnected
                sig.disconnect(slot)

    def stop(self) -> None:
        """Stop listening (the user's MDA goes on)."""
        self._disconnect()
        super().stop()
