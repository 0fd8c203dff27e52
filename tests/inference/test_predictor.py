from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from scopestream.inference.backends import OnnxBackend, TorchBackend
from scopestream.inference.manifest import Normalization
from scopestream.inference.predictor import ImageTooSmall, Predictor, tile_from_string

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.inference.package import ModelPackage


def test_normalization_round_trip_and_percentiles() -> None:
    n = Normalization(offset=(100.0, 10.0), scale=(300.0, 2.0))
    x = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32) * 500
    np.testing.assert_allclose(n.invert(n.apply(x)), x, rtol=1e-5)
    data = np.random.default_rng(1).normal(1000, 50, (10, 64, 64))
    p = Normalization.from_percentiles(data)
    y = p.apply(data[None])
    assert abs(np.percentile(y, 1)) < 1e-6
    assert abs(np.percentile(y, 99.8) - 1) < 1e-6
    assert p.source == "calibration"
    with pytest.raises(ValueError, match="non-zero"):
        Normalization(offset=(0.0,), scale=(0.0,))


def test_2d_prediction_in_data_units_whole_or_tiled(
    make_package: Callable[..., ModelPackage],
) -> None:
    pkg = make_package()
    be = OnnxBackend(pkg, threads=2)
    frame = np.random.default_rng(0).normal(300, 30, (200, 232)).astype(np.float32)
    whole = Predictor(pkg, be).predict(frame)
    tiled = Predictor(pkg, be, tile=(136, 136), batch=3).predict(frame)
    assert whole.shape == tiled.shape == (1, 200, 232)
    assert np.abs(whole - tiled).max() / np.ptp(whole) <= 1e-5
    # denormalized with the output constants: data units, not [0, 1]
    ref = TorchBackend(pkg, device="cpu")
    raw = ref(pkg.manifest.input_norm.apply(frame[None])[None])[0]
    np.testing.assert_allclose(whole, pkg.manifest.output_norm.invert(raw), rtol=1e-4, atol=1e-2)


def test_windows_and_stacks(make_package: Callable[..., ModelPackage]) -> None:
    t = make_package(name="dn_t", params={"in_channels": 3}, spatial="2.5d-t", window=3)
    p = Predictor(t, OnnxBackend(t, threads=2))
    assert p.predict(np.zeros((3, 64, 64), np.float32)).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="window of 3"):
        p.predict(np.zeros((2, 64, 64), np.float32))
    s3 = make_package(
        name="stain3d",
        kind="stain_unet",
        params={"dims": 3, "out_channels": 2, "base": 4, "pool_z": (False, False, False)},
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
        spatial="3d",
    )
    p3 = Predictor(s3, OnnxBackend(s3, threads=2))
    assert p3.predict(np.zeros((5, 64, 64), np.float32)).shape == (2, 5, 64, 64)


def test_image_smaller_than_the_model_minimum(make_package: Callable[..., ModelPackage]) -> None:
    pkg = make_package()
    with pytest.raises(ImageTooSmall, match=r"smaller than the model's minimum \(8, 8\)"):
        Predictor(pkg, OnnxBackend(pkg, threads=1)).predict(np.zeros((6, 64), np.float32))


def test_calibration_freezes_constants_once(make_package: Callable[..., ModelPackage]) -> None:
    pkg = make_package()
    p = Predictor(pkg, OnnxBackend(pkg, threads=1))
    burst = np.random.default_rng(0).normal(2000, 100, (5, 64, 64)).astype(np.float32)
    c = p.calibrated(burst)
    assert c.input_norm.source == "calibration"
    assert c.input_norm.offset[0] == pytest.approx(np.percentile(burst, 1))
    assert c.describe()["input_norm"]["source"] == "calibration"


def test_tile_strings() -> None:
    assert tile_from_string("512x256", 2) == (512, 256)
    assert tile_from_string("128", 3) == (128, 128, 128)
    assert tile_from_string(None, 2) is None
    with pytest.raises(ValueError, match="needs 2"):
        tile_from_string("1x2x3", 2)


