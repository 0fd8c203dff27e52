"""The `FrameSink` protocol: the least a consumer is (a `Stage` declares more; see seams)."""

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
