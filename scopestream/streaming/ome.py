"""OME-Zarr 0.5 metadata for the images of a run (axes ``t, c, z, y, x``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scopestream.streaming.layout import StreamInfo

OME_VERSION = "0.5"
AXES = ("t", "c", "z", "y", "x")

#: colours for channels by common name; others cycle through `_CYCLE`.
_COLOURS = {
    "nuclei": "0080FF",
    "dapi": "0080FF",
    "hoechst": "0080FF",
    "membrane": "FF00FF",
    "actin": "00FF00",
    "gfp": "00FF00",
    "brightfield": "FFFFFF",
    "bf": "FFFFFF",
    "raw": "FFFFFF",
}
_CYCLE = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF8000", "0080FF")


def channel_colour(name: str, index: int) -> str:
    """A display colour (hex RGB) for a channel."""
    return _COLOURS.get(name.lower(), _CYCLE[index % len(_CYCLE)])


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
