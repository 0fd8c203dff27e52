"""Noise2Void blind-spot masking.

A few pixels per patch (stratified: one per cell of a grid) are replaced, and the
loss is taken on those pixels only: the network cannot copy its input and learns
the expected signal instead. The replacement is ``median`` (N2V2: the median of the
5×5 neighbourhood *without* the pixel; with the N2V2 architecture, no top-level
skip and blur-pooling, this avoids N2V's checkerboard artefacts) or ``uniform``
(original N2V: one neighbour of the 5×5 window drawn at random).
"""

from __future__ import annotations

import numpy as np

_R = 2
_OFFSETS = np.array(
    [(dy, dx) for dy in range(-_R, _R + 1) for dx in range(-_R, _R + 1) if (dy, dx) != (0, 0)]
)


REPLACE = ("median", "uniform")


def n2v_mask(
    patch: np.ndarray,
    rng: np.random.Generator,
    fraction: float = 0.015,
    replace: str = "median",
) -> tuple[np.ndarray, np.ndarray]:
    """(masked patch, mask) for a 2D patch; ``mask`` is 1 on the blind-spot pixels.

    ``fraction`` of the pixels are masked (one per cell of a grid), each replaced as
    ``replace`` says (`REPLACE`).
    """
    if replace not in REPLACE:
        raise ValueError(f"replace must be one of {REPLACE}, got {replace!r}")
    if not 0 < fraction < 0.5:
        raise ValueError(f"the masked fraction must be in (0, 0.5), got {fraction}")
    h, w = patch.shape
    cell = max(2, round(1 / np.sqrt(fraction)))
    ys = np.arange(0, h, cell)
    xs = np.arange(0, w, cell)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    py = np.minimum(gy.ravel() + rng.integers(0, cell, gy.size), h - 1)
    px = np.minimum(gx.ravel() + rng.integers(0, cell, gx.size), w - 1)
    padded = np.pad(patch, _R, mode="reflect")
    neigh = padded[py[:, None] + _R + _OFFSETS[:, 0], px[:, None] + _R + _OFFSETS[:, 1]]
    masked = patch.copy()
    if replace == "median":
        masked[py, px] = np.median(neigh, axis=1)
    else:
        masked[py, px] = neigh[np.arange(py.size), rng.integers(0, len(_OFFSETS), py.size)]
    mask = np.zeros_like(patch)
    mask[py, px] = 1.0
    return masked, mask
