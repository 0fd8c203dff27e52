"""The remote stream off loopback: CURVE keys, refused peers, and every frame accounted for."""

from __future__ import annotations

import contextlib
import stat
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
import zmq

from scopestream.acquisition.base import SourceError
from scopestream.acquisition.remote import RemoteSource
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import (
    BadKey,
    DecodedFrame,
    EndOfStream,
    FramePublisher,
    FrameReceiver,
    InsecureAddress,
    is_loopback,
    load_public_key,
    make_keys,
)

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: make_keys(tmp_path / name) for name in ("scope", "gpu", "intruder")}


def frame(i: int) -> np.ndarray:
    return np.full((8, 12), i, np.uint16)


def drain(
    rx: FrameReceiver, timeout_s: float = 1.5, until: int | None = None
) -> list[DecodedFrame | EndOfStream]:
    got: list[DecodedFrame | EndOfStream] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (until is None or len(got) < until):
        msg = rx.recv(timeout_ms=100)
        if msg is not None:
            got.append(msg)
    return got


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://127.3.0.9:5557", True),
        ("tcp://localhost:5557", True),
        ("tcp://[::1]:5557", True),
        ("ipc:///tmp/x", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://*:5557", False),
        ("tcp://192.168.1.20:5557", False),
        ("tcp://microscope.lab:5557", False),
        ("tcp://eth0:5557", False),
    ],
)
def test_what_counts_as_loopback(address: str, local: bool) -> None:
    assert is_loopback(address) is local


def test_binding_off_loopback_needs_keys_or_insecure(
    free_port: int, sockets: contextlib.ExitStack
) -> None:
    with pytest.raises(InsecureAddress, match=r"--curve-secret .*--allow.*--insecure"):
        FramePublisher(f"tcp://0.0.0.0:{free_port}")
    pub = sockets.enter_context(
        contextlib.closing(FramePublisher(f"tcp://0.0.0.0:{free_port}", insecure=True))
    )
    assert pub.address.endswith(f":{free_port}")


def test_connecting_off_loopback_needs_keys_or_insecure() -> None:
    with pytest.raises(InsecureAddress, match="--curve-server-key"):
        FrameReceiver("tcp://192.0.2.1:5557")  # never contacted: refused before connecting
    with pytest.raises(SourceError, match="--curve-server-key"):
        RemoteSource("tcp://192.0.2.1:5557", connect_timeout_s=0.1)


