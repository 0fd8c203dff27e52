"""Train from TIFF files, predict TIFF files: the round trip a new user tries first."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tifffile

from scopestream.acquisition.base import SourceError
from scopestream.acquisition.replay import ReplaySource
from scopestream.inference.engine import ModelChannelError
from scopestream.inference.offline import predict_file
from scopestream.inference.package import load_package

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult


def _pairs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A brightfield-like input and a nuclei-like target that follows it (uint16 stacks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    tgt = np.zeros((n, size, size), np.float32)
    for k in range(n):
        for _ in range(6):
            cy, cx = rng.uniform(6, size - 6, 2)
            tgt[k] += 800 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    inp = 1000 - 0.3 * tgt + rng.normal(0, 10, tgt.shape)
    return inp.astype(np.uint16), (100 + tgt).astype(np.uint16)


def _imwrite_plain(path: Path, data: np.ndarray) -> None:
    """Write as ``tifffile.imwrite(path, data)`` does by default (no metadata; 3 or 4
    planes become planar RGB(A), which tifffile now warns about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(path, data)


def _read(path: Path) -> tuple[str, np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].axes, tf.series[0].asarray()


#: CPU semantics, pinned: on a machine with a GPU `auto` would build TensorRT engines
CPU = ["--backend", "onnxruntime"]
COMMON = ["--patch", "32x32", "--batch", "4", "--max-steps", "6", "--force", "--json"]


def test_a_stain_model_trained_on_tiff_stacks_predicts_a_tiff_stack(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "tg").mkdir()
    for k in range(2):  # two (16, Y, X) stacks, paired by name
        a, b = _pairs(16, 96, seed=k)
        tifffile.imwrite(tmp_path / "in" / f"s{k}.tif", a)
        tifffile.imwrite(tmp_path / "tg" / f"s{k}.tif", b)
    tr = cli(
        "train", "--task", "stain", "--mode", "supervised", "--inputs", str(tmp_path / "in"),
        "--targets", str(tmp_path / "tg"), "--out", str(tmp_path / "stainho"),
        "--work-dir", str(tmp_path / "w"), *COMMON,
    )  # fmt: skip
    assert tr.code == 0, tr.stderr
    test, _ = _pairs(4, 96, seed=9)
    _imwrite_plain(tmp_path / "test.tif", test)  # tifffile reads (4, Y, X) as "SYX"
    pr = cli("predict", "--model", tr.json["package"], "--input", str(tmp_path / "test.tif"),
             *CPU)  # fmt: skip
    assert pr.code == 0, pr.stderr
    assert "taken as 'brightfield'" in pr.stderr  # the one unnamed channel, said so
    axes, out = _read(tmp_path / "test_stainho.tif")  # beside the input, named after both
    assert axes == "TYX" and out.shape == (4, 96, 96)  # four time points, not four channels
    assert np.isfinite(out).all() and out.std() > 0


def test_the_bundled_stain_model_predicts_a_plain_single_channel_tiff(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    img, _ = _pairs(1, 64, seed=3)
    plain = np.tile(img[0], (16, 18))[:1000, :1100]  # 1000 × 1100, one channel, no metadata
    tifffile.imwrite(tmp_path / "plain.tif", plain)
    r = cli("predict", "--model", "stain", "--input", str(tmp_path / "plain.tif"), *CPU)
    assert r.code == 0, r.stderr
    axes, out = _read(tmp_path / "plain_stain.tif")
    assert out.shape == (2, 1000, 1100) and axes == "CYX"  # nuclei and membrane
    assert np.isfinite(out).all()


def test_a_denoiser_trained_on_one_tiff_predicts_another(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    noisy, _ = _pairs(12, 96, seed=5)
    tifffile.imwrite(tmp_path / "train.tif", noisy)
    tr = cli(
        "train", "--task", "denoise", "--mode", "n2v", "--inputs", str(tmp_path / "train.tif"),
        "--variant", "n2v", "--out", str(tmp_path / "dn"), "--work-dir", str(tmp_path / "w"),
        *COMMON,
    )  # fmt: skip
    assert tr.code == 0, tr.stderr
    arch = load_package(tr.json["package"]).manifest.architecture  # the plain N2V U-Net
    assert arch.kind == "denoise_unet" and "n2v2" not in arch.params
    _imwrite_plain(tmp_path / "more.tif", noisy[:3])  # three planes: "SYX" to tifffile
    out = tmp_path / "more_dn.tif"
    pr = cli("predict", "--model", tr.json["package"], "--input", str(tmp_path / "more.tif"),
             *CPU)  # fmt: skip
    assert pr.code == 0, pr.stderr
    axes, den = _read(out)
    assert axes == "TYX" and den.shape == (3, 96, 96) and np.isfinite(den).all()
    # --axes: the same planes read as one z-stack
    z = cli(
        "predict", "--model", tr.json["package"], "--input", str(tmp_path / "more.tif"),
        "--axes", "ZYX", "--output", str(tmp_path / "z.tif"), *CPU,
    )  # fmt: skip
    assert z.code == 0, z.stderr
    axes, zs = _read(tmp_path / "z.tif")
    assert axes == "ZYX" and np.allclose(zs, den, equal_nan=True)  # a 2D model: same planes


def test_predict_names_only_options_it_has(tmp_path: Path) -> None:
    _imwrite_plain(tmp_path / "three.tif", np.zeros((3, 64, 64), np.uint16))
    src = ReplaySource(tmp_path / "three.tif", fps=0, axes="CYX")
    try:
        with pytest.raises(ModelChannelError, match="--input-channel") as e:
            predict_file(src, "stain", str(tmp_path / "x.tif"), backend="onnxruntime")
        assert "--channels" not in str(e.value)  # `run`'s option, not predict's
        assert not (tmp_path / "x.tif").exists()
        res = predict_file(
            src, "stain", str(tmp_path / "x.tif"), input_channel="c1", backend="onnxruntime"
        )
    finally:
        src.finished()
    assert res["frames"] == 1
    _, out = _read(tmp_path / "x.tif")
    assert out.shape == (2, 64, 64)


@pytest.mark.parametrize(
    ("axes", "message"),
    [("TYXZ", "has 4 axes; the image has 3"), ("TXT", "twice"), ("TAB", "unknown letter")],
)
def test_bad_axes_are_refused_with_a_reason(tmp_path: Path, axes: str, message: str) -> None:
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 16, 16), np.uint16))
    with pytest.raises(SourceError, match=message):
        ReplaySource(tmp_path / "s.tif", axes=axes)


def test_an_ome_tiff_says_its_axes_channel_names_and_pixel_size(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 16 * 16, dtype=np.uint16).reshape(2, 3, 16, 16)
    tifffile.imwrite(
        tmp_path / "a.ome.tif", data, ome=True,
        metadata={"axes": "TCYX", "Channel": {"Name": ["bf", "dapi", "gfp"]},
                  "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )  # fmt: skip
    src = ReplaySource(tmp_path / "a.ome.tif", fps=0)
    try:
        info = src.info
        assert (info.n_t, info.pixel_size_um) == (2, 0.25)
        assert info.channel_names == ("bf", "dapi", "gfp")
        frames = list(src.frames())
        assert np.array_equal(frames[4][0], data[1, 1])  # t, c order
    finally:
        src.finished()
