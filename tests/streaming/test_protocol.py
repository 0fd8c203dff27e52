from __future__ import annotations

import contextlib
import inspect
import json
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scopestream.streaming.frame import make_meta
from scopestream.streaming.protocol import (
    DecodedFrame,
    EndOfStream,
    FramePublisher,
    FrameReceiver,
    MalformedMessage,
    decode,
    encode_header,
    end_message,
)


def valid_parts(shape: tuple[int, ...] = (4, 6), dtype: str = "uint16") -> list[bytes]:
    data = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    return [encode_header(data, make_meta(t=3, c=1)), data.tobytes()]


def test_roundtrip_decode() -> None:
    msg = decode(valid_parts())
    assert isinstance(msg, DecodedFrame)
    assert msg.data.shape == (4, 6) and msg.data.dtype == np.uint16
    assert msg.data[1, 2] == 8
    assert msg.meta["t"] == 3 and msg.meta["c"] == 1
    assert decode([end_message(12)]) == EndOfStream(12)


def _header(parts: list[bytes]) -> dict[str, Any]:
    h: dict[str, Any] = json.loads(parts[0])
    return h


def _with(parts: list[bytes], **changes: Any) -> list[bytes]:
    h = _header(parts)
    h.update(changes)
    return [json.dumps(h).encode(), *parts[1:]]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: _with(p, version=2), "version 2 is not supported"),
        (lambda p: _with(p, protocol="other"), "not a scopestream-frame message"),
        (lambda p: _with(p, dtype="<f8"), "dtype '<f8'"),
        (lambda p: _with(p, dtype="object"), "dtype 'object'"),
        (lambda p: _with(p, shape=[4, 7]), "needs 56"),
        (lambda p: _with(p, shape=[4, -6]), "shape must be an integer"),
        (lambda p: _with(p, shape=[True, 6]), "shape must be an integer"),
        (lambda p: _with(p, shape="4x6"), "shape must be a list"),
        (lambda p: _with(p, nbytes=10), "header says 10 bytes"),
        (lambda p: _with(p, kind="hello"), "unknown message kind"),
        (lambda p: _with(p, meta={"t": -1}), "meta.t"),
        (lambda p: _with(p, meta=[1, 2]), "meta is not an object"),
        (lambda p: [p[0], p[1][:-2]], "truncated"),
        (lambda p: [p[0]], "has 2 parts"),
        (lambda p: [*p, b"x"], "has 2 parts"),
        (lambda p: [b"\xff\xfe", p[1]], "not UTF-8 JSON"),
        (lambda p: [b"[1,2]", p[1]], "not a JSON object"),
        (lambda p: [], "empty message"),
        (lambda p: [b"x" * 70000, p[1]], "exceeds"),
    ],
)
def test_malformed_messages_are_described(mutate: Any, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        decode(mutate(valid_parts()))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_fuzz_arbitrary_bytes_never_crash(parts: list[bytes]) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(parts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(
        ["version", "kind", "dtype", "shape", "nbytes", "meta", "stream", "protocol"]
    ),
    value=json_values,
    cut=st.integers(0, 48),
)
def test_fuzz_header_fields(field: str, value: Any, cut: int) -> None:
    """Any field set to any JSON value, payload maybe truncated: valid or MalformedMessage."""
    parts = valid_parts()
    h = _header(parts)
    h[field] = value
    payload = parts[1][: len(parts[1]) - cut]
    try:
        msg = decode([json.dumps(h).encode(), payload])
    except MalformedMessage:
        return
    if isinstance(msg, DecodedFrame):
        assert msg.data.nbytes == len(payload)
        assert msg.data.dtype.str == h["dtype"]


def test_publisher_to_receiver_over_tcp_identical_pixels(sockets: contextlib.ExitStack) -> None:
    pub = sockets.enter_context(contextlib.closing(FramePublisher("tcp://127.0.0.1:*")))
    assert pub.address.startswith("tcp://127.0.0.1:")
    rx = sockets.enter_context(contextlib.closing(FrameReceiver(pub.address)))
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 4096, (64, 48), dtype=np.uint16) for _ in range(20)]
    for i, f in enumerate(frames):
        assert pub.send(f, make_meta(t=i, exposure_ms=5.0), timeout_ms=5000)
    pub.finish()
    got = []
    while True:
        msg = rx.recv(timeout_ms=5000)
        assert msg is not None
        if isinstance(msg, EndOfStream):
            assert msg.frames == 20
            break
        got.append(msg)
    assert [m.meta["t"] for m in got] == list(range(20))
    for m, f in zip(got, frames, strict=True):
        np.testing.assert_array_equal(m.data, f)
        assert m.meta["exposure_ms"] == 5.0


def test_receiver_counts_garbage_and_keeps_going(sockets: contextlib.ExitStack) -> None:
    push: zmq.Socket[bytes] = sockets.enter_context(zmq.Context.instance().socket(zmq.PUSH))
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    rx = sockets.enter_context(contextlib.closing(FrameReceiver(f"tcp://127.0.0.1:{port}")))
    good = valid_parts()
    push.send_multipart([b"garbage"])
    push.send_multipart(_with(good, version=99))
    push.send_multipart([good[0], good[1][:5]])
    push.send_multipart(good)
    msg = rx.recv(timeout_ms=5000)
    assert isinstance(msg, DecodedFrame)
    assert rx.stats.malformed == 3
    assert rx.stats.received == 1
    assert any("truncated" in e for e in rx.stats.errors)


def test_publisher_binds_loopback_by_default(
    free_port: int, sockets: contextlib.ExitStack
) -> None:
    # the default's fixed port may be taken (a running `publish`, a parallel test run):
    # check the default's host, then bind that host on a free port
    default = inspect.signature(FramePublisher).parameters["address"].default
    host, _, port = default.rpartition(":")
    assert host == "tcp://127.0.0.1" and port.isdigit()
    pub = sockets.enter_context(contextlib.closing(FramePublisher(f"{host}:{free_port}")))
    assert pub.address == f"tcp://127.0.0.1:{free_port}"


def test_send_times_out_without_receiver(sockets: contextlib.ExitStack) -> None:
    pub = sockets.enter_context(contextlib.closing(FramePublisher("tcp://127.0.0.1:*")))
    # nobody will ever connect: only the timeout can end this send
    assert pub.send(np.zeros((2, 2), np.uint16), make_meta(), timeout_ms=50) is False
    assert pub.sent == 0
