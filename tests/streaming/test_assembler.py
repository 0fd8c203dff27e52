from __future__ import annotations

import numpy as np
import pytest

from scopestream.streaming.assembler import StackAssembler
from scopestream.streaming.frame import make_meta

SHAPE = (4, 5)


def plane(t: int, c: int, z: int) -> np.ndarray:
    return np.full(SHAPE, 100 * t + 10 * c + z, np.uint16)


def add(asm: StackAssembler, t: int, c: int, z: int, seq: int = 0) -> list:
    meta = make_meta(t=t, c=c, z=z)
    meta["seq"] = seq
    return asm.add(plane(t, c, z), meta)


def test_z_stacks_complete_in_z_order_whatever_the_arrival_order() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="z", size=3)
    assert add(asm, 0, 0, 2) == []
    assert add(asm, 0, 0, 0) == []
    (stack,) = add(asm, 0, 0, 1)
    assert stack.key == (0, 0, 0)
    assert stack.complete
    assert [int(p[0, 0]) for p in stack.data] == [0, 1, 2]
    assert asm.counters()["open"] == 0


def test_interleaved_channels_make_separate_stacks() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="z", size=2)
    out = []
    for z in range(2):
        for c in range(2):
            out += add(asm, 0, c, z)
    assert [s.key for s in out] == [(0, 0, 0), (0, 0, 1)]
    assert [int(s.data[1, 0, 0]) for s in out] == [1, 11]


def test_incomplete_stack_is_flushed_and_reported_when_acquisition_stops() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="z", size=4)
    add(asm, 5, 0, 0)
    add(asm, 5, 0, 1)
    (stack,) = asm.flush()
    assert not stack.complete
    assert stack.missing == (2, 3)
    assert int(stack.data[1, 0, 0]) == 501
    assert asm.counters()["incomplete"] == 1


def test_open_stacks_are_bounded_oldest_is_emitted_not_lost() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="z", size=3, max_open=2)
    add(asm, 0, 0, 0)
    add(asm, 1, 0, 0)
    out = add(asm, 2, 0, 0)  # a third open stack evicts t=0
    assert [s.key for s in out] == [(0, 0, 0)]
    assert out[0].missing == (1, 2)
    assert asm.counters()["evicted"] == 1
    assert asm.counters()["open"] == 2


def test_repeated_plane_closes_the_previous_stack() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="z", size=3)
    add(asm, 0, 0, 0)
    add(asm, 0, 0, 1)
    out = add(asm, 0, 0, 0)
    assert len(out) == 1
    assert out[0].missing == (2,)


def test_plane_outside_the_stack_is_refused() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="z", size=2)
    with pytest.raises(ValueError, match="z=5"):
        add(asm, 0, 0, 5)
    with pytest.raises(ValueError, match="shape"):
        asm.add(np.zeros((2, 2), np.uint16), make_meta())


def test_temporal_windows_are_causal_and_padded_at_start() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="t", size=3)
    windows = [add(asm, t, 0, 0, seq=t)[0] for t in range(5)]
    assert [int(w.data[-1, 0, 0]) for w in windows] == [0, 100, 200, 300, 400]
    assert [w.padded for w in windows] == [2, 1, 0, 0, 0]
    assert [int(p[0, 0]) for p in windows[1].data] == [0, 0, 100]
    assert [int(p[0, 0]) for p in windows[4].data] == [200, 300, 400]
    assert windows[4].complete
    assert windows[4].newest["t"] == 4


def test_temporal_windows_per_channel() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="t", size=2)
    seq = 0
    last = {}
    for t in range(3):
        for c in range(2):
            (w,) = add(asm, t, c, 0, seq=seq)
            seq += 1
            last[c] = w
    assert [int(p[0, 0]) for p in last[0].data] == [100, 200]
    assert [int(p[0, 0]) for p in last[1].data] == [110, 210]


def test_stack_owns_its_data() -> None:
    asm = StackAssembler(SHAPE, "uint16", mode="t", size=2)
    (w1,) = add(asm, 0, 0, 0)
    (w2,) = add(asm, 1, 0, 0)
    (w3,) = add(asm, 2, 0, 0)
    assert int(w1.data[-1, 0, 0]) == 0
    assert int(w2.data[-1, 0, 0]) == 100
    assert int(w3.data[0, 0, 0]) == 100
