"""`StreamRunner`: source → ring buffer → recorder and stages, each on its own thread.

::

    IDLE ──start()──> RUNNING ──source done / stop()──> STOPPING ──drained──> FINISHED
                         │                                  │
                         └──────── error anywhere ──────────┴────────────────> FAILED

The acquisition callback only hands the frame to the ring buffer and returns.
The `Recorder` reads every frame losslessly (zero copy when the ring adopts
frames); each `Stage` is fed what its `InputContract` declares: ``latest``
(the newest frame, may skip), ``every`` (every frame; what left the ring is read
back from the recording with its real metadata), ``complete_stack(n)`` and
``window(k)`` (assembled here, complete ones only; the rest counted).

An error in any stage (a frame of the wrong shape, a stage that cannot write, a
lossless consumer that was lapped) stops the source, lets the others finish what
is buffered, closes every stage and then the recorder with status ``failed`` and
the reason, and ends in ``FAILED``. A run stopped before its plan ended (`stop`)
ends ``stopped``; the frames it acquired are all written.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from scopestream.streaming.assembler import StackAssembler
from scopestream.streaming.frame import Frame
from scopestream.streaming.metrics import DurationStats, StageMetrics
from scopestream.streaming.ringbuffer import (
    BufferOverrun,
    Consumer,
    FrameLapped,
    FrameShapeError,
    OverflowPolicy,
    RingBuffer,
)
from scopestream.streaming.seams import (
    Display,
    InputContract,
    PausableSource,
    PlannedSource,
    Recorder,
    Stage,
)
from scopestream.streaming.signals import (
    FrameEvent,
    RunResult,
    RunSignals,
    RunState,
    listener_error,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.seams import FrameSource
    from scopestream.streaming.sinks import FrameSink

__all__ = ["InvalidTransition", "RunState", "RunStatus", "SinkSpec", "StreamRunner"]


#: GIL switch interval while running (CPython's default is 5 ms)
GIL_SWITCH_INTERVAL_S = 0.0005


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
    """A stage (or the recorder), its name, and what it is fed.

    ``records=True`` marks the run's recording: a `Recorder` (the zarr store),
    or another lossless sink (the network publisher) when the run records
    nothing locally. Otherwise the stage's ``contract`` attribute says what it
    is fed; stages without one are fed by ``policy`` (``latest``, or every
    frame for ``all``/``spill``).
    """

    name: str
    sink: FrameSink
    policy: OverflowPolicy | None = None
    records: bool = False

    def contract(self) -> InputContract:
        """What this stage is fed (a `Stage` says so itself; a ``policy`` must agree)."""
        if isinstance(self.sink, Stage):
            declared = self.sink.contract
            latest = declared.kind == "latest"
            if self.policy is not None and (self.policy is OverflowPolicy.LATEST) != latest:
                raise ValueError(
                    f"stage {self.name!r} declares {declared.describe()}, "
                    f"but its spec asks for {self.policy.value!r}"
                )
            return declared
        if self.policy is OverflowPolicy.LATEST:
            return InputContract.latest()
        return InputContract.every()


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

    def __init__(
        self,
        source: FrameSource,
        sinks: Sequence[SinkSpec],
        *,
        buffer_mb: float = 512.0,
        max_frames: int | None = None,
        out: str | None = None,
        events: RunSignals | None = None,
    ) -> None:
        self.source = source
        self.sinks = list(sinks)
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        recorders = [s for s in self.sinks if s.records]
        if len(recorders) > 1:
            raise ValueError(f"a run has one recording, got {[s.name for s in recorders]}")
        self._rec_spec = recorders[0] if recorders else None
        rec = self._rec_spec.sink if self._rec_spec is not None else None
        #: the run's store, if it is a `Recorder` (frames that left the ring are read from it)
        self.recorder: Recorder | None = rec if isinstance(rec, Recorder) else None
        self.contracts = {
            s.name: s.contract() for s in self.sinks if s is not self._rec_spec
        }
        #: the signals of this run (`RunSignals`)
        self.events = events or RunSignals()
        self.stateChanged = self.events.stateChanged
        self.frameReady = self.events.frameReady
        self.frameDropped = self.events.frameDropped
        self.runFinished = self.events.runFinished
        self.pausedChanged = self.events.pausedChanged
        info = source.info
        # sources that hand over fresh frames are adopted, not copied (see RingBuffer)
        adopt = bool(source.hands_over_frames)
        self.ring = RingBuffer.for_memory(
            info.frame_shape, info.dtype, budget_mb=buffer_mb, adopt=adopt
        )
        self.max_frames = max_frames
        self.out = out
        self.callback_time = DurationStats()  # wall time of the acquisition callback
        self.callback_cpu = DurationStats()  # its thread CPU time (waits for cores excluded)
        self.acquired = StageMetrics("acquire")
        self.stage_metrics = {s.name: StageMetrics(s.name) for s in self.sinks}
        self._consumers = {
            s.name: self.ring.subscribe(s.name, self._policy(s)) for s in self.sinks
        }
        self._threads: list[threading.Thread] = []
        self._supervisor: threading.Thread | None = None
        self._state = RunState.IDLE
        self._state_lock = threading.Lock()
        self._errors: list[str] = []
        self._stop_requested = threading.Event()
        self._user_stopped = False  # stop() before the plan ended: the run is 'stopped'
        self._finished = threading.Event()
        #: per stage: frames or stacks it could not be fed (incomplete stacks, gaps), by reason
        self.not_fed: dict[str, dict[str, int]] = {}
        #: exceptions raised by signal listeners (counted; the run goes on)
        self.listener_errors = 0
        self.last_listener_error: str | None = None
        #: called before the recording is closed; what they return goes into the summary
        #: (and so into the run's attributes), e.g. the per-model section of a Pipeline
        self.summary_hooks: list[Callable[[], dict[str, Any]]] = []
        self._t0 = 0.0
        self._t_end: float | None = None
        self._summary: dict[str, Any] | None = None
        self._n_acquired = 0
        self.paused = False
        self._skips: dict[str, StageMetrics] = {}  # frames each latest consumer skipped, per s
        #: frames each 'all' (spill) consumer had to read back from the recording
        self.spilled: dict[str, int] = {}
        self._switch_interval = sys.getswitchinterval()

    def _emit(self, signal: Any, *args: Any) -> None:
        """Emit a signal; a listener that raises is counted, never fatal to the run."""
        try:
            signal.emit(*args)
        except Exception as e:
            self.listener_errors += 1
            self.last_listener_error = listener_error(e)

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
        self._emit(self.stateChanged, new)

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
        exp = (
            self.source.frames_planned
            if isinstance(self.source, PlannedSource)
            else self.source.info.expected_frames
        )
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
        """Stop acquiring; what is in the buffer is still written.

        A run stopped before its plan ended is recorded as ``stopped`` (frames
        expected vs acquired in the summary), never as ``complete``.
        """
        if not self._stop_requested.is_set() and self._state in (RunState.IDLE, RunState.RUNNING):
            self._user_stopped = True
        self._stop_requested.set()
        self._to_stopping()
        self.source.stop()

    @property
    def can_pause(self) -> bool:
        """Whether the source can hold its next frame."""
        return isinstance(self.source, PausableSource)

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume the source (between frames); False if it cannot pause."""
        if not isinstance(self.source, PausableSource) or self._state is not RunState.RUNNING:
            return False
        self.source.set_paused(paused)
        self.paused = paused
        self._emit(self.pausedChanged, paused)
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
        if self.recorder is not None and self._rec_spec is not None:
            stages[f"{self._rec_spec.name}:disk"] = self.recorder.metrics.timeline(origin)
        skips = {}
        for name, per in self._skips.items():
            tl = per.timeline(origin)
            skips[name] = {"bucket_s": tl["bucket_s"], "t_s": tl["t_s"], "frames": tl["frames"]}
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
                self._stop_requested.set()  # the cap was reached: not a user stop
                self.source.stop()

    def _policy(self, spec: SinkSpec) -> OverflowPolicy:
        """The ring-buffer policy that gives a stage what its contract says."""
        if spec is self._rec_spec:
            return OverflowPolicy.ALL
        contract = spec.contract()
        if contract.kind == "latest":
            return OverflowPolicy.LATEST
        # every frame: read back from the recording when it left the ring; without a
        # recording the stage is lossless itself (it fails the run loudly if lapped)
        return OverflowPolicy.SPILL if self.recorder is not None else OverflowPolicy.ALL

    def _consume(self, spec: SinkSpec) -> None:
        consumer = self._consumers[spec.name]
        try:
            if spec is self._rec_spec and self.recorder is not None and self.ring.adopt:
                # zero copy only when the slot's memory is never written again (adopted
                # frames); a copying ring reuses slot memory the writer may still read
                self._consume_deferred(spec, self.recorder, consumer)
            elif consumer.policy is OverflowPolicy.LATEST:
                self._consume_latest(spec, consumer)
            elif spec.contract().stacked and spec is not self._rec_spec:
                self._consume_stacks(spec, consumer)
            elif consumer.policy is OverflowPolicy.SPILL:
                self._consume_spill(spec, consumer)
            else:
                self._consume_all(spec, consumer)
        except BufferOverrun as e:
            if str(e) not in self._errors:
                self.fail(str(e))
        except Exception as e:
            reason = f"sink {spec.name!r}: {e}"
            self._emit(self.events.stageFailed, spec.name, str(e))
            self.fail(reason)
        finally:
            if self._errors:
                # a failed stage must not block the producer's space check
                self.ring.unsubscribe(consumer)

    def _drained(self, consumer: Consumer) -> bool:
        return self.ring.closed and self.ring.frames_written <= consumer._next

    def _done(self, spec: SinkSpec, meta: FrameMeta) -> None:
        self.stage_metrics[spec.name].record(meta["timestamp_ns"])
        self._emit(self.frameReady, spec.name, FrameEvent.of(meta))

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
        """Lossless, copying consumer: write, then release the slot."""
        for frame in self._frames(consumer):
            assert isinstance(frame, Frame)  # a lossless consumer is never lapped
            meta = cast("FrameMeta", dict(frame.meta))
            try:
                spec.sink.write(frame.data, meta)
            finally:
                consumer.release(frame)
            self._done(spec, meta)

    def _consume_deferred(self, spec: SinkSpec, sink: Recorder, consumer: Consumer) -> None:
        """The recording, zero copy: the slot is released only once the frame is committed."""
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

    def _every(self, spec: SinkSpec, consumer: Consumer) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Every frame in order, each valid until the next: copied out of the ring, or read
        back from the recording (pixels and their persisted metadata) when it left the ring."""
        recorder = self.recorder
        scratch: np.ndarray | None = None
        spilled = 0
        for item in self._frames(consumer):
            lap = item if isinstance(item, FrameLapped) else None
            if lap is None:
                assert isinstance(item, Frame)
                if consumer.policy is OverflowPolicy.ALL:  # no recording: lossless, in place
                    meta = cast("FrameMeta", dict(item.meta))
                    try:
                        yield item.data, meta
                    finally:
                        consumer.release(item)
                    continue
                try:
                    scratch, meta, _ = self._copy_out(consumer, item, scratch)
                except FrameLapped as torn:  # overwritten while copying
                    lap = torn
                else:
                    yield scratch, meta
                    continue
            if recorder is None:
                raise RuntimeError(
                    f"stage {spec.name!r} missed frame {lap.seq} and there is no recording "
                    "to read it from"
                )
            found = recorder.frame_meta(lap.seq)
            if found is None:
                raise RuntimeError(f"frame {lap.seq} left the ring buffer and is not recorded")
            data = recorder.read_frame(found["t"], found["c"], found["z"], found["p"])
            spilled += 1
            self.spilled[spec.name] = spilled
            yield data, found

    def _consume_spill(self, spec: SinkSpec, consumer: Consumer) -> None:
        """Every frame in order; frames that left the ring are read back from the recording."""
        for data, meta in self._every(spec, consumer):
            spec.sink.write(data, meta)
            self._done(spec, meta)

    def _consume_stacks(self, spec: SinkSpec, consumer: Consumer) -> None:
        """Every frame, assembled into complete z-stacks or gap-free windows (see the contract);
        incomplete ones are counted and never handed over."""
        contract = spec.contract()
        info = self.source.info
        mode: Literal["z", "t"] = "z" if contract.kind == "complete_stack" else "t"
        asm = StackAssembler(
            info.frame_shape, info.dtype, mode=mode, size=contract.size, max_open=4
        )
        stage = spec.sink
        assert isinstance(stage, Stage)  # only a Stage declares a stack contract

        def hand_over(stacks: list[Any]) -> None:
            for st in stacks:
                if not st.complete:
                    why = (
                        f"incomplete z-stack (planes {list(st.missing)} never acquired)"
                        if mode == "z"
                        else "window with a gap or shorter than its size"
                    )
                    per = self.not_fed.setdefault(spec.name, {})
                    key = "incomplete_stacks" if mode == "z" else "incomplete_windows"
                    per[key] = per.get(key, 0) + 1
                    self._emit(self.frameDropped, spec.name, 1, why)
                    continue
                stage.write_stack(st)
                for m in st.metas:  # latency at the moment the prediction is written
                    if m is not None and (mode == "z" or m is st.newest):
                        self._done(spec, m)

        for data, meta in self._every(spec, consumer):
            if stage.accepts_channel(meta["c"]):
                hand_over(asm.add(data, meta))
        if not self._errors:
            hand_over(asm.flush())

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
        """Display-style stage: newest frame only, copied out and validated before use.

        A stage may say it wants at most ``max_hz`` frames a second (the display):
        frames are then not even copied faster than that.
        """
        scratch: np.ndarray | None = None
        reported = 0
        max_hz = float(spec.sink.max_hz) if isinstance(spec.sink, Display) else 0.0
        period = 1.0 / max_hz if max_hz > 0 else 0.0
        for frame in self._frames(consumer):
            assert isinstance(frame, Frame)  # a latest consumer skips, it is never lapped
            t0 = time.monotonic()
            scratch, meta, intact = self._copy_out(consumer, frame, scratch)
            if intact:  # torn while copying: never shown
                spec.sink.write(scratch, meta)
                self._done(spec, meta)
            if period:  # the next look at the ring is due one period later, not sooner
                self._stop_requested.wait(max(0.0, period - (time.monotonic() - t0)))
            skipped = consumer.skipped + consumer.torn
            if skipped > reported:
                per = self._skips.get(spec.name)
                if per is None:
                    per = self._skips[spec.name] = StageMetrics(f"skipped:{spec.name}")
                per.tally(skipped - reported)
                self._emit(
                    self.frameDropped, spec.name, skipped - reported, "skipped to the newest frame"
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
        if self.recorder is not None:
            try:
                self.recorder.flush()
            except Exception as e:
                if not self._errors:  # after a failure, later write errors are echoes
                    self._errors.append(f"sink {self._rec_spec.name!r}: {e}")  # type: ignore[union-attr]
        self._t_end = time.monotonic()
        # stages first (they write into the recording), the recording last, with the final
        # status: a stage that fails to close makes the run failed, never 'complete'
        for spec in reversed(self.sinks):
            if spec is self._rec_spec:
                continue
            try:
                spec.sink.close(self._status(), "; ".join(self._errors) or None, None)
            except Exception as e:
                self._errors.append(f"closing sink {spec.name!r} failed: {e}")
        summary = {**self._build_summary(), "timeline": self.timeline()}
        for hook in self.summary_hooks:
            try:
                summary.update(hook())
            except Exception as e:  # the summary must still be written
                summary.setdefault("notes", []).append(f"summary hook failed: {e}")
        if self._rec_spec is not None:
            try:
                self._rec_spec.sink.close(self._status(), "; ".join(self._errors) or None, summary)
            except Exception as e:
                self._errors.append(f"closing sink {self._rec_spec.name!r} failed: {e}")
        final = self._build_summary()
        for key in summary:
            if key not in final and key != "timeline":
                final[key] = summary[key]
        self._summary = final
        sys.setswitchinterval(self._switch_interval)
        self._set_state(RunState.FAILED if self._errors else RunState.FINISHED)
        self._finished.set()
        self._emit(
            self.runFinished,
            RunResult(
                status=final["status"],
                frames_acquired=final["frames_acquired"],
                frames_expected=final["frames_expected"],
                frames_written=final["frames_written"],
                frames_lost=final["frames_lost"],
                error=final["error"],
                out=self.out,
            )
        )

    def _status(self) -> str:
        """``failed`` (an error), ``stopped`` (before the plan ended), else ``complete``."""
        if self._errors:
            return "failed"
        expected = self._expected()
        if self._user_stopped and (expected is None or self._n_acquired < expected):
            return "stopped"
        # a receiver of a fanned-out stream holds its share of the plan, and is complete
        # when the publisher's end marker came (`inspect A B` checks the shares add up)
        share_done = bool(getattr(self.source, "share_complete", False))
        if expected is not None and self._n_acquired < expected and not share_done:
            return "stopped"  # the source ended early without an error (e.g. a cut recording)
        return "complete"

    def _build_summary(self) -> dict[str, Any]:
        st = self.status
        acquired = st.frames_acquired
        rec = self._rec_spec
        written = acquired
        latency = {"p50": 0.0, "p99": 0.0}
        fps = self.acquired.fps()
        stages = {name: m.snapshot() for name, m in self.stage_metrics.items()}
        if self.recorder is not None and rec is not None:
            written = self.recorder.frames_committed
            latency = self.recorder.metrics.latency_ms()
            fps = self.recorder.metrics.fps() or fps
            stages[f"{rec.name}:disk"] = self.recorder.metrics.snapshot()
        elif rec is not None:
            written = self.stage_metrics[rec.name].count
            latency = self.stage_metrics[rec.name].latency_ms()
            fps = self.stage_metrics[rec.name].fps() or fps
        counters = self.source.counters()
        status = self._status()
        expected = st.frames_expected
        out: dict[str, Any] = {
            "status": status,
            "state": (RunState.FAILED if self._errors else RunState.FINISHED).value,
            "frames_acquired": acquired,
            "frames_expected": expected,
            "frames_written": written,
            # lost between acquisition and disk, plus what a remote source never received
            "frames_lost": (max(0, acquired - written) if rec is not None else 0)
            + int(counters.get("lost", 0)),
            "frames_skipped": {n: int(c["skipped"]) for n, c in st.consumers.items()},
            "frames_from_recording": dict(self.spilled),
            "not_fed": {k: dict(v) for k, v in self.not_fed.items()},
            "contracts": {n: c.describe() for n, c in self.contracts.items()},
            "malformed": int(counters.get("malformed", 0)),
            "listener_errors": self.listener_errors,
            "last_listener_error": self.last_listener_error,
            "source_counters": dict(counters),
            "fps": round(fps, 2),
            "acquire_fps": round(self.acquired.fps(), 2),
            "latency_ms": latency,
            "callback_us": self.callback_time.summary_us(),
            "callback_cpu_us": self.callback_cpu.summary_us(),
            "elapsed_s": round(st.elapsed_s, 3),
            "stages": stages,
            "buffer": {
                "slots": self.ring.n_slots,
                "mb": round(self.ring.nbytes / 2**20, 1),
                "mode": "adopt" if self.ring.adopt else "copy",
            },
            "source": self.source.describe(),
            "out": self.out,
            "error": st.error,
        }
        if status == "stopped":
            out["stopped"] = (
                f"stopped after {acquired} of {expected} frames"
                if expected is not None
                else f"stopped after {acquired} frames (open-ended)"
            )
        return out
