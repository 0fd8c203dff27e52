from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from scopestream.streaming.frame import make_meta
from scopestream.streaming.ringbuffer import (
    BufferOverrun,
    FrameShapeError,
    OverflowPolicy,
    RingBuffer,
)

SHAPE = (8, 8)


def frame(value: int) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.uint16)


def put(rb: RingBuffer, value: int) -> int:
    return rb.put(frame(value), make_meta(t=value))


def test_lossless_consumer_gets_every_frame_in_order() -> None:
    rb = RingBuffer(SHAPE, "uint16", 4)
    c = rb.subscribe("rec", "all")
    for v in range(3):
        assert put(rb, v) == v
    for v in range(3):
        f = c.get(timeout=1)
        assert f is not None
        assert f.seq == v and f.meta["t"] == v
        assert np.all(f.data == v)
        assert c.release(f)
    assert c.get(timeout=0.01) is None
    assert c.counters()["read"] == 3


def test_wrong_shape_or_dtype_is_rejected_and_buffer_untouched() -> None:
    rb = RingBuffer(SHAPE, "uint16", 4)
    c = rb.subscribe("rec")
    put(rb, 7)
    with pytest.raises(FrameShapeError, match=r"frame 1 has shape \(4, 4\)"):
        rb.put(np.zeros((4, 4), np.uint16), make_meta())
    with pytest.raises(FrameShapeError, match="dtype float32"):
        rb.put(np.zeros(SHAPE, np.float32), make_meta())
    assert rb.frames_written == 1
    f = c.get(timeout=1)
    assert f is not None and np.all(f.data == 7)


def test_latest_consumer_skips_to_newest_and_counts() -> None:
    rb = RingBuffer(SHAPE, "uint16", 8)
    live = rb.subscribe("view", OverflowPolicy.LATEST)
    for v in range(5):
        put(rb, v)
    f = live.get(timeout=1)
    assert f is not None and f.seq == 4 and np.all(f.data == 4)
    assert live.release(f)
    assert live.counters()["skipped"] == 4
    put(rb, 5)
    f = live.get(timeout=1)
    assert f is not None and f.seq == 5
    live.release(f)
    assert live.counters()["skipped"] == 4


def test_lossless_overrun_fails_loudly_with_the_frame_number() -> None:
    rb = RingBuffer(SHAPE, "uint16", 4)
    c = rb.subscribe("zarr", "all")
    for v in range(4):
        put(rb, v)
    f = c.get(timeout=1)
    assert f is not None
    c.release(f)  # frame 0 handled; frames 1..3 pending, one free slot
    assert put(rb, 4) == 4  # fills the free slot: still fine
    # would overwrite frame 1, never handled: refused at once. Nothing in this test ever
    # releases a frame, so a put that waited for the consumer would never return.
    result: list[int] = []
    producer = threading.Thread(target=lambda: result.append(put(rb, 5)), daemon=True)
    producer.start()
    producer.join(timeout=30)
    assert not producer.is_alive(), "put waited for a consumer: the producer must never wait"
    assert result == [-1]
    assert rb.refused == 1
    # the consumer still gets every intact frame it has not handled ...
    for v in (1, 2, 3, 4):
        f = c.get(timeout=1)
        assert f is not None and f.seq == v and np.all(f.data == v)
        assert c.release(f)
    # ... then the refused frame is reported by number
    with pytest.raises(BufferOverrun, match="frame 5 could not be buffered") as exc:
        c.get(timeout=1)
    assert exc.value.seq == 5 and exc.value.consumer == "zarr"


def test_lossless_slot_is_never_overwritten_while_borrowed() -> None:
    rb = RingBuffer(SHAPE, "uint16", 2)
    rec = rb.subscribe("rec", "all")
    put(rb, 0)
    f = rec.get(timeout=1)
    assert f is not None
    put(rb, 1)
    assert put(rb, 2) == -1  # slot 0 is still borrowed by the lossless consumer
    assert np.all(f.data == 0)  # what it holds is intact
    assert rec.release(f)


