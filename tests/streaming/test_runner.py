from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from scopestream.acquisition.base import ThreadedSource
from scopestream.acquisition.replay import ArraySource
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.ringbuffer import OverflowPolicy
from scopestream.streaming.runner import (
    InvalidTransition,
    RunState,
    RunStatus,
    SinkSpec,
    StreamRunner,
)
from scopestream.streaming.zarr_sink import ZarrSink, complete_frames, inspect_run

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from scopestream.streaming.frame import FrameMeta


def frames(n: int = 4, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.stack([np.full(shape, i + 1, np.uint16) for i in range(n)])


class ListSink:
    """A sink that keeps what it gets (copies), optionally slow or failing after k frames."""

    def __init__(self, delay_s: float = 0.0, fail_after: int | None = None) -> None:
        self.got: list[tuple[int, np.ndarray]] = []
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.closed_with: tuple[str, str | None] | None = None

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        if self.fail_after is not None and len(self.got) >= self.fail_after:
            raise OSError(28, "No space left on device")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.got.append((meta["seq"], data.copy()))

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        self.closed_with = (status, error)


class ShapeChangingSource(ThreadedSource):
    """A camera whose ROI changes mid-run."""

    kind = "roi-change"

    def __init__(self) -> None:
        super().__init__()
        self.info = StreamInfo(frame_shape=(16, 16), n_t=10)

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        for t in range(10):
            shape = (16, 16) if t < 5 else (8, 8)
            yield np.full(shape, t + 1, np.uint16), make_meta(t=t)


def test_state_machine_and_signals(tmp_path: Path) -> None:
    src = ArraySource(frames(), 20)
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=1)
    states: list[RunState] = []
    ready: list[int] = []
    finished: list[dict[str, Any]] = []
    runner.stateChanged.connect(states.append)
    runner.frameReady.connect(lambda name, ev: ready.append(ev.seq))
    runner.runFinished.connect(finished.append)
    assert runner.state is RunState.IDLE
    summary = runner.run(timeout=30)
    assert states == [RunState.RUNNING, RunState.STOPPING, RunState.FINISHED]
    assert ready == list(range(20))
    assert len(finished) == 1
    assert finished[0].status == summary["status"] == "complete"
    assert finished[0].frames_written == 20
    assert summary["frames_acquired"] == summary["frames_written"] == 20
    assert summary["frames_lost"] == 0
    for key in ("frames_skipped", "malformed", "fps", "latency_ms", "out", "callback_us"):
        assert key in summary
    assert set(summary["latency_ms"]) == {"p50", "p99"}
    assert runner.status.state is RunState.FINISHED
    with pytest.raises(InvalidTransition):
        runner.start()


def test_a_listener_that_raises_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    src = ArraySource(frames(), 12)
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=1)

    def bad(name: str, event: Any) -> None:
        raise ValueError(f"listener bug at frame {event.seq}")

    runner.frameReady.connect(bad)
    summary = runner.run(timeout=30)
    assert summary["status"] == "complete"
    assert summary["frames_written"] == 12
    assert summary["listener_errors"] == 12
    assert summary["last_listener_error"] == "ValueError: listener bug at frame 11"


def test_stop_mid_run_writes_everything_acquired(tmp_path: Path) -> None:
    src = ArraySource(frames(), 100_000, fps=500)
    sink = ZarrSink(tmp_path / "r.ome.zarr", StreamInfo(frame_shape=(32, 32), n_t=None))
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=4)
    written: list[int] = []
    some_written = threading.Event()

    def on_ready(name: str, event: object) -> None:
        written.append(1)
        if len(written) >= 10:
            some_written.set()

    runner.frameReady.connect(on_ready)
    runner.start()
    assert some_written.wait(60), "no frames were written"
    runner.stop()
    assert runner.wait(30)
    s = runner.summary
    assert s is not None and s["status"] == "stopped"  # never 'complete' for a cut run
    assert 0 < s["frames_acquired"] < 100_000
    assert s["frames_written"] == s["frames_acquired"]
    report = inspect_run(tmp_path / "r.ome.zarr")
    assert report.frames_complete == s["frames_acquired"]
    assert report.status == "stopped"


def test_wrong_shape_frame_fails_the_run_and_keeps_earlier_frames(tmp_path: Path) -> None:
    src = ShapeChangingSource()
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=1)
    s = runner.run(timeout=30)
    assert runner.state is RunState.FAILED
    assert s["status"] == "failed"
    assert "frame 5 has shape (8, 8)" in s["error"]
    assert s["frames_written"] == 5
    report = inspect_run(tmp_path / "r.ome.zarr")
    assert report.status == "failed" and report.frames_complete == 5
    assert "frame 5" in (report.error or "")


