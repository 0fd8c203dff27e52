"""OME-Zarr 0.5 metadata for the images of a run (axes ``t, c, z, y, x``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

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


def image_attrs(
    name: str,
    info: StreamInfo,
    channel_names: Sequence[str],
    dtype: np.dtype,
    windows: Sequence[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """The ``ome`` attribute of one image group (one level, path ``"0"``)."""
    if np.issubdtype(dtype, np.integer):
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        lo, hi = 0.0, 1.0
    channels = []
    for i, ch in enumerate(channel_names):
        start, end = windows[i] if windows else (lo, hi)
        channels.append(
            {
                "label": ch,
                "color": channel_colour(ch, i),
                "active": True,
                "window": {"min": lo, "max": hi, "start": start, "end": end},
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
