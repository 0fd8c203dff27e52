"""The scopestream ZMQ frame protocol.

A frame is one multipart message ``[header, pixels]``:

* ``header``: UTF-8 JSON ``{"protocol": "scopestream-frame", "version": 1,
  "kind": "frame", "dtype": "<u2", "shape": [H, W], "nbytes": N,
  "meta": {...FrameMeta...}, "stream": {...}}``;
* ``pixels``: the raw C-ordered pixel bytes, sent without copying.

The end of a stream is ``[{"protocol": ..., "version": 1, "kind": "end",
"frames": N}]``. Sockets are PUSH (publisher, binds) and PULL (receivers,
connect), so several receivers share one stream round-robin; both set
high-water marks so memory stays bounded. The receiver validates every header
and byte count: a malformed or truncated message is counted and described in
``errors``, never raised and never handed on.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from scopestream.streaming.frame import FRAME_META_VERSION, META_KEYS, FrameMeta

if TYPE_CHECKING:
    from collections.abc import Mapping

PROTOCOL = "scopestream-frame"
PROTOCOL_VERSION = 1
DEFAULT_HWM = 64
MAX_HEADER_BYTES = 64 * 1024
#: dtypes a camera produces; anything else in a header is malformed.
ALLOWED_DTYPES = frozenset({"|u1", "<u2", "<u4", "<f4", "|i1", "<i2", "<i4"})
MAX_NDIM = 4
MAX_FRAME_BYTES = 2**31


class MalformedMessage(ValueError):
    """A message that does not follow the frame protocol."""


def encode_header(
    data: np.ndarray, meta: Mapping[str, Any], stream: Mapping[str, Any] | None = None
) -> bytes:
    """Header bytes for ``data`` with metadata ``meta``."""
    header = {
        "protocol": PROTOCOL,
        "version": PROTOCOL_VERSION,
        "kind": "frame",
        "dtype": data.dtype.str,
        "shape": list(data.shape),
        "nbytes": int(data.nbytes),
        "meta": dict(meta),
        "stream": dict(stream or {}),
    }
    return json.dumps(header, separators=(",", ":")).encode()


def end_message(frames: int) -> bytes:
    """The end-of-stream header."""
    return json.dumps(
        {"protocol": PROTOCOL, "version": PROTOCOL_VERSION, "kind": "end", "frames": frames}
    ).encode()


def _parse_header(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedMessage(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise MalformedMessage(f"not a {PROTOCOL} message (protocol={header.get('protocol')!r})")
    if header.get("version") != PROTOCOL_VERSION:
        raise MalformedMessage(
            f"protocol version {header.get('version')!r} is not supported (expected "
            f"{PROTOCOL_VERSION}); upgrade scopestream on both machines"
        )
    return header


def _check_int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MalformedMessage(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _parse_meta(raw: object) -> FrameMeta:
    if not isinstance(raw, dict):
        raise MalformedMessage("meta is not an object")
    big = 2**62
    meta = FrameMeta(
        version=FRAME_META_VERSION,
        seq=-1,
        t=_check_int(raw.get("t", 0), "meta.t", 0, big),
        p=_check_int(raw.get("p", 0), "meta.p", 0, big),
        c=_check_int(raw.get("c", 0), "meta.c", 0, big),
        z=_check_int(raw.get("z", 0), "meta.z", 0, big),
        timestamp_ns=time.monotonic_ns(),  # the sender's monotonic clock means nothing here
        wall_ns=time.time_ns(),
        exposure_ms=0.0,
        stage_x_um=None,
        stage_y_um=None,
        stage_z_um=None,
        engine_time_ms=None,
        image_number=-1,
        source=str(raw.get("source", "")),
    )
    exp = raw.get("exposure_ms", 0.0)
    if isinstance(exp, (int, float)) and not isinstance(exp, bool) and math.isfinite(exp):
        meta["exposure_ms"] = float(exp)
    for key in ("stage_x_um", "stage_y_um", "stage_z_um", "engine_time_ms"):
        v = raw.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            meta[key] = float(v)  # type: ignore[literal-required]
    wall = raw.get("wall_ns")
    if isinstance(wall, int) and not isinstance(wall, bool) and 0 < wall < 2**63:
        meta["wall_ns"] = wall  # the acquisition's wall-clock time, as the sender saw it
    num = raw.get("image_number")
    if isinstance(num, int) and not isinstance(num, bool) and -1 <= num < 2**62:
        meta["image_number"] = num
    assert set(meta) == set(META_KEYS)
    return meta


@dataclass(frozen=True)
class DecodedFrame:
    """A validated frame from the wire."""

    data: np.ndarray
    meta: FrameMeta
    stream: dict[str, Any]


@dataclass(frozen=True)
class EndOfStream:
    """The publisher's end-of-stream marker."""

    frames: int


