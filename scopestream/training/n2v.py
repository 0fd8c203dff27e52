"""Noise2Void blind-spot masking, N2V2 style.

A few pixels per patch (stratified: one per cell of a grid) are replaced by
the median of their neighbourhood *without* the pixel itself, and the loss is
taken on those pixels only: the network cannot copy its input and learns the
expected signal instead. With the N2V2 architecture (no top-level skip,
blur-pooling) this avoids N2V's checkerboard artefacts.
"""

from __future__ import annotations

import numpy as np

_R = 2
_OFFSETS = np.array(
    [(dy, dx) for dy in range(-_R, _R + 1) for dx in range(-_R, _R + 1) if (dy, dx) != (0, 0)]
)


def n2v_mask(
    patch: np.ndarray, rng: np.random.Generator, fraction: float = 0.002
) -> tuple[np.ndarray, np.ndarray]:
    """(masked patch, mask) for a 2D patch; ``mask`` is 1 on the blind-spot pixels."""
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
    masked[py, px] = np.median(neigh, axis=1)
    mask = np.zeros_like(patch)
    mask[py, px] = 1.0
    return masked, mask
