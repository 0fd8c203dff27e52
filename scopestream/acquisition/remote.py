"""Frames published by ``scopestream publish`` on another machine (``tcp://HOST:PORT``)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from scopestream.acquisition.base import SourceError, ThreadedSource
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import DecodedFrame, EndOfStream, FrameReceiver

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from scopestream.streaming.frame import FrameMeta


#: an open-ended stream's next time point may be at most this far past the last one
#: (a frame at t = 2**31 would make the store grow a time axis of that length)
MAX_T_AHEAD = 4096
#: what an announced layout may hold: frames planned in all (time points × channels ×
#: planes × positions; the store keeps a flag for each) and the stream's own sizes
MAX_PLANNED_FRAMES = 2**28
MAX_CHANNELS = 1024
MAX_Z = 2**16
MAX_POSITIONS = 2**17


def check_layout(info: StreamInfo) -> str | None:
    """What is wrong with a layout a publisher announced (None: it can be recorded).

    Sizes are bounded by memory (the store's per-frame flags) and every scale must be
    a finite positive number (a NaN would be written into the store's metadata).
    """
    n_t = info.n_t if info.n_t is not None else 64
    for name, value, hi in (
        ("n_z", info.n_z, MAX_Z),
        ("channels", len(info.channel_names), MAX_CHANNELS),
        ("positions", len(info.positions), MAX_POSITIONS),
    ):
        if value > hi:
            return f"{name}={value} (at most {hi})"
    if info.n_t is not None and info.n_t < 0:
        return f"n_t={info.n_t}"
    planned = n_t * len(info.channel_names) * info.n_z * max(1, len(info.positions))
    if planned > MAX_PLANNED_FRAMES:
        return f"{planned} frames (at most {MAX_PLANNED_FRAMES})"
    for name, v in (
        ("pixel_size_um", info.pixel_size_um),
        ("z_step_um", info.z_step_um),
        ("interval_s", info.interval_s),
    ):
        if not math.isfinite(v) or v < 0 or (v == 0 and name == "pixel_size_um"):
            return f"{name}={v}"
    for pos in info.positions:
        for coord in (pos.x_um, pos.y_um, pos.z_um):
            if coord is not None and not math.isfinite(coord):
                return f"position {pos.name} at a non-finite coordinate {coord}"
    return None


class RemoteSource(ThreadedSource):
    """Receive frames over the scopestream ZMQ protocol.

    The stream's layout is read from the first valid frame (the publisher puts it
    in every header), so opening blocks until that frame arrives or
    ``connect_timeout_s`` passes. Messages that are malformed, or whose shape or
    dtype differ from the stream's, are counted in ``malformed`` and dropped
    before the ring buffer. The stream ends at the publisher's end marker, at
    ``stop()``, or after ``idle_timeout_s`` without a message (if given).
    Frames are stamped when they arrive (the sender's clock means nothing here).

    Every frame is accounted for: frames of another stream (another publisher, or
    the same one restarted) are refused and counted in ``foreign``; a frame whose
    t, channel, z or position lies outside the announced plan is counted as
    ``malformed`` and skipped; frames the publisher numbered but that never came
    (a gap in its sequence, or fewer than its end marker says) are counted in
    ``lost``. A publisher gone for ``heartbeat_s`` (killed, or the network down)
    ends the stream with `SourceError`, so the run is recorded ``failed`` with what
    arrived instead of waiting for ever. Keys and ``insecure``: `FrameReceiver`.
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
        curve_server_key: str | None = None,
        curve_secret: str | None = None,
        insecure: bool = False,
        heartbeat_s: float = 5.0,
    ) -> None:
        super().__init__(fps=0.0)
        self.address = address
        self.idle_timeout_s = idle_timeout_s
        self.heartbeat_s = heartbeat_s
        try:
            self._rx = FrameReceiver(
                address,
                curve_server_key=curve_server_key,
                curve_secret=curve_secret,
                insecure=insecure,
                heartbeat_s=heartbeat_s / 2,
            )
        except ValueError as e:  # InsecureAddress, BadKey
            raise SourceError(str(e)) from None
        self.end_seen = False
        self.foreign = 0
        self.lost = 0
        self.sent: int | None = None  # the publisher's count, from its end marker
        first = None
        try:
            while first is None:
                msg = self._rx.recv(timeout_ms=int(connect_timeout_s * 1000))
                if msg is None:
                    refused = (
                        f" ({self._rx.stats.refused} handshakes refused: do the keys match?)"
                        if self._rx.stats.refused
                        else ""
                    )
                    raise SourceError(
                        f"no frame from {address} within {connect_timeout_s:g} s; is "
                        f"'scopestream publish' running and reachable there?{refused}"
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
        bad_layout = check_layout(info)
        if bad_layout is not None:
            self._rx.close()
            raise SourceError(f"the stream from {address} announces {bad_layout}: not recorded")
        self.info = info
        self._t_max = -1
        self._last_own = time.monotonic()  # the last message of this stream
        bad = self._in_plan(first.meta)
        if bad is not None:  # counted; the stream starts with the next frame in the plan
            self._rx.reject(bad)
            self._first = None
        else:
            self._t_max = first.meta["t"]
        self.run = first.run
        self.receivers = first.receivers
        self._next_seq = first.seq + 1 if first.seq >= 0 else -1
        if first.seq > 0 and first.receivers == 1:
            self.lost += first.seq  # frames 0..seq-1 went elsewhere or nowhere

    @property
    def share_complete(self) -> bool:
        """A receiver of a fanned-out stream (``publish --receivers N``) whose share ended
        with the publisher's end marker: its run is complete with fewer frames than the plan."""
        return self.receivers > 1 and self.end_seen

    def describe(self) -> dict[str, Any]:
        """Where the frames come from."""
        return {
            "kind": self.kind,
            "address": self.address,
            "stream": self.info.to_json(),
            "run": self.run,  # the publisher's stream: `inspect A B` joins its receivers' stores
            "receivers": self.receivers,
        }

    def counters(self) -> dict[str, int]:
        """Received, malformed, foreign (another stream's), refused (handshakes), lost, and
        what the publisher sent (its end marker's count)."""
        return {
            "received": self._rx.stats.received,
            "malformed": self._rx.stats.malformed,
            "foreign": self.foreign,
            "refused": self._rx.stats.refused,
            "lost": self.lost,
            "sent": -1 if self.sent is None else self.sent,  # the publisher's count (-1: unknown)
        }

    @property
    def errors(self) -> list[str]:
        """The last few reasons messages were rejected."""
        return list(self._rx.stats.errors)

    def _in_plan(self, meta: FrameMeta) -> str | None:
        info = self.info
        n_p = max(1, len(info.positions))
        index = {"c": meta["c"], "z": meta["z"], "p": meta["p"], "t": meta["t"]}
        sizes = {"c": len(info.channel_names), "z": info.n_z, "p": n_p, "t": info.n_t}
        for key, n in sizes.items():
            if n is not None and index[key] >= n:
                return f"frame at {key}={index[key]} outside the plan ({n} of {key}): skipped"
        if info.n_t is None and meta["t"] > self._t_max + MAX_T_AHEAD:
            return (
                f"frame at t={meta['t']}, more than {MAX_T_AHEAD} time points after the "
                f"last one (t={self._t_max}) of an open-ended stream: skipped"
            )
        return None

    def _account(self, seq: int) -> bool:
        """Count a gap in the publisher's numbering; False for a frame already had."""
        if seq < 0 or self._next_seq < 0:
            return True
        if seq < self._next_seq:
            return False
        if self.receivers == 1:
            self.lost += seq - self._next_seq
        self._next_seq = seq + 1
        return True

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Valid frames of this stream's shape, until the end marker, stop or idle timeout."""
        shape, dtype = self.info.frame_shape, self.info.dtype
        if self._first is not None:
            self._first.meta["timestamp_ns"] = time.monotonic_ns()
            yield self._first.data, self._first.meta
            self._first = None
        idle_ms, idle_total = 200, 0.0
        self._last_own = time.monotonic()
        while not self._stop.is_set():
            msg = self._rx.recv(timeout_ms=idle_ms)
            if msg is None:
                idle_total += idle_ms / 1000
                if self.idle_timeout_s is not None and idle_total >= self.idle_timeout_s:
                    return
                down = self._rx.down_for_s()
                if down >= self.heartbeat_s / 2:
                    raise SourceError(
                        f"lost the publisher at {self.address}: no connection for "
                        f"{down:.1f} s and no end-of-stream marker (killed, or the network "
                        f"is down); {self._rx.stats.received - self.foreign} frames arrived"
                    )
                continue
            if msg.run != self.run:
                self.foreign += 1
                quiet = time.monotonic() - self._last_own
                if quiet >= self.heartbeat_s:  # only another stream's frames for that long
                    raise SourceError(
                        f"another stream took over {self.address} (the publisher restarted?): "
                        f"{self.foreign} of its messages refused and none of this stream's "
                        f"for {quiet:.1f} s; {self._rx.stats.received - self.foreign} frames "
                        "arrived"
                    )
                what = "end marker" if isinstance(msg, EndOfStream) else "frame"
                self._rx.reject(
                    f"a {what} of another stream (run {msg.run or '?'}, not {self.run or '?'}: "
                    "another publisher, or this one restarted): refused"
                )
                continue
            idle_total = 0.0
            self._last_own = time.monotonic()
            if isinstance(msg, EndOfStream):
                self.end_seen = True
                self.sent = msg.frames
                if self.receivers == 1 and self._next_seq >= 0:
                    self.lost += max(0, msg.frames - self._next_seq)
                return
            if not self._account(msg.seq):
                self._rx.reject(f"frame {msg.seq} of the stream came twice: refused")
                continue
            if msg.data.shape != shape or msg.data.dtype.name != dtype:
                self._rx.reject(
                    f"frame of shape {msg.data.shape} {msg.data.dtype} "
                    f"in a stream of {shape} {dtype}"
                )
                continue
            bad = self._in_plan(msg.meta)
            if bad is not None:
                self._rx.reject(bad)
                continue
            self._t_max = max(self._t_max, msg.meta["t"])
            yield msg.data, msg.meta

    def finished(self) -> None:
        """Close the socket."""
        self._rx.close()

    def stop(self) -> None:
        """Ask the thread to stop; a source never started closes its socket here."""
        super().stop()
        if self._thread is None:
            self._rx.close()
