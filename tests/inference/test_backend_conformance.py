"""Conformance suite for the `Backend` Protocol, subclassed per implementation.

Every backend takes float32 ``(N, C, Y, X)`` and returns float32 ``(N, C_out, Y, X)``
that agrees with the torch fp32 reference within ``TOLERANCE[backend.precision]``
of the output range, on any prepared shape (non-square, batch > 1), and stays
finite on a camera's whole 16-bit range. The GPU ones are marked ``gpu`` and skip
cleanly on a CPU machine.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from scopestream.inference.backends import (
    TOLERANCE,
    Backend,
    OnnxBackend,
    TensorRTBackend,
    TorchBackend,
)
from tests.inference.conftest import package

if TYPE_CHECKING:
    from pathlib import Path

    from scopestream.inference.package import ModelPackage

#: (N, C, Y, X) without C: square, non-square both ways, batch > 1 (multiples of 8: depth 3)
SHAPES = ((1, 32, 32), (2, 24, 40), (3, 40, 16))
NORM = (100.0, 300.0)


@pytest.fixture(scope="module", params=["denoise", "stain"])
def pkg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """A 1 → 1 denoiser and a 1 → 2 stain model, small, with real (seeded) weights."""
    root: Path = tmp_path_factory.mktemp(f"pkg-{request.param}")
    if request.param == "denoise":
        return package(root, params={"base": 8}, norm=NORM, seed=1)
    return package(
        root,
        name="stain",
        kind="stain_unet",
        params={"out_channels": 2, "base": 8},
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
        norm=NORM,
        seed=2,
    )


def reference(pkg: ModelPackage, x: np.ndarray) -> np.ndarray:
    """The torch fp32 eager output (what every backend is held to)."""
    module = pkg.build_module().eval()
    with torch.no_grad():
        out: np.ndarray = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return out


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |Δ| relative to the reference's output range."""
    return float(np.abs(got - ref).max() / max(float(np.ptp(ref)), 1e-12))


def normalized(raw: np.ndarray) -> np.ndarray:
    """Raw camera counts as the model sees them (the package's input normalization)."""
    return ((raw.astype(np.float32) - NORM[0]) / NORM[1]).astype(np.float32)


class BackendConformance:
    """What the `Predictor` relies on from any backend."""

    def make(self, pkg: ModelPackage) -> Backend:
        raise NotImplementedError

    def _input(self, pkg: ModelPackage, n: int, y: int, x: int, seed: int) -> np.ndarray:
        c = pkg.manifest.architecture.params.get("in_channels", 1)
        raw = np.random.default_rng(seed).normal(400, 80, (n, c, y, x)).clip(0, None)
        return normalized(raw)

    def _out_channels(self, pkg: ModelPackage) -> int:
        return int(pkg.manifest.architecture.params.get("out_channels", 1))

    def test_is_a_backend_and_describes_itself(self, pkg: ModelPackage) -> None:
        be = self.make(pkg)
        assert isinstance(be, Backend)
        assert be.precision in TOLERANCE
        d = be.describe()
        assert {"backend", "device", "precision"} <= set(d)
        assert (d["backend"], d["device"], d["precision"]) == (be.name, be.device, be.precision)

    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_agrees_with_the_fp32_reference(
        self, pkg: ModelPackage, shape: tuple[int, int, int]
    ) -> None:
        n, y, x = shape
        be = self.make(pkg)
        first = self._input(pkg, n, y, x, seed=0)
        be.prepare(first.shape)
        tol = TOLERANCE[be.precision]
        # twice with new data: a backend that replays a stale input (a CUDA graph fed the
        # wrong buffer, a cached result) agrees on the first call only
        for seed in (1, 2):
            inp = self._input(pkg, n, y, x, seed=seed)
            kept = inp.copy()
            out = be(inp)
            assert isinstance(out, np.ndarray)
            assert out.dtype == np.float32
            assert out.shape == (n, self._out_channels(pkg), y, x)
            assert rel_error(out, reference(pkg, kept)) <= tol
            np.testing.assert_array_equal(inp, kept)  # the caller's input is not touched

    def test_batch_items_are_independent(self, pkg: ModelPackage) -> None:
        """Item i of a batch is what item i alone gives (no batch statistics, no mixing)."""
        be = self.make(pkg)
        batch = self._input(pkg, 3, 24, 40, seed=3)
        be.prepare(batch.shape)
        together = be(batch)
        be.prepare((1, *batch.shape[1:]))
        tol = TOLERANCE[be.precision]
        for i in range(3):
            alone = be(batch[i : i + 1])
            assert rel_error(together[i : i + 1], alone) <= 2 * tol

    def test_a_result_stays_valid_after_the_next_call(self, pkg: ModelPackage) -> None:
        """The predictor keeps outputs while it predicts the next tile batch."""
        be = self.make(pkg)
        a, b = self._input(pkg, 2, 32, 32, seed=4), self._input(pkg, 2, 32, 32, seed=5)
        be.prepare(a.shape)
        out_a = be(a)
        snapshot = out_a.copy()
        be(b)
        np.testing.assert_array_equal(out_a, snapshot)

    def test_non_contiguous_input_gives_the_same_result(self, pkg: ModelPackage) -> None:
        be = self.make(pkg)
        base = self._input(pkg, 2, 40, 24, seed=6)
        strided = np.swapaxes(np.ascontiguousarray(np.swapaxes(base, 2, 3)), 2, 3)
        assert not strided.flags.c_contiguous
        np.testing.assert_array_equal(strided, base)
        be.prepare(base.shape)
        np.testing.assert_allclose(be(strided), be(base), rtol=0, atol=1e-6)

    def test_a_full_16_bit_range_stays_finite(self, pkg: ModelPackage) -> None:
        """Saturated pixels (65535, far outside training's range) give finite outputs."""
        be = self.make(pkg)
        rng = np.random.default_rng(7)
        c = pkg.manifest.architecture.params.get("in_channels", 1)
        raw = rng.integers(0, 65536, (2, c, 32, 40)).astype(np.uint16)
        raw[0, :, :8] = 65535  # a saturated band
        raw[1, :, :8] = 0
        x = normalized(raw)
        assert float(x.max()) > 200  # really the camera's range, not [0, 1]
        be.prepare(x.shape)
        out = be(x)
        assert out.dtype == np.float32
        assert out.shape == (2, self._out_channels(pkg), 32, 40)
        assert np.isfinite(out).all()
        assert rel_error(out, reference(pkg, x)) <= TOLERANCE[be.precision]


class TestOnnxBackend(BackendConformance):
    def make(self, pkg: ModelPackage) -> Backend:
        return OnnxBackend(pkg, threads=1)


class TestTorchCpuBackend(BackendConformance):
    def make(self, pkg: ModelPackage) -> Backend:
        return TorchBackend(pkg, device="cpu", threads=1)


@pytest.mark.gpu
class TestTorchCudaBackend(BackendConformance):
    def make(self, pkg: ModelPackage) -> Backend:
        return TorchBackend(pkg, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("torch_tensorrt") is None, reason="torch-tensorrt not installed"
)
class TestTensorRTBackend(BackendConformance):
    @pytest.fixture(autouse=True)
    def _cache(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SCOPESTREAM_CACHE", str(tmp_path / "trt"))

    def make(self, pkg: ModelPackage) -> Backend:
        return TensorRTBackend(pkg)
