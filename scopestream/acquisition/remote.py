"""Frames published by ``scopestream publish`` on another machine (``tcp://HOST:PORT``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from scopestream.acquisition.base import SourceError, ThreadedSource
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import DecodedFrame, EndOfStream, FrameReceiver

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from scopestream.streaming.frame import FrameMeta


class RemoteSource(ThreadedSource):
    """Receive frames over the scopestream ZMQ protocol.

    The stream's layout is read from the first valid frame (the publisher puts it
    in every header), so opening blocks until that frame arrives or
    ``connect_timeout_s`` passes. Messages that are malformed, or whose shape or
    dtype differ from the stream's, are counted in ``malformed`` and dropped
    before the ring buffer. The stream ends at the publisher's end marker, at
    ``stop()``, or after ``idle_timeout_s`` without a message (if given).
    Frames are stamped when they arrive (the sender's clock means nothing here).
    """

    kind = "remote"
    #: every frame is a fresh array nobody writes to afterwards: the ring adopts it
    hands_over_frames = True
    paced_by_pipeline = False  # the network is not ours to pause
    stamp_frames = False

    def __init__(
        self,
        address: str,
        *,
        connect_timeout_s: float = 30.0,
        idle_timeout_s: float | None = None,
    ) -> None:
        super().__init__(fps=0.0)
        self.address = address
        self.idle_timeout_s = idle_timeout_s
        self._rx = FrameReceiver(address)
        self.end_seen = False
        first = None
        try:
            while first is None:
                msg = self._rx.recv(timeout_ms=int(connect_timeout_s * 1000))
                if msg is None:
                    raise SourceError(
                        f"no frame from {address} within {connect_timeout_s:g} s; is "
                        f"'scopestream publish' running and reachable there?"
                    )
                if isinstance(msg, DecodedFrame):
                    first = msg
        except BaseException:  # e.g. Ctrl-C while waiting: nobody else will close it
            self._rx.close()
            raise
        self._first: DecodedFrame | None = first
        try:
            info = StreamInfo.from_json(first.stream) if first.stream else None
        except (KeyError, ValueError, TypeError):
            info = None
        if (
            info is None
            or info.frame_shape != first.data.shape
            or info.dtype != first.data.dtype.name
        ):
            info = StreamInfo(frame_shape=first.data.shape, dtype=first.data.dtype.name)  # type: ignore[arg-type]
        self.info = info

    def describe(self) -> dict[str, Any]:
        """Where the frames come from."""
        return {"kind": self.kind, "address": self.address, "stream": self.info.to_json()}

    def counters(self) -> dict[str, int]:
        """Received and malformed message counts."""
        return {"received": self._rx.stats.received, "malformed": self._rx.stats.malformed}

    @property
    def errors(self) -> list[str]:
        """The last few reasons messages were rejected."""
        return list(self._rx.stats.errors)

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Valid frames of this stream's shape, until the end marker, stop or idle timeout."""
        shape, dtype = self.info.frame_shape, self.info.dtype
        if self._first is not None:
            self._first.meta["timestamp_ns"] = time.monotonic_ns()
            yield self._first.data, self._first.meta
            self._first = None
        idle_ms, idle_total = 200, 0.0
        while not self._stop.is_set():
            msg = self._rx.recv(timeout_ms=idle_ms)
            if msg is None:
                idle_total += idle_ms / 1000
                if self.idle_timeout_s is not None and idle_total >= self.idle_timeout_s:
                    return
                continue
            idle_total = 0.0
            if isinstance(msg, EndOfStream):
                self.end_seen = True
                return
            if msg.data.shape != shape or msg.data.dtype.name != dtype:
                self._rx.reject(
                    f"frame of shape {msg.data.shape} {msg.data.dtype} "
                    f"in a stream of {shape} {dtype}"
                )
                continue
            yield msg.data, msg.meta

    def finished(self) -> None:
        """Close the socket."""
        self._rx.close()

    def stop(self) -> None:
        """Ask the thread to stop; a source never started closes its socket here."""
        super().stop()
        if self._thread is None:
            self._rx.close()
