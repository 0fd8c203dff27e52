"""The seams of the pipeline: what the run loop needs from a source, recorder, stage, display.

The core defines these Protocols and depends on nothing else; acquisition,
inference and the viewer implement them (dependency inversion: nothing in
`scopestream.streaming` imports those packages, not even for types).

::

    FrameSource ──frames──> RingBuffer ──> Recorder   (lossless, the run's store)
                                      ├──> Stage      (its InputContract says what it is fed)
                                      └──> Display    (latest frames and predictions)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    import numpy as np

    from scopestream.streaming.assembler import Stack
    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo
    from scopestream.streaming.metrics import StageMetrics

    FrameCallback = Callable[[np.ndarray, FrameMeta], None]


class SpaceWaiter(Protocol):
    """Blocks a source that can wait until the ring buffer has room (False on timeout).

    ``ahead``: frames the source produced that have not reached the ring yet (or a
    function that says so, asked again whenever the buffer changes).
    """

    def __call__(self, timeout: float, ahead: int | Callable[[], int] = 0) -> bool:
        """Wait up to ``timeout`` seconds for room."""


@runtime_checkable
class FrameSource(Protocol):
    """Something that produces frames: a camera, a simulation, a recording, the network.

    ``start`` returns at once; frames are handed to ``sink`` from the source's own
    thread, which must do nothing else with them (copy into the ring buffer, return).
    """

    info: StreamInfo
    #: True if every frame handed to ``sink`` is a fresh array that nobody writes to
    #: afterwards (then the ring buffer keeps it instead of copying it)
    hands_over_frames: bool

    def describe(self) -> dict[str, Any]:
        """JSON-able description saved with the run."""

    def counters(self) -> dict[str, int]:
        """Source-side counters (e.g. ``malformed`` messages)."""

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Begin acquiring. ``wait_for_space`` paces sources that may wait (replay, sim)."""

    def stop(self) -> None:
        """Ask the source to stop; returns at once."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the source has finished; False on timeout."""

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the source, if any."""


@runtime_checkable
class PausableSource(FrameSource, Protocol):
    """A source that can hold the next frame (the simulator, pymmcore-plus, replays)."""

    def set_paused(self, paused: bool) -> None:
        """Hold (or release) the next frame."""


class FrameReader(Protocol):
    """Frames of a recording read in acquisition order (offline prediction)."""

    info: StreamInfo

    def describe(self) -> dict[str, Any]:
        """JSON-able description of where the frames come from."""

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Every frame, in order."""


@runtime_checkable
class PlannedSource(FrameSource, Protocol):
    """A source that knows exactly how many frames it will emit (a replay of a cut run)."""

    @property
    def frames_planned(self) -> int:
        """Frames it emits if nothing stops it."""


ContractKind = Literal["latest", "every", "complete_stack", "window"]


@dataclass(frozen=True)
class InputContract:
    """What a stage is fed.

    ``latest``
        The newest frame only; may skip (display, live 2D models).
    ``every``
        Every frame in order; frames that left the ring buffer are read back
        from the recording with their real metadata, so the stage never holds
        the acquisition back (``every`` without a recording: lossless, and a
        stage that falls ``n_slots`` behind fails the run loudly).
    ``complete_stack`` (``size`` = planes)
        Every z-stack whose planes were all acquired, as one `Stack`; an
        incomplete stack is counted and never handed over.
    ``window`` (``size`` = time points)
        For every frame, the window of the last ``size`` consecutive time points
        of its (p, c, z), as one `Stack`; windows with a gap, and the first
        ``size - 1`` frames of a series, are counted and never handed over.
    """

    kind: ContractKind
    size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "every", "complete_stack", "window"):
            raise ValueError(f"unknown input contract {self.kind!r}")
        if self.size < 1:
            raise ValueError(f"a {self.kind} contract needs a positive size, got {self.size}")

    @classmethod
    def latest(cls) -> InputContract:
        """The newest frame; may skip."""
        return cls("latest")

    @classmethod
    def every(cls) -> InputContract:
        """Every frame, in order."""
        return cls("every")

    @classmethod
    def complete_stack(cls, n_z: int) -> InputContract:
        """Complete z-stacks of ``n_z`` planes."""
        return cls("complete_stack", n_z)

    @classmethod
    def window(cls, k: int) -> InputContract:
        """Gap-free windows of ``k`` time points."""
        return cls("window", k)

    @property
    def stacked(self) -> bool:
        """Whether the stage gets `Stack` s rather than frames."""
        return self.kind in ("complete_stack", "window")

    def describe(self) -> str:
        """``latest``, ``every``, ``complete_stack(5)``, ``window(3)``."""
        return self.kind if not self.stacked else f"{self.kind}({self.size})"


@runtime_checkable
class Stage(Protocol):
    """A consumer on its own thread that declares its input contract.

    Frame contracts (``latest``, ``every``) call `write`; stack contracts
    (``complete_stack``, ``window``) call `write_stack` with complete stacks only.
    """

    @property
    def contract(self) -> InputContract:
        """What this stage is fed."""

    def accepts_channel(self, c: int) -> bool:
        """Whether frames of channel index ``c`` go into this stage (stacks are built for
        those only)."""

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Handle one frame; ``data`` is only valid during the call."""

    def write_stack(self, stack: Stack) -> None:
        """Handle one complete stack or window (owned by the stage)."""

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Finish: ``status`` is how the run ended (``complete``, ``stopped``, ``failed``)."""


@runtime_checkable
class Recorder(Protocol):
    """The run's lossless store: frames in, frames and their metadata back out.

    ``submit`` lends the recorder a ring-buffer slot (zero copy); ``collect``
    says how many submitted frames are committed, in submission order, and only
    then are their slots released. ``write`` copies before returning (used when
    the ring buffer reuses its slot memory). Each frame's metadata is persisted
    before its pixels (the per-frame index), so `frame_meta` knows every frame
    that was ever committed, and `read_frame` returns it.
    """

    info: StreamInfo
    metrics: StageMetrics

    @property
    def max_outstanding(self) -> int:
        """Frames `submit` may hold before `collect` must be asked to wait."""

    @property
    def frames_committed(self) -> int:
        """Frames completely on disk."""

    def submit(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Start writing ``data`` (it stays valid until collected)."""

    def collect(self, block: bool = False) -> int:
        """Frames committed since the last call; with ``block``, wait for at least one."""

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Write one frame, copied before returning."""

    def flush(self) -> None:
        """Wait until everything submitted is on disk."""

    def frame_meta(self, seq: int) -> FrameMeta | None:
        """The persisted metadata of frame ``seq`` (None if it was never recorded)."""

    def read_frame(self, t: int, c: int, z: int, p: int = 0) -> np.ndarray:
        """A frame already committed."""

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Finish and record how the run ended."""


@runtime_checkable
class Display(Protocol):
    """The live view's side: newest raw frames (``latest``) and predictions, never Qt here.

    ``max_hz``: raw frames a second it wants at most (0: every newest frame); the
    runner does not even copy frames out of the ring faster than that.
    """

    max_hz: float

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """A raw frame (borrowed: copy what is kept)."""

    def put_prediction(
        self,
        model: str,
        kind: str,
        channel_names: tuple[str, ...],
        y: np.ndarray,
        meta: FrameMeta,
    ) -> None:
        """A model's outputs ``(C_out, Y, X)`` for the frame ``meta``, named ``channel_names``."""

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """The stream ended."""
