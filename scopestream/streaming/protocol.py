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

Off loopback a stream is authenticated and encrypted with ZMQ CURVE (`make_keys`):
the publisher holds a server key pair and the public keys of the receivers it
lets in; a receiver holds its own pair and the publisher's public key, so neither
side talks to a peer it was not told about. Binding or connecting to anything but
loopback without keys raises `InsecureAddress` unless ``insecure=True``.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from scopestream.streaming.frame import FRAME_META_VERSION, META_KEYS, FrameMeta

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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


class InsecureAddress(ValueError):
    """A non-loopback address without CURVE keys (and without ``insecure``)."""


class BadKey(ValueError):
    """A CURVE key file or key that cannot be used."""


def is_loopback(address: str) -> bool:
    """Whether a ZMQ endpoint stays on this machine (loopback TCP, ipc, inproc)."""
    import ipaddress

    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface (eth0, *): not loopback


def make_keys(stem: str | Path) -> tuple[Path, Path]:
    """Write a CURVE key pair: ``STEM.key`` (public, to share) and ``STEM.key_secret``.

    The secret file is readable by its owner only. Refuses to overwrite a key.
    """
    import os

    import zmq.auth

    stem = Path(stem)
    public, secret = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".key_secret")
    for f in (public, secret):
        if f.exists():
            raise BadKey(f"{f} exists; keys are never overwritten (remove it first)")
    stem.parent.mkdir(parents=True, exist_ok=True)
    pub_s, sec_s = zmq.auth.create_certificates(str(stem.parent), stem.name)
    os.chmod(sec_s, 0o600)
    return Path(pub_s), Path(sec_s)


def load_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file of `make_keys`."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise BadKey(f"no key file {path} (make one with 'scopestream keys --out STEM')")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise BadKey(f"{path} is not a CURVE key file: {e}") from None
    if not secret:
        raise BadKey(f"{path} holds a public key only; give the .key_secret file")
    return public, secret


def load_public_key(value: str | Path) -> bytes:
    """A Z85 public key: a ``.key`` (or ``.key_secret``) file, or the 40 characters."""
    import zmq.auth
    from zmq.utils import z85

    text = str(value).strip()
    path = Path(text)
    if path.is_file():
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (ValueError, OSError) as e:
            raise BadKey(f"{path} is not a CURVE key file: {e}") from None
        return public
    if len(text) == 40:
        try:
            z85.decode(text.encode())
        except (ValueError, KeyError):
            pass
        else:
            return text.encode()
    raise BadKey(f"{text!r} is neither a key file nor a 40-character Z85 public key")


def _refuse_insecure(address: str, role: str) -> None:
    hint = (
        "--curve-secret KEY.key_secret --allow RECEIVER.key"
        if role == "bind"
        else "--curve-server-key PUBLISHER.key --curve-secret KEY.key_secret"
    )
    raise InsecureAddress(
        f"refusing to {role} {address} without encryption: anyone on the network could "
        f"{'take or read the frames' if role == 'bind' else 'inject frames'}. Give {hint} "
        "(make key pairs with 'scopestream keys --out NAME'), or --insecure on a network "
        "you trust"
    )


def encode_header(
    data: np.ndarray,
    meta: Mapping[str, Any],
    stream: Mapping[str, Any] | None = None,
    *,
    run: str = "",
    seq: int = -1,
    receivers: int = 1,
) -> bytes:
    """Header bytes for ``data`` with metadata ``meta``.

    ``run`` names the stream (a new one each time a publisher starts) and ``seq``
    counts its frames from 0, so a receiver refuses another stream's frames and
    counts the ones that never arrived.
    """
    header = {
        "protocol": PROTOCOL,
        "version": PROTOCOL_VERSION,
        "kind": "frame",
        "run": run,
        "seq": seq,
        "receivers": receivers,
        "dtype": data.dtype.str,
        "shape": list(data.shape),
        "nbytes": int(data.nbytes),
        "meta": dict(meta),
        "stream": dict(stream or {}),
    }
    return json.dumps(header, separators=(",", ":")).encode()


