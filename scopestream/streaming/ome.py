"""OME-Zarr 0.5 metadata for the images of a run (axes ``t, c, z, y, x``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scopestream.streaming.layout import StreamInfo

OME_VERSION = "0.5"
AXES = ("t", "c", "z", "y", "x")

#: the one colour table (OME-Zarr omero colours here, napari colormaps in the viewer):
#: what a channel name says → (napari colormap, hex RGB); the first match wins
STAIN_COLOURS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("brightfield", "bf", "phase", "dic", "transmitted", "trans", "raw"), "gray", "FFFFFF"),
    (("nucle", "dapi", "hoechst", "h2b", "dna"), "cyan", "00FFFF"),
    (("membrane", "cellmask", "wga", "actin", "cell"), "magenta", "FF00FF"),
    (("gfp", "green", "488", "fitc"), "green", "00FF00"),
    (("mcherry", "rfp", "red", "561", "594", "rhodamine"), "red", "FF0000"),
    (("far", "640", "647", "cy5"), "yellow", "FFFF00"),
)
_DEFAULT = ("green", "00FF00")


def stain_colour(name: str) -> tuple[str, str]:
    """(napari colormap, hex RGB) for a channel, by the tokens of its name."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    for keys, cmap, hexrgb in STAIN_COLOURS:
        if any(t.startswith(k) for t in tokens for k in keys):
            return cmap, hexrgb
    return _DEFAULT


def channel_colour(name: str, index: int = 0) -> str:
    """The display colour (hex RGB) of a channel, the same one the viewer uses."""
    return stain_colour(name)[1]


def estimate_limits(data: np.ndarray, low: float = 1.0, high: float = 99.8) -> tuple[float, float]:
    """Contrast limits from percentiles of (a subsample of) the data."""
    flat = np.asarray(data).ravel()
    if flat.size > 262144:
        flat = flat[:: flat.size // 262144]
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


class Window(TypedDict):
    """An omero channel window: the range of the data type (or data) and the contrast shown."""

    min: float
    max: float
    start: float
    end: float


def default_window(dtype: np.dtype) -> Window:
    """The window before any pixel was seen: the integer type's range, (0, 1) for floats."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = float(info.min), float(info.max)
    else:
        lo, hi = 0.0, 1.0
    return {"min": lo, "max": hi, "start": lo, "end": hi}


def window_from(values: np.ndarray, dtype: np.dtype) -> Window | None:
    """The window of sampled pixels: contrast by `estimate_limits`, range by the type or data.

    ``min``/``max`` are the integer type's range, or for floats the range of the
    finite values sampled (widened to hold ``start``/``end``). None when nothing
    finite was sampled (a reader then keeps the default).
    """
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return None
    start, end = estimate_limits(finite)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = float(info.min), float(info.max)
        start, end = max(start, lo), min(end, hi)
    else:
        lo, hi = min(float(finite.min()), start), max(float(finite.max()), end)
    return {"min": lo, "max": hi, "start": start, "end": end}


class WindowSample:
    """A small sample of an image's pixels, per channel, for its omero windows.

    Every ``stride``-th frame of a channel gives a strided subsample of about
    ``values`` pixels (a copy of a few KiB: cheap on the hot path). When more than
    ``frames`` are kept, every other one is dropped and the stride doubles, so the
    sample spans the whole run (early and late frames alike) in fixed memory.
    """

    def __init__(self, n_channels: int, *, frames: int = 16, values: int = 4096) -> None:
        self.frames = max(2, frames)
        self.values_per_frame = max(1, values)
        self._kept: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
        self._seen = [0] * n_channels
        self._stride = [1] * n_channels
        #: bumped whenever the sample changes (windows are recomputed only then)
        self.version = 0

    def offer(self, c: int, frame: np.ndarray) -> bool:
        """Consider one frame of channel ``c``; True when it is the channel's first sample."""
        n = self._seen[c]
        self._seen[c] = n + 1
        if n % self._stride[c]:
            return False
        h, w = frame.shape[-2:]
        step = max(1, int(np.sqrt(h * w / self.values_per_frame)))
        kept = self._kept[c]
        kept.append(np.array(frame[..., ::step, ::step]).ravel())
        if len(kept) > self.frames:
            del kept[1::2]
            self._stride[c] *= 2
        self.version += 1
        return n == 0

    def values(self, c: int) -> np.ndarray:
        """The sampled pixels of channel ``c`` (empty before its first frame)."""
        kept = self._kept[c]
        return np.concatenate(kept) if kept else np.zeros(0)

    @property
    def nbytes(self) -> int:
        """Memory the sample holds."""
        return sum(a.nbytes for kept in self._kept for a in kept)

    def windows(self, dtype: np.dtype) -> list[Window]:
        """Per channel, the window of what was sampled (the default before any frame)."""
        out = []
        for c in range(len(self._kept)):
            win = window_from(self.values(c), dtype) if self._kept[c] else None
            out.append(win or default_window(dtype))
        return out


def image_attrs(
    name: str,
    info: StreamInfo,
    channel_names: Sequence[str],
    dtype: np.dtype,
    windows: Sequence[Window | tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """The ``ome`` attribute of one image group (one level, path ``"0"``).

    ``windows`` per channel: a whole `Window`, or (start, end) within the default
    range; without them, the type's range (`default_window`).
    """
    channels = []
    for i, ch in enumerate(channel_names):
        window = default_window(dtype)
        given = windows[i] if windows and i < len(windows) else None
        if isinstance(given, tuple):
            window["start"], window["end"] = float(given[0]), float(given[1])
        elif given is not None:
            window = Window(
                min=float(given["min"]),
                max=float(given["max"]),
                start=float(given["start"]),
                end=float(given["end"]),
            )
        channels.append(
            {
                "label": ch,
                "color": channel_colour(ch, i),
                "active": True,
                "window": dict(window),
            }
        )
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "t", "type": "time", "unit": "second"},
                    {"name": "c", "type": "channel"},
                    {"name": "z", "type": "space", "unit": "micrometer"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {
                                "type": "scale",
                                "scale": [
                                    info.interval_s,
                                    1.0,
                                    info.z_step_um,
                                    info.pixel_size_um,
                                    info.pixel_size_um,
                                ],
                            }
                        ],
                    }
                ],
            }
        ],
        "omero": {"channels": channels, "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"}},
    }
