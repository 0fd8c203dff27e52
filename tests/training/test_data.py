from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile
import zarr

from scopestream.training.data import (
    DataError,
    FieldData,
    LazyPlanes,
    PatchSampler,
    load_run_fields,
    load_tiff_pairs,
    split_regions,
)
from scopestream.training.n2v import n2v_mask

if TYPE_CHECKING:
    from pathlib import Path


class _ReadLog:
    """A zarr array that records every read (to check that reads are per plane)."""

    def __init__(self, arr: Any) -> None:
        self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype
        self.reads: list[Any] = []

    def __getitem__(self, key: Any) -> Any:
        self.reads.append(key)
        return self.arr[key]


def test_one_field_is_split_by_spatial_blocks_never_by_frames() -> None:
    f = FieldData("f", np.zeros((10, 256, 256), np.float32))
    s = split_regions([f], patch=64, seed=0)
    assert {k: len(v) for k, v in s.items()} == {"val": 2, "test": 2, "train": 12}
    cover = np.zeros((256, 256), int)
    for regions in s.values():
        for r in regions:
            cover[r.y, r.x] += 1
    assert (cover == 1).all()  # blocks partition the field: no pixel in two splits


def test_several_files_are_split_by_file(tmp_path: Path) -> None:
    fields = [FieldData(f"f{i}", np.zeros((2, 64, 64), np.float32)) for i in range(7)]
    s = split_regions(fields, patch=32, seed=1)
    names = {k: {r.field for r in v} for k, v in s.items()}
    assert not names["train"] & names["val"]
    assert not names["train"] & names["test"]
    assert sum(len(v) for v in names.values()) == 7


def test_too_little_data_for_a_split_is_explained() -> None:
    with pytest.raises(DataError, match="too small to split"):
        split_regions([FieldData("tiny", np.zeros((3, 64, 64), np.float32))], patch=64)


def test_patches_stay_inside_their_region_and_are_deterministic() -> None:
    rng = np.random.default_rng(0)
    data = rng.random((4, 128, 128)).astype(np.float32)
    f = FieldData("f", data, [data * 2], ["t"])
    s = split_regions([f], patch=32, seed=0)
    sampler = PatchSampler([f], s["test"], 32, seed=3, augment=False)
    x1, (y1,) = sampler.sample(5)
    x2, _ = sampler.sample(5)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_allclose(y1, 2 * x1)
    allowed = np.zeros((128, 128), bool)
    for r in s["test"]:
        allowed[r.y, r.x] = True
    found = any(
        np.array_equal(data[i][yy : yy + 32, xx : xx + 32], x1)
        for i in range(4)
        for yy in range(0, 97)
        for xx in range(0, 97)
        if allowed[yy : yy + 32, xx : xx + 32].all()
    )
    assert found


def test_tiff_pairs_match_by_name_and_check_shapes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", np.zeros((2, 32, 32), np.uint16))
    tifffile.imwrite(tmp_path / "gt" / "a.tif", np.zeros((2, 32, 40), np.uint16))
    with pytest.raises(
        DataError, match=r"a.tif: input \(2, 32, 32\) and target \(2, 32, 40\) differ"
    ):
        load_tiff_pairs(tmp_path / "in", tmp_path / "gt")
    tifffile.imwrite(tmp_path / "in" / "b.tif", np.zeros((2, 32, 32), np.uint16))
    with pytest.raises(DataError, match=r"no target for \['b.tif'\]"):
        load_tiff_pairs(tmp_path / "in", tmp_path / "gt")


def test_two_tiff_files_are_one_pair_whatever_their_names(tmp_path: Path) -> None:
    low = np.arange(2 * 32 * 32, dtype=np.uint16).reshape(2, 32, 32)
    tifffile.imwrite(tmp_path / "low.tif", low)
    tifffile.imwrite(tmp_path / "nuclei.ome.tif", low + 1)
    (field,) = load_tiff_pairs(tmp_path / "low.tif", tmp_path / "nuclei.ome.tif")
    assert field.name == "low" and field.target_names == ["nuclei"]
    assert np.array_equal(np.asarray(field.targets[0]), low + 1)


def test_n2v_blind_spots_replace_pixels_by_their_neighbourhood_median() -> None:
    patch = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    masked, mask = n2v_mask(patch, np.random.default_rng(0), fraction=0.01)
    ys, xs = np.nonzero(mask)
    assert 20 <= len(ys) <= 60  # ~1 % of the pixels, stratified
    assert (masked[mask == 0] == patch[mask == 0]).all()
    for y, x in zip(ys, xs, strict=True):
        if 2 <= y < 62 and 2 <= x < 62:
            neigh = patch[y - 2 : y + 3, x - 2 : x + 3].ravel()
            neigh = np.delete(neigh, 12)  # not the pixel itself
            assert masked[y, x] == np.median(neigh)


