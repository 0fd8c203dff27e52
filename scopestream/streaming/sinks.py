"""The `FrameSink` protocol: where frames go (the zarr store, the viewer, the network)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np

    from scopestream.streaming.frame import FrameMeta


@runtime_checkable
class FrameSink(Protocol):
    """Consumes frames on its own thread (the runner gives each sink one)."""

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Handle one frame. ``data`` is only valid during the call."""

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Finish: ``status`` is ``complete`` or ``failed`` (with ``error``)."""


@runtime_checkable
class DeferredFrameSink(FrameSink, Protocol):
    """A sink that can keep a view of the frame while it writes (no copy).

    The runner lends it the ring-buffer slot: ``submit`` starts the write and
    returns; ``collect`` says how many submitted frames are finished, in
    submission order, and only then are their slots released. At most
    ``max_outstanding`` frames are held before the runner asks ``collect`` to wait.
    """

    @property
    def max_outstanding(self) -> int:
        """Frames that may be held at once."""

    def submit(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Start writing ``data``; it stays valid until collected."""

    def collect(self, block: bool = False) -> int:
        """Frames finished since the last call; with ``block``, wait for at least one."""
