"""Every backend present agrees with the torch fp32 reference within its stated tolerance."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from scopestream.inference.backends import (
    TOLERANCE,
    BackendError,
    OnnxBackend,
    TensorRTBackend,
    TorchBackend,
    available_backends,
    make_backend,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.inference.package import ModelPackage


@pytest.fixture(params=["denoise", "stain"])
def pkg(request: pytest.FixtureRequest, make_package: Callable[..., ModelPackage]) -> ModelPackage:
    if request.param == "denoise":
        return make_package()
    return make_package(
        name="stain",
        kind="stain_unet",
        params={"out_channels": 2, "base": 8},
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
    )


def _reference(pkg: ModelPackage, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return pkg.build_module()(torch.from_numpy(x)).numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / (ref.max() - ref.min()))


def test_onnxruntime_agrees_with_torch_fp32(pkg: ModelPackage) -> None:
    x = np.random.default_rng(0).random((2, 1, 96, 128), dtype=np.float32)
    be = OnnxBackend(pkg, threads=2)
    be.prepare(x.shape)
    assert _rel(be(x), _reference(pkg, x)) <= TOLERANCE["fp32"]


def test_torch_cpu_is_the_reference(pkg: ModelPackage) -> None:
    x = np.random.default_rng(1).random((1, 1, 64, 64), dtype=np.float32)
    be = TorchBackend(pkg, device="cpu")
    be.prepare(x.shape)
    assert _rel(be(x), _reference(pkg, x)) <= TOLERANCE["fp32"]
    assert be.describe() == {"backend": "torch", "device": "cpu", "precision": "fp32"}


@pytest.mark.gpu
def test_torch_cuda_fp16_with_cuda_graphs(pkg: ModelPackage) -> None:
    x = np.random.default_rng(2).random((2, 1, 256, 256), dtype=np.float32)
    be = TorchBackend(pkg, device="cuda")
    be.prepare(x.shape)
    assert be.describe()["cuda_graphs"] is True
    for _ in range(2):  # replays the graph with new data each time
        x = np.random.default_rng(3).random(x.shape, dtype=np.float32)
        assert _rel(be(x), _reference(pkg, x)) <= TOLERANCE["fp16"]


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("torch_tensorrt") is None, reason="torch-tensorrt not installed"
)
def test_tensorrt_fp16_and_engine_cache(pkg: ModelPackage, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(4).random((1, 1, 256, 256), dtype=np.float32)
    be = TensorRTBackend(pkg, cache_dir=tmp_path)
    be.prepare(x.shape)
    assert be.cache_hit is False
    assert _rel(be(x), _reference(pkg, x)) <= TOLERANCE["fp16"]
    again = TensorRTBackend(pkg, cache_dir=tmp_path)
    again.prepare(x.shape)
    assert again.cache_hit is True  # compiled once per shape, reused across runs


def test_auto_picks_onnxruntime_on_a_cpu_machine(pkg: ModelPackage) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert make_backend(pkg, "auto").name == "onnxruntime"
    assert available_backends() == ["torch", "onnxruntime"]


def test_unavailable_backends_say_how_to_get_them(pkg: ModelPackage) -> None:
    if importlib.util.find_spec("torch_tensorrt") is None:
        with pytest.raises(BackendError, match=r"pip install 'scopestream\[tensorrt\]'"):
            make_backend(pkg, "tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no GPU"):
            TorchBackend(pkg, device="cuda")
    with pytest.raises(BackendError, match="unknown backend 'cuda-magic'"):
        make_backend(pkg, "cuda-magic")


@pytest.mark.gpu
def test_raw_uint16_upload_matches_the_reference(pkg: ModelPackage) -> None:
    from scopestream.inference.predictor import Predictor

    raw = np.random.default_rng(5).integers(0, 4096, (256, 256), dtype=np.uint16)
    if pkg.manifest.inputs != ("*",):
        pytest.skip("the denoiser is enough for this path")
    gpu = Predictor(pkg, TorchBackend(pkg, device="cuda"))
    cpu = Predictor(pkg, TorchBackend(pkg, device="cpu"))
    assert gpu._fused(raw)
    a, b = gpu.predict(raw), cpu.predict(raw)
    assert np.abs(a - b).max() / np.ptp(b) <= TOLERANCE["fp16"]


def test_raw_path_on_cpu_equals_the_normal_path(pkg: ModelPackage) -> None:
    """The fused entry point gives the same numbers as normalize → predict → denormalize."""
    from scopestream.inference.predictor import Predictor

    if pkg.manifest.inputs != ("*",):
        pytest.skip("the denoiser is enough for this path")
    be = TorchBackend(pkg, device="cpu")
    raw = np.random.default_rng(6).integers(0, 4096, (1, 64, 64), dtype=np.uint16)
    m = pkg.manifest
    fused = be.predict_raw(
        raw,
        (m.input_norm.offset[0], m.input_norm.scale[0]),
        (np.array(m.output_norm.offset, np.float32), np.array(m.output_norm.scale, np.float32)),
    )
    normal = Predictor(pkg, be).predict(raw[0])
    np.testing.assert_allclose(fused, normal, rtol=1e-5, atol=1e-3)
