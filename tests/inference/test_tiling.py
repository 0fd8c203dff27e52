from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scopestream.inference.architectures import build, receptive_radius
from scopestream.inference.tiling import TilingError, plan_tiles, predict_tiled

Z3D = {"dims": 3, "out_channels": 2, "base": 8, "pool_z": (False, False, False)}
CASES = [
    ("denoise_unet", {}, (300, 420), (192, 192)),
    ("denoise_unet", {"n2v2": True}, (256, 264), (200, 176)),
    ("stain_unet", {"out_channels": 2, "base": 16}, (333, 250), (208, 200)),
    ("stain_unet", {"in_channels": 5, "out_channels": 2, "base": 8}, (200, 200), (176, 176)),
    ("stain_unet", Z3D, (12, 136, 150), (12, 128, 128)),  # 3D, tiled in y/x
    ("stain_unet", Z3D, (62, 64, 64), (48, 64, 64)),  # 3D, tiled in z
]


@pytest.mark.parametrize(("kind", "params", "shape", "tile"), CASES)
@torch.no_grad()
def test_tiled_equals_whole_frame(kind: str, params: dict, shape: tuple, tile: tuple) -> None:  # type: ignore[type-arg]
    torch.manual_seed(0)
    m = build(kind, params).eval()  # type: ignore[arg-type]
    mult = m.size_multiple
    halo = [math.ceil(r / k) * k for r, k in zip(receptive_radius(m), mult, strict=True)]

    def fn(x: np.ndarray) -> np.ndarray:
        return m(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    img = np.random.default_rng(0).random((m.in_channels, *shape), dtype=np.float32)
    whole = predict_tiled(
        fn, img, out_channels=m.head.out_channels, tile=None, halo=halo, mult=mult
    )
    tiled = predict_tiled(
        fn, img, out_channels=m.head.out_channels, tile=tile, halo=halo, mult=mult
    )
    assert whole.shape == tiled.shape == (m.head.out_channels, *shape)
    rel = np.abs(whole - tiled).max() / (whole.max() - whole.min())
    assert rel <= 1e-5
    # the borders too (where the tiles are flush with the image)
    edge = (slice(None), *[slice(0, 8)] * len(shape))
    assert np.abs(whole[edge] - tiled[edge]).max() / (whole.max() - whole.min()) <= 1e-5


@pytest.mark.parametrize("size", [64, 100, 256, 1000])
def test_cores_cover_every_pixel_exactly_once(size: int) -> None:
    s = size // 8 * 8
    tiles = plan_tiles((s, s + 16), (64, 96), (16, 24), (8, 8))
    cover = np.zeros((s, s + 16), int)
    for t in tiles:
        cover[t.dst] += 1
        for src, crop, dst in zip(t.src, t.crop, t.dst, strict=True):
            assert src.start % 8 == 0  # on the pooling grid
            assert dst.start - src.start == crop.start
            at_edge_lo = src.start == 0
            assert at_edge_lo or crop.start >= (16 if src is t.src[0] else 24)
    assert (cover == 1).all()


def test_too_small_tile_says_what_is_needed() -> None:
    with pytest.raises(TilingError, match="use at least 128"):
        plan_tiles((512, 512), (64, 64), (56, 56), (8, 8))
