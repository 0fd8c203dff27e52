"""Colours and contrast for displayed channels (no Qt here)."""

from __future__ import annotations

from scopestream.streaming.ome import estimate_limits, stain_colour

__all__ = ["colormap_for", "estimate_limits"]


def colormap_for(channel: str) -> str:
    """A napari colormap name for a channel (gray for transmitted light, stain colours).

    The table is `scopestream.streaming.ome.STAIN_COLOURS`, shared with the
    OME-Zarr metadata, so napari-ome-zarr and ``scopestream view`` agree.
    """
    return stain_colour(channel)[0]