def test_wasteful_tiles_are_pointed_out(make_package: Callable[..., ModelPackage]) -> None:
    pkg = make_package()
    p = Predictor(pkg, OnnxBackend(pkg, threads=1), tile=(128, 128))
    assert any("waste far less" in n for n in p.notes)


@pytest.mark.parametrize("kind", ["denoise_unet", "stain_unet"])
def test_calibrated_denoiser_keeps_the_datas_brightness(
    make_package: Callable[..., ModelPackage], kind: str
) -> None:
    """Data ``a·x + b`` with constants calibrated on it: a denoiser's output is
    ``a·y + b`` (its output is the input's quantity); a stain model's output, another
    quantity, is unchanged. Re-estimating only the input constants compressed a
    calibrated denoiser's output range ~11× (issue 11)."""
    from scopestream.inference.manifest import Normalization

    outputs = ("*",) if kind == "denoise_unet" else ("nuclei",)
    inputs = ("*",) if kind == "denoise_unet" else ("brightfield",)
    pkg = make_package(kind=kind, inputs=inputs, outputs=outputs)
    base = Predictor(pkg, OnnxBackend(pkg, threads=1))
    x = np.random.default_rng(0).normal(300, 40, (64, 64)).astype(np.float32)
    y = base.predict(x)
    a, b = 0.1, 5.0
    m = pkg.manifest.input_norm
    calib = base.with_input_norm(
        Normalization(offset=(a * m.offset[0] + b,), scale=(a * m.scale[0],), source="calibration")
    )
    y2 = calib.predict(a * x + b)
    want = a * y + b if kind == "denoise_unet" else y
    np.testing.assert_allclose(y2, want, rtol=1e-3, atol=1e-2 * float(np.abs(want).max()))


def test_a_flip_ensemble_is_the_mean_and_spread_of_its_turned_back_members(
    make_package: Callable[..., ModelPackage],
) -> None:
    pkg = make_package(seed=3)
    pred = Predictor(pkg, OnnxBackend(pkg))
    rng = np.random.default_rng(0)
    x = rng.normal(300, 40, (64, 48)).astype(np.float32)
    a, b = pred.predict(x), pred.predict(np.ascontiguousarray(x[:, ::-1]))[..., ::-1]
    mean, spread = pred.predict_tta(x, 2)
    np.testing.assert_allclose(mean, (a + b) / 2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(spread, np.abs(a - b) / 2, rtol=1e-4, atol=1e-4)
    assert spread.mean() > 0  # random weights are not flip-equivariant
    with pytest.raises(ValueError, match="must be square"):
        pred.predict_tta(x, 8)
    sq = x[:48]
    mean8, spread8 = pred.predict_tta(sq, 8)
    assert mean8.shape == spread8.shape == pred.predict(sq).shape
    assert (spread8 >= 0).all() and spread8.mean() > 0


def test_reflect_border_changes_only_the_border_band_and_tiles_the_same(
    make_package: Callable[..., ModelPackage],
) -> None:
    pkg = make_package(seed=4)
    zero = Predictor(pkg, OnnxBackend(pkg))
    refl = Predictor(pkg, OnnxBackend(pkg), border="reflect")
    tiled = Predictor(pkg, OnnxBackend(pkg), border="reflect", tile=(128, 128))
    x = np.random.default_rng(1).normal(300, 40, (200, 232)).astype(np.float32)
    a, b, c = zero.predict(x), refl.predict(x), tiled.predict(x)
    assert a.shape == b.shape == c.shape == (1, 200, 232)
    np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-3)  # tiled = whole
    hy, hx = refl.halo
    inner = (slice(None), slice(hy, -hy), slice(hx, -hx))
    np.testing.assert_allclose(b[inner], a[inner], rtol=1e-5, atol=1e-3)  # the inside as before
    assert not np.allclose(b[:, :8], a[:, :8], atol=1e-2)  # the border band is another
    assert refl.describe()["border"] == "reflect"
    with pytest.raises(ValueError, match="border must be one of"):
        Predictor(pkg, OnnxBackend(pkg), border="wrap")
