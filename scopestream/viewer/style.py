"""Colours and contrast for displayed channels (no Qt here)."""

from __future__ import annotations

import re

import numpy as np

#: stain colours by what the channel name says (first match wins)
_COLOURS = (
    (("brightfield", "bf", "phase", "dic", "transmitted", "trans"), "gray"),
    (("nucle", "dapi", "hoechst", "h2b", "dna"), "cyan"),
    (("membrane", "cellmask", "wga", "actin", "cell"), "magenta"),
    (("gfp", "green", "488"), "green"),
    (("mcherry", "rfp", "red", "561", "594"), "red"),
    (("far", "640", "647", "cy5"), "yellow"),
)


def colormap_for(channel: str) -> str:
    """A napari colormap name for a channel (gray for transmitted light, stain colours)."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", channel.lower()) if t]
    for keys, cmap in _COLOURS:
        if any(t.startswith(k) for t in tokens for k in keys):
            return cmap
    return "green"


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