def test_keys_are_files_a_secret_is_private(tmp_path: Path) -> None:
    public, secret = make_keys(tmp_path / "k" / "scope")
    assert (public.name, secret.name) == ("scope.key", "scope.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    z85 = load_public_key(public)
    assert len(z85) == 40
    assert load_public_key(z85.decode()) == z85  # the key itself works as well as its file
    with pytest.raises(BadKey, match="never overwritten"):
        make_keys(tmp_path / "k" / "scope")
    with pytest.raises(BadKey, match="neither a key file"):
        load_public_key("not-a-key")


def test_a_curve_publisher_must_name_its_receivers(
    keys: dict[str, tuple[Path, Path]],
) -> None:
    with pytest.raises(BadKey, match="--allow"):
        FramePublisher("tcp://127.0.0.1:*", curve_secret=keys["scope"][1])


def test_curve_stream_reaches_the_allowed_receiver_only(
    keys: dict[str, tuple[Path, Path]], sockets: contextlib.ExitStack
) -> None:
    pub = FramePublisher(
        "tcp://127.0.0.1:*", curve_secret=keys["scope"][1], allow=[keys["gpu"][0]]
    )
    sockets.enter_context(contextlib.closing(pub))
    gpu = FrameReceiver(
        pub.address, curve_server_key=keys["scope"][0], curve_secret=keys["gpu"][1]
    )
    sockets.enter_context(contextlib.closing(gpu))
    # a peer with a key pair of its own, not allowed: the handshake fails, it gets nothing
    intruder = FrameReceiver(
        pub.address, curve_server_key=keys["scope"][0], curve_secret=keys["intruder"][1]
    )
    sockets.enter_context(contextlib.closing(intruder))
    deadline = time.monotonic() + 30
    while pub.refused == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pub.refused >= 1
    for i in range(10):
        assert pub.send(frame(i), make_meta(t=i), timeout_ms=10_000)
    got = [m for m in drain(gpu, 60.0, until=10) if isinstance(m, DecodedFrame)]
    assert [int(m.data[0, 0]) for m in got] == list(range(10))
    assert drain(intruder, 0.5) == []
    assert intruder.stats.received == 0


@pytest.mark.parametrize("impostor", ["other-key", "no-key"])
def test_a_receiver_never_takes_frames_from_an_unauthenticated_publisher(
    impostor: str, keys: dict[str, tuple[Path, Path]], sockets: contextlib.ExitStack
) -> None:
    # someone binds the port the receiver connects to: with another key pair (allowing
    # the receiver), or in the clear; the receiver expects the scope's key
    if impostor == "other-key":
        pub = FramePublisher(
            "tcp://127.0.0.1:*", curve_secret=keys["intruder"][1], allow=[keys["gpu"][0]]
        )
    else:
        pub = FramePublisher("tcp://127.0.0.1:*")
    sockets.enter_context(contextlib.closing(pub))
    rx = FrameReceiver(pub.address, curve_server_key=keys["scope"][0], curve_secret=keys["gpu"][1])
    sockets.enter_context(contextlib.closing(rx))
    for i in range(5):
        pub.send(frame(i), make_meta(t=i), timeout_ms=200)
    assert drain(rx, 2.0) == []
    assert rx.stats.received == 0
    deadline = time.monotonic() + 30
    while rx.stats.refused == 0 and time.monotonic() < deadline:
        rx.recv(timeout_ms=100)
    assert rx.stats.refused >= 1


def connect_source(
    pub: FramePublisher,
    sockets: contextlib.ExitStack,
    address: str | None = None,
    heartbeat_s: float = 5.0,
) -> RemoteSource:
    """A source on ``pub``'s stream; its first frame is sent once the source connects
    (a PUSH waits for a peer), and counted before the test sends more."""
    t = threading.Thread(target=pub.send, args=(frame(0), make_meta(t=0), 30_000))
    t.start()
    try:
        src = RemoteSource(address or pub.address, connect_timeout_s=30, heartbeat_s=heartbeat_s)
    finally:
        t.join()
    sockets.enter_context(contextlib.closing(src._rx))
    return src


def rebind(address: str, info: StreamInfo) -> FramePublisher:
    """A publisher on an address just closed (libzmq frees the port in its own time)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return FramePublisher(address, stream=info.to_json())
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _collect(src: RemoteSource) -> list[int]:
    return [int(data[0, 0]) for data, _ in src.frames()]


def test_restarted_or_other_publisher_frames_are_refused_and_counted(
    free_port: int, sockets: contextlib.ExitStack
) -> None:
    address = f"tcp://127.0.0.1:{free_port}"
    info = StreamInfo(frame_shape=(8, 12), n_t=20)
    first = FramePublisher(address, stream=info.to_json())
    src = connect_source(first, sockets, address, heartbeat_s=30)
    for t in (1, 2):
        assert first.send(frame(t), make_meta(t=t), timeout_ms=10_000)
    first.close()
    # the same publisher started again: a new stream identity, its t=0..3 would overwrite
    again = rebind(address, info)
    sockets.enter_context(contextlib.closing(again))
    for t in range(4):
        assert again.send(frame(100 + t), make_meta(t=t), timeout_ms=10_000)
    again.finish()
    it = src.frames()
    got = [int(next(it)[0][0, 0]) for _ in range(3)]
    assert got == [0, 1, 2]
    src.idle_timeout_s = 2.0  # its own end marker never comes: the stream ends idle
    assert list(it) == []  # none of the restarted stream's frames, nor its end marker
    assert src.foreign == 5
    assert any("another stream" in e for e in src.errors)


def test_frames_outside_the_plan_are_skipped_and_gaps_counted_as_lost(
    sockets: contextlib.ExitStack,
) -> None:
    info = StreamInfo(frame_shape=(8, 12), n_t=10, channel_names=("a", "b"), n_z=2)
    pub = FramePublisher("tcp://127.0.0.1:*", stream=info.to_json())
    sockets.enter_context(contextlib.closing(pub))
    src = connect_source(pub, sockets)
    sends = [
        (1, make_meta(t=1)),
        (2, make_meta(t=1, c=2)),  # no third channel: malformed, the run goes on
        (3, make_meta(t=1, z=7)),
        (4, make_meta(t=10)),  # past the plan's 10 time points
        (5, make_meta(t=2, c=1, z=1)),
    ]
    for value, meta in sends:
        assert pub.send(frame(value), meta, timeout_ms=10_000)
    pub.sent += 3  # three frames the publisher counted that never reach the wire
    assert pub.send(frame(6), make_meta(t=3), timeout_ms=10_000)
    pub.sent += 2  # and two more just before the end
    pub.finish()
    assert _collect(src) == [0, 1, 5, 6]
    assert src.counters()["malformed"] == 3
    assert sum("outside the plan" in e for e in src.errors) == 3
    assert src.lost == 5
    assert src.sent == pub.sent == 12
    assert src.end_seen


def test_a_vanished_publisher_ends_the_stream_with_an_error(
    sockets: contextlib.ExitStack,
) -> None:
    pub = FramePublisher("tcp://127.0.0.1:*", stream=StreamInfo(frame_shape=(8, 12)).to_json())
    src = connect_source(pub, sockets, heartbeat_s=1.0)
    it = src.frames()
    next(it)
    pub.close()  # no end marker: the connection just goes
    with pytest.raises(SourceError, match="lost the publisher"):
        next(it)


@pytest.mark.parametrize(
    ("announced", "named"),
    [
        ({"n_z": 10**9}, "n_z"),  # the store would flag 10⁹ planes per time point
        ({"n_t": 2**31}, "frames"),
        ({"channel_names": [f"c{i}" for i in range(2000)]}, "channels"),
        ({"pixel_size_um": float("nan")}, "pixel_size_um"),  # never written into a store
        ({"interval_s": float("inf")}, "interval_s"),
    ],
)
def test_a_stream_announcing_an_impossible_layout_is_refused(
    sockets: contextlib.ExitStack, announced: dict[str, object], named: str
) -> None:
    stream = {**StreamInfo(frame_shape=(8, 12), n_t=10).to_json(), **announced}
    pub = FramePublisher("tcp://127.0.0.1:*", stream=stream)
    sockets.enter_context(contextlib.closing(pub))
    with pytest.raises(SourceError, match=f"announces .*{named}"):
        connect_source(pub, sockets)


def test_an_open_ended_stream_skips_frames_far_past_its_last_time_point(
    sockets: contextlib.ExitStack, tmp_path: Path
) -> None:
    """t = 2³¹−1 or 10¹² in an open-ended stream: skipped, counted, and the store stays
    one that `inspect` opens (before: a 16 GiB flag array, or an int32 overflow)."""
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import ZarrSink, inspect_run

    pub = FramePublisher("tcp://127.0.0.1:*", stream=StreamInfo(frame_shape=(8, 12)).to_json())
    sockets.enter_context(contextlib.closing(pub))
    src = connect_source(pub, sockets)
    for value, t in ((1, 2**31 - 1), (2, 10**12), (3, 1), (4, 4097 + 1)):
        assert pub.send(frame(value), make_meta(t=t), timeout_ms=10_000)
    pub.finish()
    sink = ZarrSink(tmp_path / "rx.ome.zarr", src.info)
    s = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=8).run(timeout=60)
    assert s["status"] == "complete", s
    assert src.counters()["malformed"] == 3
    assert sum("open-ended" in e for e in src.errors) == 3
    report = inspect_run(tmp_path / "rx.ome.zarr")
    assert report.frames_complete == 2


def test_a_restarted_publisher_ends_the_old_stream_failed_not_open(
    free_port: int, sockets: contextlib.ExitStack
) -> None:
    """Only the restarted stream's frames for a heartbeat: the run ends with an error
    (before: refused one by one while the run stayed open for ever)."""
    address = f"tcp://127.0.0.1:{free_port}"
    info = StreamInfo(frame_shape=(8, 12), n_t=1000)
    first = FramePublisher(address, stream=info.to_json())
    src = connect_source(first, sockets, address, heartbeat_s=1.0)
    assert first.send(frame(1), make_meta(t=1), timeout_ms=10_000)
    first.close()
    again = rebind(address, info)
    sockets.enter_context(contextlib.closing(again))
    done = threading.Event()

    def restarted() -> None:  # the restarted publisher streams on, t from 0 again
        t = 0
        while not done.is_set() and t < 3000:
            again.send(frame(100 + t % 100), make_meta(t=t % 1000), timeout_ms=100)
            t += 1
            time.sleep(0.005)

    sender = threading.Thread(target=restarted)
    sender.start()
    got: list[int] = []
    try:
        with pytest.raises(SourceError, match="another stream took over"):
            got.extend(int(data[0, 0]) for data, _ in src.frames())
    finally:
        done.set()
        sender.join()
    assert got == [0, 1]  # none of the restarted stream's frames
    assert src.foreign >= 1
