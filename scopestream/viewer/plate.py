"""The plate a run's fields lie on, and small pictures of fields (no Qt).

A run of several positions (fields) is shown one field at a time, every layer of
the same field: the live display follows the field being imaged unless one is
chosen; a saved run has a ``p`` slider. The dock's selector and plate overview
(`scopestream.viewer.fields`) are drawn from `plate_layout` and `thumbnail`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from scopestream.streaming.layout import row_index, row_name, split_well

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scopestream.streaming.layout import Position

@dataclass
class PlateLayout:
    """The wells a run imaged, on the plate's rows and columns (the span it used)."""

    rows: list[str]
    columns: list[int]
    #: per well name, its fields' position indices (in the run's order)
    wells: dict[str, list[int]] = field(default_factory=dict)
    #: per well name, its (row, column) cell in ``rows`` × ``columns``
    cells: dict[str, tuple[int, int]] = field(default_factory=dict)

    def well_of(self, p: int) -> str | None:
        """The well that field ``p`` belongs to."""
        for name, ps in self.wells.items():
            if p in ps:
                return name
        return None


def plate_layout(positions: Sequence[Position]) -> PlateLayout | None:
    """The plate the positions lie on (``None`` when they name no wells)."""
    wells: dict[str, list[int]] = {}
    rc: dict[str, tuple[int, int]] = {}
    for p, pos in enumerate(positions):
        split = split_well(pos.well or "")
        if split is None:
            return None  # a position outside any well: not a plate
        name = pos.well or ""
        wells.setdefault(name, []).append(p)
        rc[name] = (row_index(split[0]), split[1])
    if not wells:
        return None
    r0, r1 = min(r for r, _ in rc.values()), max(r for r, _ in rc.values())
    c0, c1 = min(c for _, c in rc.values()), max(c for _, c in rc.values())
    rows = [row_name(r) for r in range(r0, r1 + 1)]
    columns = list(range(c0, c1 + 1))
    cells = {w: (r - r0, c - c0) for w, (r, c) in rc.items()}
    return PlateLayout(rows, columns, wells, cells)


def thumbnail(plane: np.ndarray, size: int = 64) -> np.ndarray:
    """A small uint8 picture of a frame (every k-th pixel, 1–99.5 % percentiles → 0–255)."""
    a = np.asarray(plane)
    step = max(1, math.ceil(max(a.shape[-2:]) / size))
    small = np.asarray(a[..., ::step, ::step], np.float32)
    finite = small[np.isfinite(small)]
    if finite.size == 0:
        return np.zeros(small.shape, np.uint8)
    lo, hi = np.percentile(finite, [1.0, 99.5])
    scaled = (np.nan_to_num(small, nan=float(lo)) - lo) / (hi - lo if hi > lo else 1.0)
    return np.ascontiguousarray(np.clip(scaled * 255, 0, 255).astype(np.uint8))
