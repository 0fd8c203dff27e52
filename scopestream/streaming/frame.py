"""Per-frame metadata and the `Frame` work item.

Metadata is a `TypedDict` (cheap to build on the acquisition thread), not a
pydantic model; `version` lets readers tell layouts apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    import numpy as np

FRAME_META_VERSION = 2


class FrameMeta(TypedDict):
    """Metadata carried by every frame (version 2), and kept on disk beside its pixels.

    ``seq`` is the frame's position in the stream (0, 1, 2, ...), assigned by the
    ring buffer; ``t``/``p``/``c``/``z`` are its indices in the acquisition plan.
    ``timestamp_ns`` is the acquisition time on this machine's monotonic clock
    (latency is measured from it), ``wall_ns`` the same moment in Unix time.
    ``engine_time_ms`` and ``image_number`` are what the Micro-Manager engine
    said of the frame (pymmcore-plus ``runner_time_ms``, pycromanager
    ``ElapsedTime-ms`` / ``ImageNumber``; NaN / -1 when it said nothing).
    """

    version: int
    seq: int
    t: int
    p: int
    c: int
    z: int
    timestamp_ns: int
    wall_ns: int
    exposure_ms: float
    stage_x_um: float | None
    stage_y_um: float | None
    stage_z_um: float | None
    engine_time_ms: float | None
    image_number: int
    source: str


def make_meta(
    *,
    t: int = 0,
    p: int = 0,
    c: int = 0,
    z: int = 0,
    exposure_ms: float = 0.0,
    stage_x_um: float | None = None,
    stage_y_um: float | None = None,
    stage_z_um: float | None = None,
    engine_time_ms: float | None = None,
    image_number: int = -1,
    source: str = "",
    timestamp_ns: int | None = None,
) -> FrameMeta:
    """Build a `FrameMeta`, stamping the acquisition time now unless given."""
    return FrameMeta(
        version=FRAME_META_VERSION,
        seq=-1,
        t=t,
        p=p,
        c=c,
        z=z,
        timestamp_ns=time.monotonic_ns() if timestamp_ns is None else timestamp_ns,
        wall_ns=time.time_ns(),
        exposure_ms=float(exposure_ms),
        stage_x_um=stage_x_um,
        stage_y_um=stage_y_um,
        stage_z_um=stage_z_um,
        engine_time_ms=engine_time_ms,
        image_number=image_number,
        source=source,
    )


def stamp(meta: FrameMeta) -> None:
    """Set the acquisition time of ``meta`` to now (both clocks)."""
    meta["timestamp_ns"] = time.monotonic_ns()
    meta["wall_ns"] = time.time_ns()


META_KEYS: tuple[str, ...] = tuple(FrameMeta.__annotations__)


@dataclass(frozen=True)
class Frame:
    """A frame handed to a consumer: pixels and their metadata.

    ``data`` may be a view into a ring-buffer slot; it is valid until the
    consumer releases the frame.
    """

    data: np.ndarray
    meta: FrameMeta

    @property
    def seq(self) -> int:
        """Position of the frame in the stream."""
        return self.meta["seq"]
