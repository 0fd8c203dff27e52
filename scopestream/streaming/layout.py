"""What a stream looks like: frame shape, dtype and the plan's extents."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Position:
    """One field a run images (the ``p`` index of its frames), where the stage goes for it.

    ``x_um``/``y_um``/``z_um`` None: the stage stays where it is on that axis. On a
    plate, ``well`` names the well (``"B3"``) and ``field`` the field's index in it.
    """

    name: str
    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    well: str | None = None
    field: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (zarr attributes, the wire)."""
        return {
            "name": self.name,
            "x_um": self.x_um,
            "y_um": self.y_um,
            "z_um": self.z_um,
            "well": self.well,
            "field": self.field,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Position:
        """Inverse of `to_json`."""

        def opt(k: str) -> float | None:
            v = d.get(k)
            return None if v is None else float(v)

        return cls(
            name=str(d["name"]),
            x_um=opt("x_um"),
            y_um=opt("y_um"),
            z_um=opt("z_um"),
            well=None if d.get("well") is None else str(d["well"]),
            field=None if d.get("field") is None else int(d["field"]),
        )


_WELL = re.compile(r"^([A-Za-z]{1,2})(\d{1,3})$")


def split_well(name: str) -> tuple[str, int] | None:
    """``"B12"`` → ``("B", 12)`` (two-letter rows on 1536-well plates); None if not a well."""
    m = _WELL.match(name)
    return None if m is None else (m.group(1).upper(), int(m.group(2)))


def row_index(letters: str) -> int:
    """``A`` → 0, ``H`` → 7, ``Z`` → 25, ``AA`` → 26."""
    n = 0
    for ch in letters.upper():
        n = n * 26 + (ord(ch) - ord("A") + 1)
    return n - 1


def row_name(i: int) -> str:
    """Inverse of `row_index`."""
    out = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        out = chr(ord("A") + rem) + out
    return out


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
    positions
        The fields the run images, in the order of the ``p`` index; empty: one field,
        wherever the stage is.
    """

    frame_shape: tuple[int, int]
    dtype: str = "uint16"
    n_t: int | None = None
    channel_names: tuple[str, ...] = ("raw",)
    n_z: int = 1
    pixel_size_um: float = 1.0
    z_step_um: float = 1.0
    interval_s: float = 0.0
    positions: tuple[Position, ...] = ()
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
        names = [p.name for p in self.positions]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"position names must be unique; repeated: {dup[:5]}")

    @property
    def n_c(self) -> int:
        """Number of channels."""
        return len(self.channel_names)

    @property
    def n_p(self) -> int:
        """Number of positions (fields); 1 when the run stays where the stage is."""
        return max(1, len(self.positions))

    @property
    def position_names(self) -> tuple[str, ...]:
        """One name per position (``p`` index)."""
        return tuple(p.name for p in self.positions) or ("0",)

    @property
    def frames_per_timepoint(self) -> int:
        """Frames in one time point (positions × channels × z planes)."""
        return self.n_p * self.n_c * self.n_z

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
            "positions": [p.to_json() for p in self.positions],
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
            positions=tuple(Position.from_json(p) for p in d.get("positions", ())),
        )