def test_lossless_sink_that_falls_behind_fails_loudly(tmp_path: Path) -> None:
    # a camera at 1000 fps (not pacable) into a 4-slot buffer with a 20 ms sink
    src = ArraySource(frames(4, (256, 256)), 200, fps=1000)
    slow = ListSink(delay_s=0.02)
    runner = StreamRunner(src, [SinkSpec("slow", slow, records=True)], buffer_mb=0.5)
    assert runner.ring.n_slots == 4
    s = runner.run(timeout=30)
    assert s["status"] == "failed"
    assert "consumer 'slow' fell 4 frames behind: frame" in s["error"]
    assert "could not be buffered" in s["error"]
    assert slow.closed_with is not None and slow.closed_with[0] == "failed"
    seqs = [q for q, _ in slow.got]
    assert seqs == list(range(len(seqs)))  # no gap in what was handled
    for seq, data in slow.got:  # and nothing torn
        assert (data == (seq % 4) + 1).all()
    assert s["frames_lost"] == s["frames_acquired"] - len(seqs) > 0


def test_live_sink_skips_while_recording_is_lossless(tmp_path: Path) -> None:
    src = ArraySource(frames(8), 300, fps=600)
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    live = ListSink(delay_s=0.02)
    runner = StreamRunner(
        src,
        [SinkSpec("zarr", sink, records=True), SinkSpec("view", live, OverflowPolicy.LATEST)],
        buffer_mb=8,
    )
    dropped: list[int] = []
    runner.frameDropped.connect(lambda name, n, why: dropped.append(n) if name == "view" else None)
    s = runner.run(timeout=60)
    assert s["status"] == "complete"
    assert s["frames_written"] == 300
    assert s["frames_skipped"]["zarr"] == 0
    assert s["frames_skipped"]["view"] > 0
    assert sum(dropped) == s["frames_skipped"]["view"]
    assert len(live.got) + s["frames_skipped"]["view"] == 300
    for seq, data in live.got:  # never a torn frame on display
        assert (data == (seq % 8) + 1).all()
    assert complete_frames(tmp_path / "r.ome.zarr").all()


def test_failing_sink_stops_the_run_and_closes_the_others(tmp_path: Path) -> None:
    src = ArraySource(frames(), 50)
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    disk = ListSink(fail_after=10)
    runner = StreamRunner(
        src, [SinkSpec("zarr", sink, records=True), SinkSpec("backup", disk)], buffer_mb=1
    )
    s = runner.run(timeout=30)
    assert s["status"] == "failed"
    assert "sink 'backup'" in s["error"] and "No space left" in s["error"]
    assert disk.closed_with is not None and disk.closed_with[0] == "failed"
    report = inspect_run(tmp_path / "r.ome.zarr")
    assert report.status == "failed"
    assert report.frames_complete == s["frames_written"] >= 10


def test_max_frames_stops_an_endless_source(tmp_path: Path) -> None:
    src = ArraySource(frames(), 10**9)
    got = ListSink()
    s = StreamRunner(src, [SinkSpec("l", got, records=True)], max_frames=25, buffer_mb=1).run(
        timeout=30
    )
    assert s["status"] == "complete"
    assert s["frames_acquired"] == 25 and len(got.got) == 25


class HeldSink(ListSink):
    """A lossless sink that stops at frame ``hold_at`` until ``release`` is set."""

    def __init__(self, hold_at: int) -> None:
        super().__init__()
        self.hold_at = hold_at
        self.holding = threading.Event()
        self.release = threading.Event()

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        if len(self.got) == self.hold_at:
            self.holding.set()
            assert self.release.wait(60), "the test never released the sink"
        super().write(data, meta)


def test_status_is_a_frozen_snapshot_taken_from_any_thread(tmp_path: Path) -> None:
    n = 2000  # more frames than the 2 MB ring holds: the held sink stalls the source
    src = ArraySource(frames(), n)
    sink = HeldSink(hold_at=10)
    runner = StreamRunner(src, [SinkSpec("l", sink, records=True)], buffer_mb=2)
    assert runner.ring.n_slots < n
    runner.start()
    try:
        assert sink.holding.wait(60)
        snaps: list[RunStatus] = []
        reader = threading.Thread(target=lambda: snaps.append(runner.status))
        reader.start()
        reader.join(30)
        [mid] = snaps
    finally:
        sink.release.set()
    assert runner.wait(60)
    assert mid.state is RunState.RUNNING
    assert 10 <= mid.frames_acquired < n  # taken while the run was held
    assert mid.frames_expected == n
    acquired_mid = mid.frames_acquired
    end = runner.status
    assert end.state is RunState.FINISHED and end.frames_acquired == n
    # the earlier snapshot did not follow the run: it is a copy, not a view
    assert mid.state is RunState.RUNNING and mid.frames_acquired == acquired_mid
    assert mid.elapsed_s <= end.elapsed_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        mid.frames_acquired = 3  # type: ignore[misc]
