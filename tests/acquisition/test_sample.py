"""The simulated microscope's physics: noise, optics, brightfield, motion, determinism."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import tracemalloc
from typing import TYPE_CHECKING

import numpy as np
import pytest

from scopestream.acquisition import sample
from scopestream.acquisition.sample import CameraModel, SampleModel, SimulatedMicroscope

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(scope="module")
def scope() -> SimulatedMicroscope:
    return SimulatedMicroscope((192, 192), seed=4)


def test_shot_and_read_noise_have_the_camera_model_moments(scope: SimulatedMicroscope) -> None:
    truth = scope.ground_truth(0.0, "nuclei", 0.0, 30.0).astype(np.float64)
    frames = np.stack([scope.snap(0.0, "nuclei", 0.0, 30.0) for _ in range(60)]).astype(np.float64)
    resid = frames - truth
    assert abs(resid.mean()) < 0.05
    cam = scope.camera
    photons = (truth - cam.offset_adu) / cam.gain_adu_per_e
    expected_var = (photons + cam.read_noise_e**2) * cam.gain_adu_per_e**2 + 1 / 12  # + rounding
    ratio = resid.var(axis=0).mean() / expected_var.mean()
    assert 0.93 < ratio < 1.07


def test_photon_budget_scales_with_exposure(scope: SimulatedMicroscope) -> None:
    off = scope.camera.offset_adu
    a = scope.ground_truth(0.0, "nuclei", 0.0, 10.0) - off
    b = scope.ground_truth(0.0, "nuclei", 0.0, 40.0) - off
    assert np.median(b / np.maximum(a, 1e-3)) == pytest.approx(4.0, rel=0.01)


def test_camera_clips_at_its_bit_depth() -> None:
    bright = SimulatedMicroscope((64, 64), seed=1, camera=CameraModel(bit_depth=8))
    frame = bright.snap(0.0, "brightfield", 0.0, 500.0)
    assert frame.max() == 255


def test_fluorescence_blurs_with_defocus(scope: SimulatedMicroscope) -> None:
    def sharpness(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img, axis=1)).mean() / img.mean())

    s = [sharpness(scope.ground_truth(0.0, "nuclei", z, 20.0)) for z in (0.0, 2.0, 5.0)]
    assert s[0] > s[1] > s[2]
    total = [scope.ground_truth(0.0, "nuclei", z, 20.0).sum() for z in (0.0, 5.0)]
    assert total[1] == pytest.approx(total[0], rel=0.02)  # blur conserves light


def test_brightfield_is_a_weak_phase_object(scope: SimulatedMicroscope) -> None:
    def contrast(z: float) -> float:
        img = scope.ground_truth(0.0, "brightfield", z, 5.0)
        return float(img.std() / img.mean())

    # nearly invisible in focus, contrast grows with defocus on both sides ...
    assert contrast(0.0) < 0.5 * contrast(3.0)
    assert contrast(0.0) < 0.5 * contrast(-3.0)
    # ... and flips sign through focus (transport of intensity)
    above = scope.ground_truth(0.0, "brightfield", 3.0, 5.0)
    below = scope.ground_truth(0.0, "brightfield", -3.0, 5.0)
    focus = scope.ground_truth(0.0, "brightfield", 0.0, 5.0)
    r = np.corrcoef((above - focus).ravel(), (below - focus).ravel())[0, 1]
    assert r < -0.5


@pytest.mark.parametrize("kind", ["phase", "absorb", "nuclei", "membrane"])
@pytest.mark.parametrize(("seed", "shape"), [(4, (192, 192)), (1, (256, 320))])
def test_the_sample_is_periodic_with_no_seam_at_its_edge(
    kind: str, seed: int, shape: tuple[int, int]
) -> None:
    """Fields of a plate or grid wrap around the sample's edge: no step across it is
    larger than the largest between neighbouring pixels inside. Cells cut at the edge
    (a dome of optical path ending in a cliff) made brightfield show a hard line and
    half cells there: the step across was 2.1–2.5× the largest inside."""
    scope = SimulatedMicroscope(shape, seed=seed)
    kf = scope._keyframe(0)
    m = sum(np.fft.irfft2(ft, s=scope.canvas) for ft in scope._layers(kf, kind))
    inside = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
    across = max(np.abs(m[0] - m[-1]).max(), np.abs(m[:, 0] - m[:, -1]).max())
    assert across <= inside


def test_stains_show_different_structures(scope: SimulatedMicroscope) -> None:
    nuc = scope.ground_truth(0.0, "nuclei", 0.0, 20.0)
    mem = scope.ground_truth(0.0, "membrane", 0.0, 20.0)
    r = np.corrcoef(nuc.ravel(), mem.ravel())[0, 1]
    assert r < 0.3
    sig = nuc - nuc.min()
    assert 0.05 < (sig > 0.5 * sig.max()).mean() < 0.5  # nuclei cover a real fraction


def test_cells_move_and_divide_over_time(scope: SimulatedMicroscope) -> None:
    a = scope.ground_truth(0.0, "nuclei", 0.0, 20.0)
    near = scope.ground_truth(10.0, "nuclei", 0.0, 20.0)
    far = scope.ground_truth(200.0, "nuclei", 0.0, 20.0)
    r_near = np.corrcoef(a.ravel(), near.ravel())[0, 1]
    r_far = np.corrcoef(a.ravel(), far.ravel())[0, 1]
    assert r_near > 0.8 > r_far
    dividing = SimulatedMicroscope((192, 192), seed=4, sample=SampleModel(mitotic_fraction=0.5))
    times = np.linspace(0, dividing.sample.cycle_s, 60)
    counts = [len(dividing.cell_state(t)["x"]) for t in times]
    assert max(counts) > min(counts)  # mitotic cells split into two daughters


def test_same_seed_same_frames_other_seed_other_sample() -> None:
    a = SimulatedMicroscope((64, 64), seed=7)
    b = SimulatedMicroscope((64, 64), seed=7)
    c = SimulatedMicroscope((64, 64), seed=8)
    np.testing.assert_array_equal(a.snap(1.0, "nuclei"), b.snap(1.0, "nuclei"))
    assert not np.array_equal(a.ground_truth(1.0, "nuclei"), c.ground_truth(1.0, "nuclei"))


def test_real_nuclei_volume_can_texture_the_sample() -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, (5, 64, 64)).astype(np.uint16)

    def nuclei(volume: np.ndarray | None) -> np.ndarray:
        return SimulatedMicroscope((96, 96), seed=0, nuclei_volume=volume).ground_truth(
            0.0, "nuclei"
        )

    textured = nuclei(vol)
    np.testing.assert_array_equal(textured, nuclei(vol.copy()))  # the volume, not chance
    # the same cells with the synthetic texture, or with another volume, look different
    assert not np.allclose(textured, nuclei(None))
    assert not np.allclose(textured, nuclei(vol[:, ::-1, ::-1].copy()))


def test_unknown_channel_is_named(scope: SimulatedMicroscope) -> None:
    with pytest.raises(ValueError, match="no channel 'gfp'"):
        scope.snap(0.0, "gfp")


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Threads take turns every 10 µs (not 5 ms), so they interleave inside cache updates."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("switch_often")
def test_camera_and_truth_threads_get_the_single_threaded_frames() -> None:
    """The camera snaps while a truth writer reads the truth of its frames (``--sim-truth``)."""
    plane = (0.0, "nuclei", 0.0, 5.0)  # the truth writer's frame: read over and over
    # the camera's frames: each a new cache entry, evicting the one before (the truth's too)
    frames = [(0.0, "nuclei", z, 5.0) for z in (0.5, 1.0)] * 1000

    def make() -> SimulatedMicroscope:
        return SimulatedMicroscope((16, 16), seed=3, cache_size=1)

    ref = make()
    want_truth = ref.ground_truth(*plane)
    ref = make()
    want_frames = [ref.snap(*k) for k in frames]

    scope = make()
    errors: list[BaseException] = []
    got_frames: list[np.ndarray] = []
    wrong_truth: list[np.ndarray] = []
    done = threading.Event()

    def camera() -> None:
        try:
            got_frames.extend(scope.snap(*k) for k in frames)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    def truth() -> None:
        try:
            while not done.is_set():
                got = scope.ground_truth(*plane)
                if not np.array_equal(got, want_truth):
                    wrong_truth.append(got)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=camera), threading.Thread(target=truth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not wrong_truth, len(wrong_truth)
    assert len(got_frames) == len(frames)
    for got, want in zip(got_frames, want_frames, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_sample_too_large_for_memory_is_refused_before_allocating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    need = sample.memory_needed_bytes((4096, 4096))
    monkeypatch.setattr(sample, "available_memory_bytes", lambda: need)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"4096×4096 px needs about .* GiB \((\d+) bytes\)"):
            SimulatedMicroscope((4096, 4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # not one frame of it was allocated
    with pytest.raises(ValueError, match=rf"\({need} bytes\) is available \(at most 80%"):
        SimulatedMicroscope((4096, 4096))
    SimulatedMicroscope((64, 64))  # small samples still fit


def test_the_memory_estimate_covers_what_the_simulator_allocates() -> None:
    tracemalloc.start()
    try:
        scope = SimulatedMicroscope((128, 160), seed=1, cache_size=6)
        for t in range(4):  # every kind of map, more images than the cache keeps
            for ch in ("brightfield", "nuclei", "membrane"):
                for z in (0.0, 2.0):
                    scope.snap(t * 10.0, ch, z, 10.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= sample.memory_needed_bytes((128, 160), cache_size=6)


def test_run_refuses_a_simulated_shape_too_large_for_memory(tmp_path: Path) -> None:
    """What a user sees: a usage error naming the memory, no MemoryError traceback."""

    def limit_memory() -> None:  # like ``ulimit -v``: no machine has enough for this shape
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY))

    r = subprocess.run(
        [
            sys.executable, "-m", "scopestream", "run", "--source", "sim",
            "--shape", "16000x16000", "--frames", "1", "--model", "none",
            "--out", str(tmp_path / "huge.ome.zarr"),
        ],
        capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
        env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "16000×16000 px needs about" in r.stderr and "is available" in r.stderr
