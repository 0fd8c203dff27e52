"""Flush-border crop-and-stitch tiling, in any number of spatial dimensions.

For a convolutional network without global operations, an output pixel
depends only on inputs within its receptive field. So an image can be cut into
tiles that overlap by a *halo* ≥ that radius, each tile predicted on its own,
and only each tile's core (away from its cut edges) kept: the stitched result
is the whole-frame result. Three details make it exact rather than close:

* tiles at the image border are *flush* with it (shifted inside the image,
  never padded), so border pixels see exactly the zero padding they see in the
  whole frame;
* every tile starts on a multiple of the network's size multiple
  (``2**depth``), so pooling and upsampling grids line up with the whole frame's;
* cores partition the image, each taken from a tile where it is at least a
  halo away from every cut edge.

Images whose sizes are not multiples of the size multiple are padded (by
reflection) on the far side before either path, and cropped back after.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence


class TilingError(ValueError):
    """A tile size that cannot give an exact result."""


@dataclass(frozen=True)
class Tile:
    """Where a tile is read from, and which part of its prediction goes where."""

    src: tuple[slice, ...]  # the tile's window in the (padded) image
    crop: tuple[slice, ...]  # the kept core, in tile coordinates
    dst: tuple[slice, ...]  # where the core goes in the output


def _axis_plan(size: int, tile: int, halo: int, mult: int) -> list[tuple[int, int, int]]:
    """(tile start, core start, core stop) along one axis."""
    if tile >= size:
        return [(0, 0, size)]
    if tile % mult or size % mult:
        raise TilingError(f"tile {tile} and size {size} must be multiples of {mult}")
    if (tile - 2 * halo) // mult * mult < mult:  # no core left between two halos
        raise TilingError(
            f"tile size {tile} is too small for a halo of {halo} px: use at least "
            f"{2 * halo + 2 * mult}"
        )
    plan = []
    a = 0
    while a < size:
        start = max(0, min(a - halo, size - tile))
        start = start // mult * mult  # aligned; only widens the left margin
        # the widest core that keeps a halo on the right (none needed at the border)
        b = size if start + tile >= size else (start + tile - halo) // mult * mult
        if b <= a:
            raise TilingError(f"tile size {tile} cannot cover the image with halo {halo}")
        plan.append((start, a, b))
        a = b
    return plan


def plan_tiles(
    shape: Sequence[int], tile: Sequence[int], halo: Sequence[int], mult: Sequence[int]
) -> list[Tile]:
    """Tiles covering ``shape`` (spatial axes only) exactly once with their cores."""
    axes = [
        _axis_plan(int(s), int(t), int(h), int(m))
        for s, t, h, m in zip(shape, tile, halo, mult, strict=True)
    ]
    tiles = []
    for combo in itertools.product(*axes):
        src, crop, dst = [], [], []
        for (start, a, b), s, t in zip(combo, shape, tile, strict=True):
            length = min(t, s)
            src.append(slice(start, start + length))
            crop.append(slice(a - start, b - start))
            dst.append(slice(a, b))
        tiles.append(Tile(tuple(src), tuple(crop), tuple(dst)))
    return tiles


def pad_to_multiple(
    image: np.ndarray, mult: Sequence[int], n_spatial: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Reflect-pad the trailing ``n_spatial`` axes up to multiples of ``mult``."""
    spatial = image.shape[-n_spatial:]
    target = tuple(math.ceil(s / m) * m for s, m in zip(spatial, mult, strict=True))
    if target == spatial:
        return image, spatial
    pad = [(0, 0)] * (image.ndim - n_spatial) + [
        (0, t - s) for s, t in zip(spatial, target, strict=True)
    ]
    reflect = all(s > t - s for s, t in zip(spatial, target, strict=True))
    return np.pad(image, pad, mode="reflect" if reflect else "symmetric"), spatial


def iter_batches(tiles: list[Tile], batch: int) -> Iterator[list[Tile]]:
    """Tiles in groups of ``batch``."""
    for i in range(0, len(tiles), batch):
        yield tiles[i : i + batch]


def predict_tiled(
    fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    out_channels: int,
    tile: Sequence[int] | None,
    halo: Sequence[int],
    mult: Sequence[int],
    batch: int = 4,
) -> np.ndarray:
    """Predict ``image`` (C, *spatial) with ``fn`` ((B, C, *tile) → (B, Cout, *tile)).

    ``tile=None`` runs the whole (padded) image at once.
    """
    n_sp = len(mult)
    padded, orig = pad_to_multiple(image, mult, n_sp)
    spatial = padded.shape[-n_sp:]
    if tile is None:
        out = fn(padded[None])[0]
    else:
        t = [min(int(a), s) for a, s in zip(tile, spatial, strict=True)]
        t = [s if a >= s else a // m * m for a, s, m in zip(t, spatial, mult, strict=True)]
        tiles = plan_tiles(spatial, t, halo, mult)
        out = np.empty((out_channels, *spatial), dtype=np.float32)
        for group in iter_batches(tiles, batch):
            pred = fn(np.stack([padded[(slice(None), *tl.src)] for tl in group]))
            for tl, p in zip(group, pred, strict=True):
                out[(slice(None), *tl.dst)] = p[(slice(None), *tl.crop)]
    crop = tuple(slice(0, s) for s in orig)
    result: np.ndarray = out[(slice(None), *crop)]
    return result