def decode(parts: list[bytes] | list[zmq.Frame]) -> DecodedFrame | EndOfStream:
    """Validate a multipart message; raise `MalformedMessage` if it is not one of ours."""
    if not parts:
        raise MalformedMessage("empty message")
    first = parts[0]
    header = _parse_header(first.bytes if isinstance(first, zmq.Frame) else first)
    kind = header.get("kind")
    if kind == "end":
        if len(parts) != 1:
            raise MalformedMessage("end-of-stream message with a payload")
        return EndOfStream(_check_int(header.get("frames", 0), "frames", 0, 2**62))
    if kind != "frame":
        raise MalformedMessage(f"unknown message kind {kind!r}")
    if len(parts) != 2:
        raise MalformedMessage(f"a frame message has 2 parts, got {len(parts)}")
    dtype_str = header.get("dtype")
    if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:
        raise MalformedMessage(f"dtype {dtype_str!r} is not one of {sorted(ALLOWED_DTYPES)}")
    dtype = np.dtype(dtype_str)
    shape = header.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_NDIM:
        raise MalformedMessage(f"shape must be a list of 1–{MAX_NDIM} sizes, got {shape!r}")
    dims = tuple(_check_int(s, "shape", 1, 2**20) for s in shape)
    expected = int(np.prod(dims)) * dtype.itemsize
    if expected > MAX_FRAME_BYTES:
        raise MalformedMessage(f"frame of {expected} bytes is larger than {MAX_FRAME_BYTES}")
    nbytes = _check_int(header.get("nbytes"), "nbytes", 0, MAX_FRAME_BYTES)
    if nbytes != expected:
        raise MalformedMessage(
            f"header says {nbytes} bytes but shape {dims} of {dtype} needs {expected}"
        )
    payload = parts[1]
    buf = payload.buffer if isinstance(payload, zmq.Frame) else memoryview(payload)
    if buf.nbytes != expected:
        raise MalformedMessage(
            f"payload has {buf.nbytes} bytes, header says {expected} (truncated?)"
        )
    meta = _parse_meta(header.get("meta", {}))
    stream = header.get("stream", {})
    if not isinstance(stream, dict):
        raise MalformedMessage("stream is not an object")
    data = np.frombuffer(buf, dtype=dtype).reshape(dims)
    return DecodedFrame(data, meta, stream)


class FramePublisher:
    """PUSH socket that sends frames to one or more `FrameReceiver` s.

    Binds to ``127.0.0.1`` unless an address is given. ``send`` blocks while
    every receiver is at its high-water mark (or none is connected), so it runs
    on a consumer thread of the ring buffer, never on the acquisition callback.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5557",
        *,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[Any] | None = None,
        stream: Mapping[str, Any] | None = None,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.bind(address)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stream = dict(stream or {})
        self.sent = 0

    def send(
        self,
        data: np.ndarray,
        meta: Mapping[str, Any],
        timeout_ms: int = -1,
        *,
        copy: bool = False,
    ) -> bool:
        """Send one frame. Returns False if not sent within ``timeout_ms``.

        ``copy=False`` lets libzmq read ``data`` after this returns: only for memory
        nobody writes to afterwards (an adopted frame); a reused buffer needs ``copy``.
        """
        data = np.ascontiguousarray(data)
        header = encode_header(data, meta, self.stream)
        if timeout_ms >= 0:
            if not self._sock.poll(timeout_ms, zmq.POLLOUT):
                return False
            try:
                # a receiver that disconnects between the poll and the send would leave a
                # blocking PUSH send waiting for a peer for ever: never block here
                self._sock.send_multipart([header, data], copy=copy, flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
        else:
            self._sock.send_multipart([header, data], copy=copy)
        self.sent += 1
        return True

    def wait_for_receiver(self, timeout_s: float) -> bool:
        """Wait until a receiver can take a message."""
        return bool(self._sock.poll(int(timeout_s * 1000), zmq.POLLOUT))

    def finish(self, receivers: int = 1, timeout_ms: int = 5000) -> None:
        """Send the end-of-stream marker once per receiver."""
        msg = end_message(self.sent)
        for _ in range(max(1, receivers)):
            if not self._sock.poll(timeout_ms, zmq.POLLOUT):
                break
            try:
                self._sock.send(msg, flags=zmq.NOBLOCK)  # see `send`: never block here
            except zmq.Again:
                break

    def close(self) -> None:
        """Close the socket (pending messages get ``LINGER`` ms to leave)."""
        self._sock.close()


@dataclass
class ReceiverStats:
    """Counters of a `FrameReceiver`."""

    received: int = 0
    malformed: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))


class FrameReceiver:
    """PULL socket that connects to a `FramePublisher` and yields validated frames."""

    def __init__(
        self,
        address: str,
        *,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self.address = address
        self.stats = ReceiverStats()
        self.ended = False
        self._lock = threading.Lock()

    def recv(self, timeout_ms: int = 1000) -> DecodedFrame | EndOfStream | None:
        """Next valid message, or ``None`` after ``timeout_ms`` without one.

        Malformed messages are counted in ``stats`` and skipped.
        """
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(remaining, zmq.POLLIN):
                return None
            parts = self._sock.recv_multipart(copy=False)
            try:
                msg = decode(parts)
            except MalformedMessage as e:
                self.reject(str(e))
                continue
            if isinstance(msg, EndOfStream):
                self.ended = True
            else:
                self.stats.received += 1
            return msg

    def reject(self, reason: str) -> None:
        """Count a message that cannot be used (malformed, or wrong for this stream)."""
        with self._lock:
            self.stats.malformed += 1
            self.stats.errors.append(reason)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class PublisherSink:
    """A `FrameSink` that publishes every frame it gets (the microscope side of a remote run)."""

    def __init__(
        self, publisher: FramePublisher, receivers: int = 1, *, zero_copy: bool = False
    ) -> None:
        self.publisher = publisher
        self.receivers = receivers
        #: frames are never written again once handed over (the ring adopted them): libzmq
        #: may send them after `write` returned; otherwise each frame is copied
        self.zero_copy = zero_copy

    @property
    def frames_written(self) -> int:
        """Frames sent."""
        return self.publisher.sent

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Send one frame; blocks while every receiver is at its high-water mark."""
        self.publisher.send(data, meta, copy=not self.zero_copy)

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Send the end-of-stream marker and close the socket."""
        try:
            self.publisher.finish(self.receivers)
        finally:
            self.publisher.close()
