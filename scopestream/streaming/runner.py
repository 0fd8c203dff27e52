"""`StreamRunner`: source → ring buffer → one thread per sink, with a small state machine.

::

    IDLE ──start()──> RUNNING ──source done / stop()──> STOPPING ──drained──> FINISHED
                         │                                  │
                         └──────── error anywhere ──────────┴────────────────> FAILED

The acquisition callback only copies the frame into the ring buffer and returns.
Each sink reads from the buffer on its own thread with its own overflow policy
(``all`` for recording, ``latest`` for display). An error in any stage (a frame
of the wrong shape, a sink that cannot write, a lossless sink that was lapped)
stops the source, lets the other sinks finish what is buffered, closes every
sink with status ``failed`` and the reason, and ends in ``FAILED``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from psygnal import Signal

from scopestream.streaming.frame import Frame, make_meta
from scopestream.streaming.metrics import DurationStats, StageMetrics
from scopestream.streaming.ringbuffer import (
    BufferOverrun,
    Consumer,
    FrameLapped,
    FrameShapeError,
    OverflowPolicy,
    RingBuffer,
)
from scopestream.streaming.sinks import DeferredFrameSink

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from scopestream.acquisition.base import FrameSource
    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.sinks import FrameSink


#: GIL switch interval while running (CPython's default is 5 ms)
GIL_SWITCH_INTERVAL_S = 0.0005


class RunState(str, Enum):
    """States of a run."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"