def test_n2v_uniform_replacement_takes_one_of_the_5x5_neighbours_never_the_pixel() -> None:
    # distinct values: each replacement says which pixel it came from
    patch = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    masked, mask = n2v_mask(patch, np.random.default_rng(0), fraction=0.015, replace="uniform")
    ys, xs = np.nonzero(mask)
    cell = round(1 / np.sqrt(0.015))  # one blind spot per 8x8 cell: 64 in a 64x64 patch
    assert len(ys) == (64 // cell) ** 2
    offsets = set()
    for y, x in zip(ys, xs, strict=True):
        if 2 <= y < 62 and 2 <= x < 62:
            src = int(masked[y, x])
            dy, dx = src // 64 - y, src % 64 - x
            assert max(abs(dy), abs(dx)) <= 2 and (dy, dx) != (0, 0)
            offsets.add((dy, dx))
    assert len(offsets) > 8  # drawn at random, not one fixed neighbour
    _, smask = n2v_mask(patch, np.random.default_rng(0), fraction=0.002)
    assert smask.sum() < mask.sum() / 4  # the fraction is honoured
    with pytest.raises(ValueError, match="replace"):
        n2v_mask(patch, np.random.default_rng(0), replace="mean")
    with pytest.raises(ValueError, match="fraction"):
        n2v_mask(patch, np.random.default_rng(0), fraction=0.0)


def test_lazy_planes_are_indexed_like_the_array_they_stand_for(tmp_path: Path) -> None:
    """Runs over the in-memory threshold: every index form training and evaluation use."""
    full = np.random.default_rng(0).integers(0, 4000, (3, 2, 2, 16, 24)).astype(np.uint16)
    z = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=full.shape, chunks=(1, 1, 1, 16, 24), dtype=full.dtype
    )
    z[...] = full
    log = _ReadLog(z)
    lazy = LazyPlanes(log, 1)
    ref = full[:, 1].reshape(6, 16, 24)  # frame i is plane i % 2 of time point i // 2
    assert lazy.shape == ref.shape and lazy.dtype == ref.dtype and len(lazy) == 6
    keys: list[Any] = [
        2,  # load_run / evaluate: one frame
        -1,
        np.int64(3),
        slice(1, 4),  # evaluate: the planes of a window or stack
        slice(None, None, 2),
        slice(4, 1, -1),
        slice(0, 0),
        [5, 0, 3],
        np.array([1, 1]),
        ref.mean(axis=(1, 2)) > ref.mean(),  # a boolean mask of frames
        (2, slice(3, 9), slice(None)),  # patches: frame, y, x
        (slice(0, 6), slice(2, 5), slice(1, 20, 3)),
        (4, 7),
        (np.array([0, 5]), slice(0, 4), 2),
    ]
    for key in keys:
        got = lazy[key]
        np.testing.assert_array_equal(got, ref[key], err_msg=repr(key))
        assert got.shape == ref[key].shape and got.dtype == ref.dtype, key
    # chunk-wise: each read is one plane of the channel, never the whole array
    assert log.reads
    assert all(
        isinstance(k, tuple) and len(k) == 5 and all(isinstance(i, int) for i in k[:3])
        for k in log.reads
    )
    assert {k[1] for k in log.reads} == {1}
    n = len(log.reads)
    kept = lazy.take(np.array([0, 2, 5]))  # dropping frames reads nothing
    assert len(log.reads) == n and kept.shape == (3, 16, 24)
    np.testing.assert_array_equal(kept[1], ref[2])
    np.testing.assert_array_equal(kept[1:, 2:4, 3], ref[[2, 5], 2:4, 3])
    for bad in (6, -7, (0, 0, 0, 0), (Ellipsis, 0)):
        with pytest.raises(IndexError):
            lazy[bad]


def test_a_runs_fields_say_how_their_input_was_acquired(tmp_path: Path) -> None:
    """What a model's fingerprint is made of: channel and preset, pixel size, exposures."""
    from tests.conftest import record_sim

    run = record_sim(tmp_path / "r.ome.zarr", "--channels", "nuclei_low=nuclei:2",
                     "--time-points", "2", "--shape", "32x32")  # fmt: skip
    (field,) = load_run_fields(run, "nuclei_low")
    assert field.context == {
        "channels": ["nuclei_low", "nuclei"], "dtype": "uint16",
        "pixel_size_um": 0.325, "exposures_ms": [2.0],
    }  # fmt: skip
