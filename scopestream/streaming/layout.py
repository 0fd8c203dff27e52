"""What a stream looks like: frame shape, dtype and the plan's extents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StreamInfo:
    """The shape of a stream, known before its first frame.

    Parameters
    ----------
    frame_shape
        ``(Y, X)`` of every frame.
    dtype
        Pixel dtype (numpy name, e.g. ``"uint16"``).
    n_t
        Time points in the plan; ``None`` when open-ended (the store grows).
    channel_names
        One name per channel (the ``c`` index of a frame).
    n_z
        Z planes per stack.
    pixel_size_um, z_step_um, interval_s
        Physical scales written into the OME-Zarr axes. ``interval_s`` 0 means the
        plan has none ("as fast as possible"): the recording measures it from the
        frames' acquisition times instead of claiming one.
    """

    frame_shape: tuple[int, int]
    dtype: str = "uint16"
    n_t: int | None = None
    channel_names: tuple[str, ...] = ("raw",)
    n_z: int = 1
    pixel_size_um: float = 1.0
    z_step_um: float = 1.0
    interval_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.frame_shape) != 2 or min(self.frame_shape) < 1:
            raise ValueError(
                f"frame_shape must be (Y, X) with positive sizes, got {self.frame_shape}"
            )
        if not self.channel_names:
            raise ValueError("a stream needs at least one channel")
        if self.n_z < 1 or (self.n_t is not None and self.n_t < 1):
            raise ValueError("n_t and n_z must be positive")
        np.dtype(self.dtype)  # raises on nonsense

    @property
    def n_c(self) -> int:
        """Number of channels."""
        return len(self.channel_names)

    @property
    def frames_per_timepoint(self) -> int:
        """Frames in one time point (channels × z planes)."""
        return self.n_c * self.n_z

    @property
    def expected_frames(self) -> int | None:
        """Frames the whole plan produces, or ``None`` if open-ended."""
        return None if self.n_t is None else self.n_t * self.frames_per_timepoint

    def to_json(self) -> dict[str, Any]:
        """JSON-able description (for zarr attributes and the wire)."""
        return {
            "frame_shape": list(self.frame_shape),
            "dtype": self.dtype,
            "n_t": self.n_t,
            "channel_names": list(self.channel_names),
            "n_z": self.n_z,
            "pixel_size_um": self.pixel_size_um,
            "z_step_um": self.z_step_um,
            "interval_s": self.interval_s,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StreamInfo:
        """Inverse of `to_json`."""
        return cls(
            frame_shape=(int(d["frame_shape"][0]), int(d["frame_shape"][1])),
            dtype=str(d.get("dtype", "uint16")),
            n_t=None if d.get("n_t") is None else int(d["n_t"]),
            channel_names=tuple(str(c) for c in d.get("channel_names", ["raw"])),
            n_z=int(d.get("n_z", 1)),
            pixel_size_um=float(d.get("pixel_size_um", 1.0)),
            z_step_um=float(d.get("z_step_um", 1.0)),
            interval_s=float(d.get("interval_s", 0.0)),
        )
