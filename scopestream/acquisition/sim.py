"""A simulated fluorescence microscope: a phantom of cells, optics blur, camera noise.

The sample (nuclei with texture in dimmer cytoplasm) is rendered once onto a
canvas larger than the field of view and blurred by a Gaussian PSF; frames are
windows of it that drift slowly, turned into photons by the exposure and
corrupted by shot noise (Gaussian approximation of Poisson, exact in variance),
read noise, gain, offset and the camera's bit depth. The expensive parts (the
phantom, its per-pixel noise sigma and a pool of unit-normal noise fields) are
precomputed, so a frame costs a few array passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.acquisition.base import ThreadedSource
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scopestream.streaming.frame import FrameMeta

_MARGIN = 32


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur through the FFT (precompute only)."""
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(img) * kernel, s=img.shape).astype(np.float32)


def cell_phantom(
    shape: tuple[int, int], rng: np.random.Generator, cell_px: float = 28.0
) -> np.ndarray:
    """A 2D fluorescence phantom in [0, 1]: textured nuclei in a dim cytoplasm."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros(shape, np.float32)
    n_cells = max(1, int(h * w / (cell_px * cell_px * 3.0)))
    texture = _gaussian_blur(rng.standard_normal(shape).astype(np.float32), 1.5)
    texture /= np.abs(texture).max() + 1e-6
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.25, 0.45) * cell_px
        ecc = rng.uniform(0.7, 1.3)
        ang = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - 2 * r, 0)), int(min(cy + 2 * r + 1, h))
        x0, x1 = int(max(cx - 2 * r, 0)), int(min(cx + 2 * r + 1, w))
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dy * np.cos(ang) + dx * np.sin(ang)) / (r * ecc)
        v = (-dy * np.sin(ang) + dx * np.cos(ang)) * ecc / r
        d2 = u * u + v * v
        brightness = rng.uniform(0.5, 1.0)
        cyto = 0.12 * brightness * (d2 < 3.2)
        nucleus = brightness * (d2 < 1.0) * (0.8 + 0.35 * texture[y0:y1, x0:x1])
        img[y0:y1, x0:x1] = np.maximum(img[y0:y1, x0:x1], np.maximum(cyto, nucleus))
    img = _gaussian_blur(img, 1.2)
    img -= img.min()
    img /= img.max() + 1e-6
    return img


class SimulatedSource(ThreadedSource):
    """Simulated fluorescence microscope (single channel, 2D) with known ground truth.

    Parameters
    ----------
    shape
        Frame size ``(Y, X)``.
    n_frames
        Frames to produce; ``None`` runs until stopped.
    fps
        Frame rate; 0 = as fast as the pipeline takes frames.
    peak_photons
        Expected photons at the brightest pixel for one frame.
    """

    kind = "sim"

    def __init__(
        self,
        shape: tuple[int, int] = (512, 512),
        n_frames: int | None = 100,
        *,
        fps: float = 0.0,
        seed: int = 0,
        peak_photons: float = 200.0,
        background_photons: float = 5.0,
        read_noise_e: float = 1.6,
        gain_adu_per_e: float = 1.0,
        offset_adu: float = 100.0,
        bit_depth: int = 12,
        exposure_ms: float = 10.0,
        pixel_size_um: float = 0.65,
        drift_px_per_frame: float = 0.25,
        noise_pool: int = 6,
    ) -> None:
        super().__init__(fps=fps)
        if n_frames is not None and n_frames < 1:
            raise ValueError(f"n_frames must be positive, got {n_frames}")
        self.n_frames = n_frames
        self.seed = seed
        self.params: dict[str, Any] = {
            "peak_photons": peak_photons,
            "background_photons": background_photons,
            "read_noise_e": read_noise_e,
            "gain_adu_per_e": gain_adu_per_e,
            "offset_adu": offset_adu,
            "bit_depth": bit_depth,
            "exposure_ms": exposure_ms,
            "drift_px_per_frame": drift_px_per_frame,
        }
        self.info = StreamInfo(
            frame_shape=(int(shape[0]), int(shape[1])),
            dtype="uint16",
            n_t=n_frames,
            channel_names=("fluorescence",),
            pixel_size_um=pixel_size_um,
            interval_s=1.0 / fps if fps > 0 else exposure_ms / 1000.0,
        )
        rng = np.random.default_rng(seed)
        h, w = self.info.frame_shape
        canvas = (h + 2 * _MARGIN, w + 2 * _MARGIN)
        self._photons = (peak_photons * cell_phantom(canvas, rng) + background_photons).astype(
            np.float32
        )
        self._sigma = np.sqrt(self._photons + read_noise_e**2).astype(np.float32)
        self._noise = [
            rng.standard_normal(canvas, dtype=np.float32) for _ in range(max(1, noise_pool))
        ]
        self._rng = rng

    def describe(self) -> dict[str, Any]:
        """Source description with the camera and sample parameters."""
        return {**super().describe(), "seed": self.seed, "n_frames": self.n_frames, **self.params}

    def _offset(self, i: int) -> tuple[int, int]:
        """Integer drift of frame ``i`` (a slow deterministic loop within the margin)."""
        a = self.params["drift_px_per_frame"] * i / (_MARGIN - 1)
        return round((_MARGIN - 1) * float(np.sin(a))), round(
            (_MARGIN - 1) * float(np.sin(0.7 * a))
        )

    def ground_truth(self, t: int) -> np.ndarray:
        """Noise-free expected signal of frame ``t`` in ADU (float32)."""
        oy, ox = self._offset(t)
        h, w = self.info.frame_shape
        sl = np.s_[_MARGIN + oy : _MARGIN + oy + h, _MARGIN + ox : _MARGIN + ox + w]
        p = self.params
        gt: np.ndarray = self._photons[sl] * p["gain_adu_per_e"] + p["offset_adu"]
        return gt.astype(np.float32)

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Noisy frames, drifting slowly."""
        h, w = self.info.frame_shape
        p = self.params
        top = float(2 ** p["bit_depth"] - 1)
        buf = np.empty((h, w), np.float32)
        out = np.empty((h, w), np.uint16)
        i = 0
        while self.n_frames is None or i < self.n_frames:
            oy, ox = self._offset(i)
            sl = np.s_[_MARGIN + oy : _MARGIN + oy + h, _MARGIN + ox : _MARGIN + ox + w]
            noise = self._noise[int(self._rng.integers(len(self._noise)))]
            ny, nx = self._rng.integers(0, 2 * _MARGIN, size=2)
            np.multiply(self._sigma[sl], noise[ny : ny + h, nx : nx + w], out=buf)
            buf += self._photons[sl]
            buf *= p["gain_adu_per_e"]
            buf += p["offset_adu"] + 0.5
            np.clip(buf, 0, top, out=buf)
            out[...] = buf
            yield out, make_meta(t=i, exposure_ms=p["exposure_ms"], source=self.kind)
            i += 1