_TRANSITIONS = {
    RunState.IDLE: {RunState.RUNNING, RunState.FAILED},
    RunState.RUNNING: {RunState.STOPPING, RunState.FAILED},
    RunState.STOPPING: {RunState.FINISHED, RunState.FAILED},
    RunState.FINISHED: set(),
    RunState.FAILED: set(),
}


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow."""


@dataclass(frozen=True)
class SinkSpec:
    """A sink, its name, its overflow policy, and whether it is the recording."""

    name: str
    sink: FrameSink
    policy: OverflowPolicy = OverflowPolicy.ALL
    records: bool = False


@dataclass(frozen=True)
class RunStatus:
    """Frozen snapshot of a run, safe to hand to any thread."""

    state: RunState
    frames_acquired: int
    frames_expected: int | None
    elapsed_s: float
    consumers: dict[str, dict[str, int | str]] = field(default_factory=dict)
    error: str | None = None


class StreamRunner:
    """Runs one stream: a source, a ring buffer, and sinks on their own threads.

    Parameters
    ----------
    source
        Where frames come from.
    sinks
        Where they go, each with its overflow policy.
    buffer_mb
        Memory for the ring buffer (at least 4 slots).
    max_frames
        Stop the source after this many frames (``None``: when the source ends).
    """

    stateChanged = Signal(RunState)
    #: (sink name, frame metadata) after a sink handled a frame; emitted on that sink's thread
    frameReady = Signal(str, dict)
    #: (consumer name, frames, reason) for frames a consumer passed over
    frameDropped = Signal(str, int, str)
    #: the run summary (a dict, as printed by ``--json``)
    runFinished = Signal(dict)
    #: the source was paused (True) or resumed (False)
    pausedChanged = Signal(bool)

    def __init__(
        self,
        source: FrameSource,
        sinks: Sequence[SinkSpec],
        *,
        buffer_mb: float = 512.0,
        max_frames: int | None = None,
        out: str | None = None,
    ) -> None:
        self.source = source
        self.sinks = list(sinks)
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        info = source.info
        # sources that hand over fresh frames are adopted, not copied (see RingBuffer)
        adopt = bool(getattr(source, "hands_over_frames", False))
        self.ring = RingBuffer.for_memory(
            info.frame_shape, info.dtype, budget_mb=buffer_mb, adopt=adopt
        )
        self.max_frames = max_frames
        self.out = out
        self.callback_time = DurationStats()  # wall time of the acquisition callback
        self.callback_cpu = DurationStats()  # its thread CPU time (waits for cores excluded)
        self.acquired = StageMetrics("acquire")
        self.stage_metrics = {s.name: StageMetrics(s.name) for s in self.sinks}
        self._consumers = {s.name: self.ring.subscribe(s.name, s.policy) for s in self.sinks}
        self._threads: list[threading.Thread] = []
        self._supervisor: threading.Thread | None = None
        self._state = RunState.IDLE
        self._state_lock = threading.Lock()
        self._errors: list[str] = []
        self._stop_requested = threading.Event()
        self._finished = threading.Event()
        self._t0 = 0.0
        self._t_end: float | None = None
        self._summary: dict[str, Any] | None = None
        self._n_acquired = 0
        self.paused = False
        self._skips: dict[str, dict[int, int]] = {}  # consumer -> second -> frames skipped
        #: frames each 'all' (spill) consumer had to read back from the recording
        self.spilled: dict[str, int] = {}
        self._switch_interval = sys.getswitchinterval()

    # -- state ------------------------------------------------------------
    @property
    def state(self) -> RunState:
        """Current state."""
        return self._state

    def _set_state(self, new: RunState) -> None:
        with self._state_lock:
            if new is self._state:
                return
            if new not in _TRANSITIONS[self._state]:
                raise InvalidTransition(f"{self._state.value} -> {new.value}")
            self._state = new
        self.stateChanged.emit(new)

    @property
    def status(self) -> RunStatus:
        """A frozen snapshot of progress."""
        end = self._t_end or time.monotonic()
        return RunStatus(
            state=self._state,
            frames_acquired=self._n_acquired,
            frames_expected=self._expected(),
            elapsed_s=(end - self._t0) if self._t0 else 0.0,
            consumers=self.ring.stats(),
            error="; ".join(self._errors) or None,
        )

    def _expected(self) -> int | None:
        exp = self.source.info.expected_frames
        if self.max_frames is not None:
            return self.max_frames if exp is None else min(exp, self.max_frames)
        return exp

    # -- running ----------------------------------------------------------
    def start(self) -> None:
        """Start the sinks' threads, then the source."""
        self._set_state(RunState.RUNNING)
        # the acquisition callback must not wait up to CPython's default 5 ms for the GIL
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, GIL_SWITCH_INTERVAL_S))
        self._t0 = time.monotonic()
        for spec in self.sinks:
            th = threading.Thread(
                target=self._consume, args=(spec,), name=f"sink-{spec.name}", daemon=True
            )
            th.start()
            self._threads.append(th)
        try:
            self.source.start(self._on_frame, self.ring.wait_for_space)
        except Exception as e:
            self.fail(f"the source could not start: {e}")
        self._supervisor = threading.Thread(target=self._supervise, name="runner", daemon=True)
        self._supervisor.start()

    def run(self, timeout: float | None = None) -> dict[str, Any]:
        """Start, wait until the run ends, and return the summary."""
        self.start()
        if not self.wait(timeout):
            self.stop()
            self.wait()
        assert self._summary is not None
        return self._summary

    def stop(self) -> None:
        """Stop acquiring; what is in the buffer is still written."""
        self._stop_requested.set()
        self._to_stopping()
        self.source.stop()

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume the source (between frames); False if it cannot pause."""
        fn = getattr(self.source, "set_paused", None)
        if fn is None or self._state is not RunState.RUNNING:
            return False
        fn(paused)
        self.paused = paused
        self.pausedChanged.emit(paused)
        return True

    def live_summary(self) -> dict[str, Any]:
        """The summary's numbers now (the final summary once the run ended).

        While running, frames not yet on disk are ``frames_pending``, not lost:
        only the end of the run says what was lost.
        """
        if self._summary is not None:
            return self._summary
        s = self._build_summary()
        s["state"] = "paused" if self.paused else self._state.value
        s["status"] = s["state"]
        s["frames_pending"] = s["frames_lost"]
        s["frames_lost"] = 0
        return s

    def timeline(self) -> dict[str, Any]:
        """Per-second throughput, latency and skipped frames over the run (for reports)."""
        origin = int(self._t0) if self._t0 else 0
        stages = {"acquire": self.acquired.timeline(origin)}
        for name, m in self.stage_metrics.items():
            stages[name] = m.timeline(origin)
        rec = next((s for s in self.sinks if s.records), None)
        if rec is not None and hasattr(rec.sink, "metrics"):
            stages[f"{rec.name}:disk"] = rec.sink.metrics.timeline(origin)
        skips = {
            name: {
                "t_s": [int(k - origin) for k in sorted(per)],
                "frames": [per[k] for k in sorted(per)],
            }
            for name, per in self._skips.items()
        }
        return {"bucket_s": 1, "stages": stages, "skipped": skips}

    def fail(self, reason: str) -> None:
        """Record an error and stop the run; it will end as FAILED."""
        self._errors.append(reason)
        self._stop_requested.set()
        self._to_stopping()
        self.source.stop()

    def _to_stopping(self) -> None:
        with self._state_lock:
            running = self._state is RunState.RUNNING
        if running:
            with contextlib.suppress(InvalidTransition):  # raced: already past RUNNING
                self._set_state(RunState.STOPPING)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run is FINISHED or FAILED."""
        return self._finished.wait(timeout)

    @property
    def summary(self) -> dict[str, Any] | None:
        """The final summary once the run has ended."""
        return self._summary

    def _on_frame(self, data: np.ndarray, meta: FrameMeta) -> None:
        """The acquisition callback: copy into the ring buffer and return."""
        if self._stop_requested.is_set() and self._errors:
            return
        t0 = time.perf_counter()
        c0 = time.thread_time()
        self._n_acquired += 1
        try:
            seq = self.ring.put(data, meta)
        except FrameShapeError as e:
            self.fail(str(e))
            return
        except RuntimeError:  # buffer closed under a late frame after stop
            return
        self.callback_time.add(time.perf_counter() - t0)
        self.callback_cpu.add(time.thread_time() - c0)
        self.acquired.record(meta["timestamp_ns"])
        if seq < 0:
            if not self._stop_requested.is_set():
                self.fail(str(self.ring.first_refused))
            return
        if self.max_frames is not None and self._n_acquired >= self.max_frames:
            planned = self.source.info.expected_frames
            if planned is None or planned > self.max_frames:  # else it ends by itself
                self.source.stop()

    def _consume(self, spec: SinkSpec) -> None:
        consumer = self._consumers[spec.name]
        try:
            if spec.policy is OverflowPolicy.LATEST:
                self._consume_latest(spec, consumer)
            elif spec.policy is OverflowPolicy.SPILL:
                self._consume_spill(spec, consumer)
            elif isinstance(spec.sink, DeferredFrameSink):
                self._consume_deferred(spec, spec.sink, consumer)
            else:
                self._consume_all(spec, consumer)
        except BufferOverrun as e:
            if str(e) not in self._errors:
                self.fail(str(e))
        except Exception as e:
            self.fail(f"sink {spec.name!r}: {e}")
        finally:
            if self._errors:
                # a failed stage must not block the producer's space check
                self.ring.unsubscribe(consumer)

    def _drained(self, consumer: Consumer) -> bool:
        return self.ring.closed and self.ring.frames_written <= consumer._next

    def _done(self, spec: SinkSpec, meta: FrameMeta) -> None:
        self.stage_metrics[spec.name].record(meta["timestamp_ns"])
        self.frameReady.emit(spec.name, meta)

    def _frames(self, consumer: Consumer) -> Iterator[Frame | FrameLapped]:
        """Borrowed frames until the stream is closed and drained (a lapped frame is yielded
        as its `FrameLapped` for ``spill`` consumers, which read it from the recording)."""
        while True:
            try:
                frame = consumer.get(timeout=0.1)
            except FrameLapped as lap:
                yield lap
                continue
            if frame is not None:
                yield frame
            elif self._drained(consumer):
                return

    def _consume_all(self, spec: SinkSpec, consumer: Consumer) -> None:
        """Lossless, copying sink: write, then release the slot."""
        for frame in self._frames(consumer):
            assert isinstance(frame, Frame)  # a lossless consumer is never lapped
            meta = cast("FrameMeta", dict(frame.meta))
            try:
                spec.sink.write(frame.data, meta)
            finally:
                consumer.release(frame)
            self._done(spec, meta)

    def _consume_deferred(
        self, spec: SinkSpec, sink: DeferredFrameSink, consumer: Consumer
    ) -> None:
        """Lossless, zero-copy sink: the slot is released only once the frame is written."""
        held: deque[tuple[Frame, FrameMeta]] = deque()

        def settle(block: bool) -> None:
            for _ in range(sink.collect(block)):
                frame, meta = held.popleft()
                consumer.release(frame)
                self._done(spec, meta)

        while True:
            frame = consumer.get(timeout=0.02 if held else 0.1)
            if frame is None:
                if held:
                    settle(block=self._drained(consumer))
                elif self._drained(consumer):
                    return
                continue
            meta = cast("FrameMeta", dict(frame.meta))
            sink.submit(frame.data, meta)
            held.append((frame, meta))
            settle(block=len(held) >= sink.max_outstanding)

    def _recorder(self) -> Any:
        rec = next((s.sink for s in self.sinks if s.records), None)
        if rec is None or not hasattr(rec, "read_frame"):
            raise RuntimeError(
                "an 'all' (spill) consumer needs a recording to read missed frames from"
            )
        return rec

    def _consume_spill(self, spec: SinkSpec, consumer: Consumer) -> None:
        """Every frame in order; frames that left the ring are read back from the recording."""
        recorder = self._recorder()
        scratch: np.ndarray | None = None
        spilled = 0
        for item in self._frames(consumer):
            lap = item if isinstance(item, FrameLapped) else None
            if lap is None:
                assert isinstance(item, Frame)
                try:
                    scratch, meta, _ = self._copy_out(consumer, item, scratch)
                    data = scratch
                except FrameLapped as torn:  # overwritten while copying
                    lap = torn
            if lap is not None:
                data = recorder.read_frame(lap.t, lap.c, lap.z)
                meta = make_meta(t=lap.t, c=lap.c, z=lap.z, p=lap.p, source="recording")
                meta["seq"] = lap.seq
                spilled += 1
                self.spilled[spec.name] = spilled
            spec.sink.write(data, meta)
            self._done(spec, meta)

    @staticmethod
    def _copy_out(
        consumer: Consumer, frame: Frame, scratch: np.ndarray | None
    ) -> tuple[np.ndarray, FrameMeta, bool]:
        """Copy a borrowed frame into ``scratch``, release it, and say if it was intact."""
        if scratch is None:
            scratch = np.empty_like(frame.data)
        np.copyto(scratch, frame.data)
        meta = cast("FrameMeta", dict(frame.meta))
        return scratch, meta, consumer.release(frame)

    def _consume_latest(self, spec: SinkSpec, consumer: Consumer) -> None:
        """Display-style sink: newest frame only, copied out and validated before use."""
        scratch: np.ndarray | None = None
        reported = 0
        for frame in self._frames(consumer):
            assert isinstance(frame, Frame)  # a latest consumer skips, it is never lapped
            scratch, meta, intact = self._copy_out(consumer, frame, scratch)
            if intact:  # torn while copying: never shown
                spec.sink.write(scratch, meta)
                self._done(spec, meta)
            skipped = consumer.skipped + consumer.torn
            if skipped > reported:
                sec = time.monotonic_ns() // 1_000_000_000
                per = self._skips.setdefault(spec.name, {})
                per[sec] = per.get(sec, 0) + skipped - reported
                self.frameDropped.emit(
                    spec.name, skipped - reported, "skipped to the newest frame"
                )
                reported = skipped

    def _supervise(self) -> None:
        src = self.source
        while not src.wait(0.1):
            pass
        if src.error is not None:
            self._errors.append(f"the source failed: {src.error}")
        self._to_stopping()
        self.ring.close()
        for th in self._threads:
            th.join()
        for spec in self.sinks:
            flush = getattr(spec.sink, "flush", None)
            if flush is not None:
                try:
                    flush()
                except Exception as e:
                    if not self._errors:  # after a failure, later write errors are echoes
                        self._errors.append(f"sink {spec.name!r}: {e}")
        self._t_end = time.monotonic()
        status = "failed" if self._errors else "complete"
        summary = {**self._build_summary(), "timeline": self.timeline()}
        for spec in reversed(self.sinks):  # consumers first: they write into the recording
            try:
                spec.sink.close(status, "; ".join(self._errors) or None, summary)
            except Exception as e:
                self._errors.append(f"closing sink {spec.name!r} failed: {e}")
        summary = self._build_summary()
        self._summary = summary
        sys.setswitchinterval(self._switch_interval)
        self._set_state(RunState.FAILED if self._errors else RunState.FINISHED)
        self._finished.set()
        self.runFinished.emit(summary)

    def _build_summary(self) -> dict[str, Any]:
        st = self.status
        acquired = st.frames_acquired
        rec = next((s for s in self.sinks if s.records), None)
        written = acquired
        latency = {"p50": 0.0, "p99": 0.0}
        fps = self.acquired.fps()
        if rec is not None:
            written = int(getattr(rec.sink, "frames_written", self.stage_metrics[rec.name].count))
            m = getattr(rec.sink, "metrics", self.stage_metrics[rec.name])
            latency = m.latency_ms()
            fps = m.fps() or fps
        counters = self.source.counters()
        stages = {name: m.snapshot() for name, m in self.stage_metrics.items()}
        if rec is not None and hasattr(rec.sink, "metrics"):
            stages[f"{rec.name}:disk"] = rec.sink.metrics.snapshot()
        return {
            "status": "failed" if self._errors else "complete",
            "state": (RunState.FAILED if self._errors else RunState.FINISHED).value,
            "frames_acquired": acquired,
            "frames_expected": st.frames_expected,
            "frames_written": written,
            "frames_lost": max(0, acquired - written) if rec is not None else 0,
            "frames_skipped": {n: int(c["skipped"]) for n, c in st.consumers.items()},
            "frames_from_recording": dict(self.spilled),
            "malformed": int(counters.get("malformed", 0)),
            "fps": round(fps, 2),
            "acquire_fps": round(self.acquired.fps(), 2),
            "latency_ms": latency,
            "callback_us": self.callback_time.summary_us(),
            "callback_cpu_us": self.callback_cpu.summary_us(),
            "elapsed_s": round(st.elapsed_s, 3),
            "stages": stages,
            "buffer": {"slots": self.ring.n_slots, "mb": round(self.ring.nbytes / 2**20, 1)},
            "source": self.source.describe(),
            "out": self.out,
            "error": st.error,
        }
