"""What a run tells its listeners: typed psygnal signals on a signaler of their own.

`RunSignals` is the one object a notebook, the napari dock or a test connects to
(``pipeline.events.frameReady.connect(...)``). Every signal carries typed,
immutable arguments (frozen dataclasses, enums, strings, ints), never dicts.
Signals are emitted on the thread where the event happened (a stage's
thread, the acquisition thread, the supervisor): GUI code must queue to its own
thread, as napari's ``thread_worker`` and Qt connections do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from psygnal import Signal

if TYPE_CHECKING:
    from scopestream.streaming.frame import FrameMeta


class RunState(str, Enum):
    """States of a run."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class FrameEvent:
    """Which frame an event is about (its place in the stream and in the plan)."""

    seq: int
    t: int
    c: int
    z: int
    p: int
    timestamp_ns: int

    @classmethod
    def of(cls, meta: FrameMeta) -> FrameEvent:
        """The event for a frame's metadata."""
        return cls(
            meta["seq"], meta["t"], meta["c"], meta["z"], meta["p"], meta["timestamp_ns"]
        )


@dataclass(frozen=True)
class ModelVersion:
    """A model version that runs (or was refused) in a stage."""

    model: str
    version: int
    sha256: str
    backend: str = ""


@dataclass(frozen=True)
class RunResult:
    """How a run ended (the full summary is `Pipeline.summary` / ``--json``)."""

    status: str  # complete | stopped | failed
    frames_acquired: int
    frames_expected: int | None
    frames_written: int
    frames_lost: int
    error: str | None
    out: str | None


class RunSignals:
    """The signals of one run (see the module docstring)."""

    #: the run moved to a new state
    stateChanged = Signal(RunState)
    #: (stage name, frame) after a stage (or the recorder, ``"zarr"``) handled a frame
    frameReady = Signal(str, FrameEvent)
    #: (consumer name, frames, reason) for frames a consumer passed over or could not use
    frameDropped = Signal(str, int, str)
    #: (output image, frame) after a model's prediction of a frame was written
    predictionReady = Signal(str, FrameEvent)
    #: (output image, the version that now runs)
    modelSwapped = Signal(str, ModelVersion)
    #: (output image, the version refused, why) — the running version goes on
    swapRefused = Signal(str, ModelVersion, str)
    #: (output image, kind, field p (-1: every field), channel, message): the live data
    #: is unlike the model's training data (pixel_size | channel | exposure | statistics);
    #: a warning, the run goes on
    domainShift = Signal(str, str, int, str, str)
    #: (stage name, reason) a stage failed; the run ends as failed
    stageFailed = Signal(str, str)
    #: the source was paused (True) or resumed (False)
    pausedChanged = Signal(bool)
    #: the run ended
    runFinished = Signal(RunResult)


def listener_error(e: BaseException) -> str:
    """``"TypeError: ..."`` of what a listener raised (psygnal wraps it in an EmitLoopError)."""
    cause = e.__cause__ if type(e).__name__ == "EmitLoopError" and e.__cause__ else e
    return f"{type(cause).__name__}: {cause}"


def safe_emit(signal: Any, *args: Any, errors: list[str] | None = None) -> None:
    """Emit ``signal``; a listener that raises never breaks the stage that emitted.

    The listener's error (``"TypeError: ..."``) is appended to ``errors``.
    """
    try:
        signal.emit(*args)
    except Exception as e:
        if errors is not None and len(errors) < 100:
            errors.append(listener_error(e))