def end_message(frames: int, run: str = "") -> bytes:
    """The end-of-stream header: the frames the stream ``run`` sent."""
    return json.dumps(
        {
            "protocol": PROTOCOL,
            "version": PROTOCOL_VERSION,
            "kind": "end",
            "frames": frames,
            "run": run,
        }
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


def _run_of(header: dict[str, Any]) -> str:
    run = header.get("run", "")
    if not isinstance(run, str) or len(run) > 64:
        raise MalformedMessage(f"run must be a string of at most 64 characters, got {run!r}")
    return run


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
    run: str = ""  # the stream's identity ("" from a publisher that sends none)
    seq: int = -1  # the publisher's count of this frame (-1: not sent)
    receivers: int = 1  # how many receivers share the stream (round-robin)


@dataclass(frozen=True)
class EndOfStream:
    """The publisher's end-of-stream marker."""

    frames: int
    run: str = ""


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
        return EndOfStream(
            _check_int(header.get("frames", 0), "frames", 0, 2**62), _run_of(header)
        )
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
    seq = _check_int(header.get("seq", -1), "seq", -1, 2**62)
    receivers = _check_int(header.get("receivers", 1), "receivers", 1, 2**16)
    data = np.frombuffer(buf, dtype=dtype).reshape(dims)
    return DecodedFrame(data, meta, stream, _run_of(header), seq, receivers)


class FramePublisher:
    """PUSH socket that sends frames to one or more `FrameReceiver` s.

    Binds to ``127.0.0.1`` unless an address is given. Any other address needs
    ``curve_secret`` (this publisher's ``.key_secret``) and ``allow`` (the public
    keys of the receivers let in: any other peer fails the handshake and is
    counted in ``refused``), or ``insecure=True``. ``send`` blocks while every
    receiver is at its high-water mark (or none is connected), so it runs on a
    consumer thread of the ring buffer, never on the acquisition callback.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5557",
        *,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[Any] | None = None,
        stream: Mapping[str, Any] | None = None,
        curve_secret: str | Path | None = None,
        allow: Sequence[str | Path] = (),
        insecure: bool = False,
        receivers: int = 1,
    ) -> None:
        self.receivers = max(1, receivers)
        self.secure = curve_secret is not None
        if not self.secure and not insecure and not is_loopback(address):
            _refuse_insecure(address, "bind")
        if self.secure and not allow:
            raise BadKey(
                "a CURVE publisher needs --allow with the public key of every receiver "
                "(without it, no receiver could connect)"
            )
        keys = load_secret_key(curve_secret) if curve_secret is not None else None
        self._allowed = {load_public_key(k) for k in allow}
        self.refused = 0  # peers whose key is not allowed
        self._auth: Any = None
        # the authenticator is one per context: a secure publisher has a context of its own
        self._own_ctx = self.secure and context is None
        self._ctx = zmq.Context() if self._own_ctx else (context or zmq.Context.instance())
        self._sock = self._ctx.socket(zmq.PUSH)
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=self)
            self._sock.curve_publickey, self._sock.curve_secretkey = keys
            self._sock.curve_server = True
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 500)  # a dead receiver is dropped, not waited on
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
        try:
            self._sock.bind(address)
        except BaseException:
            self.close()
            raise
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stream = dict(stream or {})
        self.run = uuid.uuid4().hex
        self.sent = 0
        #: receivers connected now (handshakes done, minus disconnects: `peers`)
        self._peers = 0
        self._monitor: Any = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: let a receiver in only if its public key was allowed."""
        if key in self._allowed:
            return True
        self.refused += 1
        return False

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
        header = encode_header(
            data, meta, self.stream, run=self.run, seq=self.sent, receivers=self.receivers
        )
        if timeout_ms >= 0:
            if not self._sock.poll(timeout_ms, zmq.POLLOUT):
                return False
            try:
                # a receiver that disconnects between the poll and the send would leave a
                # blocking PUSH send waiting for a peer for ever: never block here
                self._sock.send_multipart([header, data.data], copy=copy, flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
        else:
            self._sock.send_multipart([header, data.data], copy=copy)
        self.sent += 1
        return True

    def peers(self, timeout_ms: int = 0) -> int:
        """Receivers connected now (waits up to ``timeout_ms`` for a change)."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(timeout_ms):
            timeout_ms = 0
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._peers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self._peers = max(0, self._peers - 1)
        return self._peers

    def wait_for_receiver(self, timeout_s: float) -> bool:
        """Wait until every receiver of the stream (``receivers``) is connected, so a
        fanned-out stream starts shared by all of them; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.peers() < self.receivers:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.peers(int(min(left, 0.2) * 1000) + 1)
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        return bool(self._sock.poll(left_ms, zmq.POLLOUT))

    def finish(self, receivers: int = 1, timeout_ms: int = 5000) -> None:
        """Send the end-of-stream marker once per receiver."""
        msg = end_message(self.sent, self.run)
        for _ in range(max(1, receivers)):
            if not self._sock.poll(timeout_ms, zmq.POLLOUT):
                break
            try:
                self._sock.send(msg, flags=zmq.NOBLOCK)  # see `send`: never block here
            except zmq.Again:
                break

    def close(self) -> None:
        """Close the socket (pending messages get ``LINGER`` ms to leave)."""
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self._sock.disable_monitor()
            monitor.close(linger=0)
            self._monitor = None
        if hasattr(self, "_sock"):
            self._sock.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False


@dataclass
class ReceiverStats:
    """Counters of a `FrameReceiver`."""

    received: int = 0
    malformed: int = 0
    #: handshakes that failed: a peer without the publisher's key, or not speaking CURVE
    refused: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))