def test_latest_consumer_detects_a_torn_slot() -> None:
    rb = RingBuffer(SHAPE, "uint16", 2)
    live = rb.subscribe("view", "latest")
    put(rb, 0)
    g = live.get(timeout=1)
    assert g is not None
    put(rb, 1)
    put(rb, 2)  # nobody lossless: the producer overwrites slot 0 under the display
    assert live.release(g) is False  # torn: the display must discard it
    assert live.counters()["skipped"] == 1


def test_consumers_have_independent_cursors() -> None:
    rb = RingBuffer(SHAPE, "uint16", 8)
    a = rb.subscribe("a", "all")
    b = rb.subscribe("b", "all")
    for v in range(3):
        put(rb, v)
    fa = a.get(timeout=1)
    assert fa is not None
    a.release(fa)
    seen = []
    while (fb := b.get(timeout=0.01)) is not None:
        seen.append(fb.seq)
        b.release(fb)
    assert seen == [0, 1, 2]
    assert rb.lag() == 2  # `a` is still two frames behind


def test_close_drains_then_returns_none() -> None:
    rb = RingBuffer(SHAPE, "uint16", 4)
    c = rb.subscribe("rec")
    put(rb, 1)
    put(rb, 2)
    rb.close()
    got = []
    while (f := c.get(timeout=1)) is not None:
        got.append(int(f.data[0, 0]))
        c.release(f)
    assert got == [1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        put(rb, 3)


def test_wait_for_space_blocks_until_a_lossless_consumer_releases() -> None:
    rb = RingBuffer(SHAPE, "uint16", 2)
    c = rb.subscribe("rec")
    put(rb, 0)
    put(rb, 1)
    assert rb.wait_for_space(timeout=0.05) is False
    f = c.get(timeout=1)
    assert f is not None
    threading.Timer(0.05, c.release, args=(f,)).start()
    assert rb.wait_for_space(timeout=30) is True


def test_sizing_by_memory_budget() -> None:
    rb = RingBuffer.for_memory((512, 512), "uint16", budget_mb=4)
    assert rb.n_slots == 8
    assert rb.nbytes == 8 * 512 * 512 * 2
    assert RingBuffer.for_memory((2048, 2048), "uint16", budget_mb=1).n_slots == 4
    with pytest.raises(ValueError, match="at least 2 slots"):
        RingBuffer(SHAPE, "uint16", 1)


def test_threaded_stream_is_lossless_and_never_torn() -> None:
    """A producer at full speed; a lossless and a live consumer check every pixel."""
    n = 3000
    rb = RingBuffer((64, 64), "uint16", 512)
    rec = rb.subscribe("rec", "all")
    live = rb.subscribe("live", "latest")
    rec_seen: list[int] = []
    live_bad: list[int] = []
    live_seen = [0]

    def run_rec() -> None:
        while (f := rec.get(timeout=60)) is not None:  # None only once closed and drained
            v = int(f.data[0, 0])
            if not np.all(f.data == v) or v != f.seq % 65536:
                rec_seen.append(-1)
            rec_seen.append(f.seq)
            rec.release(f)

    def run_live() -> None:
        scratch = np.empty((64, 64), np.uint16)
        while (f := live.get(timeout=60)) is not None:
            np.copyto(scratch, f.data)
            seq = f.seq
            if live.release(f):
                live_seen[0] += 1
                if not np.all(scratch == seq % 65536):
                    live_bad.append(seq)
            time.sleep(0.001)

    threads = [threading.Thread(target=run_rec), threading.Thread(target=run_live)]
    for t in threads:
        t.start()
    for i in range(n):
        while not rb.wait_for_space(0.1):
            pass
        rb.put(np.full((64, 64), i % 65536, np.uint16), make_meta(t=i))
    rb.close()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert rec_seen == list(range(n))
    assert live_bad == []
    assert 0 < live_seen[0] <= n
    assert live.counters()["skipped"] + live_seen[0] == n