#: the largest message part a receiver takes (a bigger one drops the connection):
#: a 16384 × 8192 uint16 frame; memory stays bounded whatever a peer sends
DEFAULT_MAX_MESSAGE_BYTES = 2**28

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class FrameReceiver:
    """PULL socket that connects to a `FramePublisher` and yields validated frames.

    Off loopback it needs ``curve_server_key`` (the publisher's public key) and
    ``curve_secret`` (this receiver's ``.key_secret``, whose public half the
    publisher allows), or ``insecure=True``. A peer that fails the handshake sends
    nothing and is counted in ``stats.refused``. The connection is watched (ZMTP
    heartbeats): `down_for_s` tells how long no publisher has been connected.
    """

    def __init__(
        self,
        address: str,
        *,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[Any] | None = None,
        curve_server_key: str | Path | None = None,
        curve_secret: str | Path | None = None,
        insecure: bool = False,
        heartbeat_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if (curve_server_key is None) != (curve_secret is None):
            raise BadKey(
                "a CURVE receiver needs both --curve-server-key (the publisher's .key) and "
                "--curve-secret (its own .key_secret, allowed by the publisher)"
            )
        self.secure = curve_server_key is not None
        if not self.secure and not insecure and not is_loopback(address):
            _refuse_insecure(address, "connect to")
        server = load_public_key(curve_server_key) if curve_server_key is not None else None
        keys = load_secret_key(curve_secret) if curve_secret is not None else None
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        if server is not None and keys is not None:
            self._sock.curve_serverkey = server
            self._sock.curve_publickey, self._sock.curve_secretkey = keys
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + MAX_HEADER_BYTES)
        ivl = max(100, int(heartbeat_s * 250))
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl * 2, int(heartbeat_s * 1000)))
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED
        )
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._sock.connect(address)
        self.address = address
        self.stats = ReceiverStats()
        self.ended = False
        self._lock = threading.Lock()
        self._peers = 0
        self._ever_connected = False
        self._down_since: float | None = None

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._peers += 1
                self._ever_connected = True
                self._down_since = None
            elif event == zmq.EVENT_DISCONNECTED:
                self._peers = max(0, self._peers - 1)
                if self._peers == 0 and self._down_since is None:
                    self._down_since = time.monotonic()
            elif event & _HANDSHAKE_FAILED:
                self.stats.refused += 1
                self.stats.errors.append(
                    "a peer failed the handshake (wrong or no CURVE key): refused"
                )

    def down_for_s(self) -> float:
        """Seconds since the last publisher disconnected (0 while one is connected, or
        before any connected)."""
        self._drain_monitor()
        if not self._ever_connected or self._down_since is None:
            return 0.0
        return time.monotonic() - self._down_since

    def recv(self, timeout_ms: int = 1000) -> DecodedFrame | EndOfStream | None:
        """Next valid message, or ``None`` after ``timeout_ms`` without one.

        Malformed messages are counted in ``stats`` and skipped.
        """
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(self._poller.poll(remaining))
            if self._monitor in events:
                self._drain_monitor()
            if self._sock not in events:
                if time.monotonic() >= deadline:
                    return None
                continue
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
        if not self._sock.closed:
            self._sock.disable_monitor()
            self._monitor.close()
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
