"""The physics of the simulated microscope: a living cell sample, optics and a camera.

Sample
    A monolayer of cells, each with a nucleus (a textured ellipsoid at height
    ``z_um``) inside a larger cell body. Cells crawl (a slow velocity each), the
    stage drifts, and a few cells are in mitosis (the nucleus condenses and
    splits into two daughters that move apart). The state at any simulated time
    is a pure function of the seed and that time.
Optics
    Widefield: a cell at height ``z`` seen with focus at ``z_f`` is blurred by a
    Gaussian whose width grows with ``|z - z_f|`` (geometric defocus for the
    objective's NA), conserving its light. Cells are grouped into a few depth
    layers so a focal plane costs one inverse FFT.
Brightfield
    Transmitted light through a weak phase and absorption object: cells are thin
    phase objects (thicker at the nucleus), nuclei absorb a little. By the
    transport-of-intensity equation the image is
    ``I = I0 (1 - 2a - dz λ/(2π) ∇²φ)``: nearly invisible in focus, with
    contrast that appears and flips sign with defocus, as in a real brightfield.
Camera
    Photons = brightness × exposure; shot noise with the exact Poisson mean and
    variance (Gaussian approximation, exact in both moments; real Poisson draws
    are 20× too slow at 2048²), read noise, gain, offset and the bit depth's
    clipping. The noise-free mean of every frame is its ground truth.

Rendering a new state of the sample costs a few FFTs; it is done once per
``keyframe_s`` of simulated time and cached per (keyframe, channel, focus,
exposure); a frame then costs four array passes (window, noise, add, clip).
The caches are shared by the camera thread and a ground-truth writer: a missing
entry is rendered once, outside the caches' lock, while other entries are served.

Memory
    What the caches hold when full is estimated before anything is allocated
    (`memory_needed_bytes`); a sample that would need more than
    `MEMORY_FRACTION` of the memory available (`available_memory_bytes`) is
    refused with a `ValueError`, instead of a ``MemoryError`` part-way.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

MARGIN_PX = 32
N_LAYERS = 3
#: rendered states of the sample kept (the camera's and a ground-truth writer one behind)
KEYFRAMES = 2
#: refuse a simulated sample that needs more than this fraction of the memory available
MEMORY_FRACTION = 0.8
#: float32 canvases of temporaries while one image is rendered (FFT products, photons, sigma)
_RENDER_WORK_CANVASES = 16

K = TypeVar("K", bound="Hashable")
V = TypeVar("V")


class _RenderCache(Generic[K, V]):
    """A bounded cache shared by threads; a missing entry is rendered once, outside the lock.

    ``lru`` evicts the least recently used entry, otherwise the oldest one.
    """

    def __init__(self, size: int, *, lru: bool) -> None:
        self.size, self.lru = max(1, size), lru
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._rendering: dict[K, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._items)

    def _hit(self, key: K) -> V | None:
        """The cached entry, or None (call with ``_lock`` held)."""
        hit = self._items.get(key)
        if hit is not None and self.lru:
            self._items.move_to_end(key)
        return hit

    def get(self, key: K, render: Callable[[], V]) -> V:
        """The entry for ``key``, rendered by ``render`` if it is not cached."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            gate = self._rendering.setdefault(key, threading.Lock())
        # renders of other keys (the other thread's) go on meanwhile; one of this key waits
        with gate:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
            try:
                value = render()
                with self._lock:
                    self._items[key] = value
                    self._items.move_to_end(key)
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
            finally:
                with self._lock:
                    if self._rendering.get(key) is gate:
                        del self._rendering[key]
        return value


def memory_needed_bytes(
    shape: tuple[int, int],
    *,
    noise_pool: int = 4,
    cache_size: int = 12,
    sample: SampleModel | None = None,
    pixel_size_um: float = 0.325,
) -> int:
    """Bytes a `SimulatedMicroscope` of frames ``shape`` holds at most (its caches full)."""
    h, w = int(shape[0]) + 2 * MARGIN_PX, int(shape[1]) + 2 * MARGIN_PX
    canvas = h * w * 4  # one float32 image of the canvas
    spectrum = h * (w // 2 + 1) * 8  # its complex64 real FFT
    maps_per_keyframe = 3 * N_LAYERS + 1  # nuclei, membrane, phase per layer; absorption
    s = sample or SampleModel()
    area_um2 = h * w * pixel_size_um**2
    cells = max(1, int(s.density * area_um2 / (np.pi * s.cell_radius_um**2)))
    return int(
        max(1, noise_pool) * canvas
        + max(1, cache_size) * 2 * canvas  # (mean, sigma) per cached image
        + KEYFRAMES * maps_per_keyframe * spectrum
        + _RENDER_WORK_CANVASES * canvas
        + int(shape[0]) * int(shape[1]) * 4  # the frame buffer
        + cells * 8 * 16 * (1 + 2 * KEYFRAMES)  # the cells and their state per keyframe
    )


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _address_space_left() -> int | None:
    """Room under this process's address-space limit (``ulimit -v``), if it has one."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            used = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    except (OSError, ValueError, IndexError, StopIteration):
        used = 0
    return max(0, int(soft) - used)


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: ``MemAvailable``, or less under ``ulimit -v``.

    ``None`` where neither can be read (then nothing is checked).
    """
    known = [v for v in (_meminfo_available(), _address_space_left()) if v is not None]
    return min(known) if known else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def check_memory(
    shape: tuple[int, int],
    *,
    noise_pool: int = 4,
    cache_size: int = 12,
    sample: SampleModel | None = None,
    pixel_size_um: float = 0.325,
) -> None:
    """Raise ``ValueError`` if a simulated sample of ``shape`` would not fit in memory."""
    need = memory_needed_bytes(
        shape,
        noise_pool=noise_pool,
        cache_size=cache_size,
        sample=sample,
        pixel_size_um=pixel_size_um,
    )
    avail = available_memory_bytes()
    if avail is not None and need > MEMORY_FRACTION * avail:
        raise ValueError(
            f"a simulated sample of {shape[0]}×{shape[1]} px needs about {_gib(need)} "
            f"({need} bytes) of memory, and {_gib(avail)} ({avail} bytes) is available "
            f"(at most {MEMORY_FRACTION:.0%} of it may be used): choose a smaller shape"
        )


@dataclass(frozen=True)
class ChannelModel:
    """One light path of the simulated microscope."""

    name: str
    kind: Literal["fluorescence", "brightfield"]
    label: Literal["nuclei", "membrane", "none"] = "none"
    photons_per_ms: float = 20.0
    wavelength_um: float = 0.52


DEFAULT_CHANNELS: tuple[ChannelModel, ...] = (
    ChannelModel("brightfield", "brightfield", photons_per_ms=60.0, wavelength_um=0.55),
    ChannelModel("nuclei", "fluorescence", "nuclei", photons_per_ms=20.0, wavelength_um=0.46),
    ChannelModel("membrane", "fluorescence", "membrane", photons_per_ms=12.0, wavelength_um=0.61),
)


@dataclass(frozen=True)
class CameraModel:
    """A scientific CMOS camera."""

    bit_depth: int = 12
    offset_adu: float = 100.0
    gain_adu_per_e: float = 1.0
    read_noise_e: float = 1.6
    background_photons_per_ms: float = 0.3

    @property
    def max_adu(self) -> int:
        """Largest value the camera reports."""
        return int(2**self.bit_depth - 1)


@dataclass(frozen=True)
class OpticsModel:
    """Objective and sampling."""

    pixel_size_um: float = 0.325
    na: float = 0.75
    immersion_n: float = 1.0

    def blur_sigma_px(self, dz_um: float, wavelength_um: float) -> float:
        """Gaussian width (px) of a point at defocus ``dz_um``: diffraction + geometric."""
        s0 = 0.21 * wavelength_um / self.na
        half_angle = np.arcsin(min(self.na / self.immersion_n, 0.99))
        geo = 0.5 * abs(dz_um) * np.tan(half_angle)
        return float(np.hypot(s0, geo) / self.pixel_size_um)


@dataclass(frozen=True)
class SampleModel:
    """Density and behaviour of the cells."""

    cell_radius_um: float = 9.0
    nucleus_radius_um: float = 4.5
    density: float = 0.55  # fraction of area covered by cells
    z_spread_um: float = 1.0  # sd of nucleus heights around the focal reference
    speed_um_per_s: float = 0.05
    drift_um_per_s: float = 0.02
    mitotic_fraction: float = 0.06
    cycle_s: float = 600.0
    keyframe_s: float = 10.0  # cells move ~1.5 px between renders


@dataclass
class _Cells:
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    r_cell: np.ndarray
    r_nuc: np.ndarray
    ecc: np.ndarray
    angle: np.ndarray
    bright: np.ndarray
    phase0: np.ndarray
    mitotic: np.ndarray
    tex_off: np.ndarray


def _gauss_kernel_ft(shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    k: np.ndarray = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy * fy + fx * fx))
    return k.astype(np.float32)


def _laplacian_ft(shape: tuple[int, int]) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    lap: np.ndarray = -((2 * np.pi) ** 2) * (fy * fy + fx * fx)
    return lap.astype(np.float32)


@dataclass
class _Keyframe:
    """FFTs of the sample's depth layers at one moment, rendered per kind on demand."""

    index: int
    state: dict[str, np.ndarray]
    layer_of: np.ndarray
    layer_z: np.ndarray
    maps: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: held while a kind of map is rendered (the camera and truth threads may both want it)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class SimulatedMicroscope:
    """Renders frames and their ground truth for (time, channel, focus, exposure).

    Parameters
    ----------
    shape
        Camera frame size ``(Y, X)``.
    channels
        Light paths; their ``name`` s are what a plan's channels refer to.
    nuclei_volume
        Optional real nuclei volume (z, y, x): its maximum projection replaces
        the synthetic nucleus texture (e.g. napari's ``nuclei.tif``).
    """

    def __init__(
        self,
        shape: tuple[int, int] = (512, 512),
        *,
        seed: int = 0,
        channels: tuple[ChannelModel, ...] = DEFAULT_CHANNELS,
        camera: CameraModel | None = None,
        optics: OpticsModel | None = None,
        sample: SampleModel | None = None,
        nuclei_volume: np.ndarray | None = None,
        noise_pool: int = 4,
        cache_size: int = 12,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.seed = seed
        self.channels = {c.name: c for c in channels}
        self.camera = camera or CameraModel()
        self.optics = optics or OpticsModel()
        self.sample = sample or SampleModel()
        self.canvas = (self.shape[0] + 2 * MARGIN_PX, self.shape[1] + 2 * MARGIN_PX)
        # before the first array: a huge shape is a clear error, not a MemoryError part-way
        check_memory(
            self.shape,
            noise_pool=noise_pool,
            cache_size=cache_size,
            sample=self.sample,
            pixel_size_um=self.optics.pixel_size_um,
        )
        rng = np.random.default_rng(seed)
        self._cells = self._make_cells(rng)
        self._texture = self._make_texture(rng, nuclei_volume)
        self._noise = [
            rng.standard_normal(self.canvas, dtype=np.float32) for _ in range(max(1, noise_pool))
        ]
        self._noise_rng = np.random.default_rng(seed + 1)
        # oldest out: a truth writer one keyframe behind the camera keeps its keyframe
        self._keyframes: _RenderCache[int, _Keyframe] = _RenderCache(KEYFRAMES, lru=False)
        self._means: _RenderCache[tuple[int, str, float, float], tuple[np.ndarray, np.ndarray]] = (
            _RenderCache(cache_size, lru=True)
        )
        self._cache_size = cache_size
        self._buf = np.empty(self.shape, np.float32)
        self._snap_lock = threading.Lock()  # the noise stream and the frame buffer

    # -- the sample ----------------------------------------------------------
    def _make_cells(self, rng: np.random.Generator) -> _Cells:
        s = self.sample
        px = self.optics.pixel_size_um
        area_um2 = self.canvas[0] * self.canvas[1] * px * px
        n = max(1, int(s.density * area_um2 / (np.pi * s.cell_radius_um**2)))
        # jittered grid so cells tile the dish without piling up
        cols = max(1, int(np.sqrt(n * self.canvas[1] / self.canvas[0])))
        rows = max(1, -(-n // cols))
        gy, gx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        h_um, w_um = self.canvas[0] * px, self.canvas[1] * px
        x = ((gx.ravel() + 0.5 + rng.uniform(-0.35, 0.35, rows * cols)) * w_um / cols)[:n]
        y = ((gy.ravel() + 0.5 + rng.uniform(-0.35, 0.35, rows * cols)) * h_um / rows)[:n]
        ang = rng.uniform(0, 2 * np.pi, n)
        speed = rng.rayleigh(s.speed_um_per_s, n)
        return _Cells(
            x=x,
            y=y,
            z=rng.normal(0.0, s.z_spread_um, n),
            vx=speed * np.cos(ang),
            vy=speed * np.sin(ang),
            r_cell=s.cell_radius_um * rng.uniform(0.8, 1.2, n),
            r_nuc=s.nucleus_radius_um * rng.uniform(0.75, 1.25, n),
            ecc=rng.uniform(0.75, 1.3, n),
            angle=rng.uniform(0, np.pi, n),
            bright=rng.uniform(0.55, 1.0, n),
            phase0=rng.uniform(0, 1, n),
            mitotic=rng.uniform(0, 1, n) < s.mitotic_fraction,
            tex_off=rng.integers(0, 4096, (n, 2)),
        )

    def _make_texture(self, rng: np.random.Generator, volume: np.ndarray | None) -> np.ndarray:
        """Chromatin-like texture (nucleoli, speckles) in [-1, 1], 256×256, tiled."""
        if volume is not None:
            proj = np.asarray(volume, np.float32).max(axis=0)
            proj = proj[:256, :256]
            proj = (proj - proj.mean()) / (np.abs(proj - proj.mean()).max() + 1e-6)
            # tiled, not zero-padded: every nucleus shows the volume, however small it is
            reps = (-(-256 // proj.shape[0]), -(-256 // proj.shape[1]))
            tex: np.ndarray = np.ascontiguousarray(np.tile(proj, reps)[:256, :256], np.float32)
            return tex
        noise = rng.standard_normal((256, 256)).astype(np.float32)
        fine = np.fft.irfft2(np.fft.rfft2(noise) * _gauss_kernel_ft((256, 256), 1.2), s=(256, 256))
        coarse = np.fft.irfft2(
            np.fft.rfft2(noise[::-1]) * _gauss_kernel_ft((256, 256), 4.0), s=(256, 256)
        )
        tex = 0.6 * fine / (np.abs(fine).max() + 1e-6) - 0.4 * coarse / (
            np.abs(coarse).max() + 1e-6
        )
        out: np.ndarray = tex.astype(np.float32)
        return out

    def cell_state(self, t_s: float) -> dict[str, np.ndarray]:
        """Where the cells are at simulated time ``t_s`` (µm), daughters of mitoses included."""
        c, s = self._cells, self.sample
        px = self.optics.pixel_size_um
        w_um, h_um = self.canvas[1] * px, self.canvas[0] * px
        x = np.mod(c.x + c.vx * t_s, w_um)
        y = np.mod(c.y + c.vy * t_s, h_um)
        phase = np.mod(c.phase0 + t_s / s.cycle_s, 1.0)
        # mitosis in the last 12 % of the cycle: condense, then split along the long axis
        split = np.where(c.mitotic, np.clip((phase - 0.88) / 0.12, 0, 1), 0.0)
        sep = split * 1.3 * c.r_nuc
        dx, dy = np.cos(c.angle) * sep, np.sin(c.angle) * sep
        dividing = split > 0
        r_scale = np.where(dividing, 0.72, 1.0)
        bright = c.bright * np.where(c.mitotic & (phase > 0.8), 1.6, 1.0)
        idx = np.concatenate([np.arange(len(x)), np.flatnonzero(dividing)])
        xs = np.concatenate([x + np.where(dividing, dx, 0), (x - dx)[dividing]])
        ys = np.concatenate([y + np.where(dividing, dy, 0), (y - dy)[dividing]])
        return {
            "x": xs,
            "y": ys,
            "z": c.z[idx],
            "r_nuc": (c.r_nuc * r_scale)[idx],
            "r_cell": (c.r_cell * np.where(dividing, 0.75, 1.0))[idx],
            "ecc": c.ecc[idx],
            "angle": c.angle[idx],
            "bright": bright[idx],
            "tex_off": c.tex_off[idx],
        }

    # -- rendering -----------------------------------------------------------
    def keyframe_index(self, t_s: float) -> int:
        """Which rendered state of the sample a frame at ``t_s`` shows."""
        return int(np.floor(t_s / self.sample.keyframe_s))

    def _new_keyframe(self, k: int) -> _Keyframe:
        st = self.cell_state(k * self.sample.keyframe_s)
        edges = np.linspace(st["z"].min() - 1e-3, st["z"].max() + 1e-3, N_LAYERS + 1)
        layer_of = np.clip(np.searchsorted(edges, st["z"]) - 1, 0, N_LAYERS - 1)
        layer_z = np.array(
            [
                st["z"][layer_of == i].mean() if np.any(layer_of == i) else 0.0
                for i in range(N_LAYERS)
            ]
        )
        return _Keyframe(index=k, state=st, layer_of=layer_of, layer_z=layer_z)

    def _layers(self, kf: _Keyframe, kind: str) -> list[np.ndarray]:
        """FFTs of one kind of map per depth layer: 'nuclei', 'membrane', 'phase', 'absorb'."""
        with kf.lock:
            if kind not in kf.maps:
                kf.maps[kind] = self._render_layers(kf, kind)
            return kf.maps[kind]

    def _render_layers(self, kf: _Keyframe, kind: str) -> list[np.ndarray]:
        st, layer_of = kf.state, kf.layer_of
        px = self.optics.pixel_size_um
        h, w = self.canvas
        n_maps = 1 if kind == "absorb" else N_LAYERS
        maps = np.zeros((n_maps, h, w), np.float32)
        tex = self._texture
        for i in range(len(st["x"])):
            cx, cy = st["x"][i] / px, st["y"][i] / px
            rc, rn = st["r_cell"][i] / px, st["r_nuc"][i] / px
            ecc, ang = st["ecc"][i], st["angle"][i]
            reach = (rc if kind in ("membrane", "phase") else rn) * max(ecc, 1 / ecc) + 4
            # the sample is periodic (a torus: any stage position shows a field): a cell
            # across the canvas edge goes on at the other side, never cut in half
            reach = min(reach, (min(h, w) - 2) / 2)
            y0, y1 = int(np.floor(cy - reach)), int(np.floor(cy + reach)) + 1
            x0, x1 = int(np.floor(cx - reach)), int(np.floor(cx + reach)) + 1
            yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
            xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
            u = (yy * np.cos(ang) + xx * np.sin(ang)) / ecc
            v = (-yy * np.sin(ang) + xx * np.cos(ang)) * ecc
            d = np.sqrt(u * u + v * v)
            nuc_mask = np.clip((rn - d) / 1.5 + 0.5, 0.0, 1.0)  # soft edge over ~1.5 px
            if kind in ("nuclei", "absorb"):
                ty, tx = st["tex_off"][i] % 128
                tpatch = np.resize(tex[ty:, tx:], d.shape)  # tiles when the cell is large
            if kind == "nuclei":
                value = st["bright"][i] * nuc_mask * (0.8 + 0.3 * tpatch)
            elif kind == "membrane":
                value = np.exp(-(((d - rc) / 1.2) ** 2)) * st["bright"][i] * (d < rc + 3)
            elif kind == "phase":
                # optical path difference (µm, thickness × Δn): a dome, thicker over the nucleus
                body = np.clip(1.0 - d / rc, 0.0, 1.0)
                value = 0.12 * np.sqrt(body) + 0.08 * nuc_mask
            else:
                value = 0.03 * nuc_mask * (1 + 0.5 * tpatch)
            plane = maps[0 if kind == "absorb" else layer_of[i]]
            if y0 >= 0 and y1 <= h and x0 >= 0 and x1 <= w:
                target = plane[y0:y1, x0:x1]
                np.maximum(target, value, out=target)
            else:
                at = np.ix_(np.arange(y0, y1) % h, np.arange(x0, x1) % w)
                plane[at] = np.maximum(plane[at], value)
        return [np.fft.rfft2(m) for m in maps]

    def _keyframe(self, k: int) -> _Keyframe:
        return self._keyframes.get(k, lambda: self._new_keyframe(k))

    def intensity(self, t_s: float, channel: str, z_um: float) -> np.ndarray:
        """Noise-free relative intensity on the canvas (1 ≈ a bright in-focus nucleus)."""
        ch = self._channel(channel)
        kf = self._keyframe(self.keyframe_index(t_s))
        lam = ch.wavelength_um
        if ch.kind == "fluorescence":
            layers = self._layers(kf, "nuclei" if ch.label == "nuclei" else "membrane")
            acc = np.zeros_like(layers[0])
            for lz, ft in zip(kf.layer_z, layers, strict=True):
                sigma = self.optics.blur_sigma_px(z_um - float(lz), lam)
                acc += ft * _gauss_kernel_ft(self.canvas, sigma)
            img = np.fft.irfft2(acc, s=self.canvas).astype(np.float32)
            np.clip(img, 0, None, out=img)
            return img
        # brightfield: transport of intensity for a weak phase + absorption object
        (absorb,) = self._layers(kf, "absorb")
        sigma_c = self.optics.blur_sigma_px(0.0, lam)
        k0 = _gauss_kernel_ft(self.canvas, sigma_c)
        lap = _laplacian_ft(self.canvas)
        px2 = self.optics.pixel_size_um**2
        acc = -2.0 * absorb * k0
        for lz, ft in zip(kf.layer_z, self._layers(kf, "phase"), strict=True):
            dz = z_um - float(lz)
            # with φ = 2π/λ · OPD:  -dz λ/(2π) ∇²φ = -dz ∇²OPD
            acc -= dz * (lap / px2) * ft * k0
        contrast = np.fft.irfft2(acc, s=self.canvas).astype(np.float32)
        img = 1.0 + contrast
        np.clip(img, 0.05, None, out=img)
        return img

    def _channel(self, name: str) -> ChannelModel:
        try:
            return self.channels[name]
        except KeyError:
            raise ValueError(
                f"the simulated microscope has no channel {name!r}; it has {sorted(self.channels)}"
            ) from None

    def _mean_sigma(
        self, t_s: float, channel: str, z_um: float, exposure_ms: float
    ) -> tuple[np.ndarray, np.ndarray]:
        key = (self.keyframe_index(t_s), channel, round(z_um, 3), round(exposure_ms, 3))

        def render() -> tuple[np.ndarray, np.ndarray]:
            ch = self._channel(channel)
            cam = self.camera
            photons = self.intensity(t_s, channel, z_um) * (ch.photons_per_ms * exposure_ms)
            photons += cam.background_photons_per_ms * exposure_ms
            mean = (cam.offset_adu + cam.gain_adu_per_e * photons).astype(np.float32)
            sigma = (cam.gain_adu_per_e * np.sqrt(photons + cam.read_noise_e**2)).astype(
                np.float32
            )
            # shared by threads from now on: nobody may write into them
            mean.flags.writeable = sigma.flags.writeable = False
            return mean, sigma

        return self._means.get(key, render)

    def _window(self, t_s: float, stage_xy_um: tuple[float, float] | None = None) -> Window:
        """The part of the (periodic) sample the camera sees: stage drift, a slow bounded
        wander of the field of view, plus where the XY stage is (whole pixels).

        The sample repeats every canvas width (it is rendered on a torus), so any
        stage position shows a field; a field across the canvas edge wraps.
        """
        s = self.sample
        amp = MARGIN_PX - 1
        a = s.drift_um_per_s * t_s / (self.optics.pixel_size_um * amp)
        oy = round(amp * float(np.sin(a)))
        ox = round(amp * float(np.sin(0.7 * a + 1.0)))
        if stage_xy_um is not None:
            px = self.optics.pixel_size_um
            ox += round(stage_xy_um[0] / px)
            oy -= round(stage_xy_um[1] / px)  # stage y up, image rows down
        h, w = self.shape
        return (
            _wrapped(MARGIN_PX + oy, h, self.canvas[0]),
            _wrapped(MARGIN_PX + ox, w, self.canvas[1]),
        )

    def ground_truth(
        self,
        t_s: float,
        channel: str,
        z_um: float = 0.0,
        exposure_ms: float = 10.0,
        stage_xy_um: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """Noise-free expected frame in ADU (float32), before clipping."""
        mean, _ = self._mean_sigma(t_s, channel, z_um, exposure_ms)
        out: np.ndarray = np.array(_crop(mean, self._window(t_s, stage_xy_um)))
        return out

    def snap(
        self,
        t_s: float,
        channel: str,
        z_um: float = 0.0,
        exposure_ms: float = 10.0,
        out: np.ndarray | None = None,
        stage_xy_um: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """One noisy camera frame (uint16), written into ``out`` if given."""
        mean, sigma = self._mean_sigma(t_s, channel, z_um, exposure_ms)
        win = self._window(t_s, stage_xy_um)
        if out is None:
            out = np.empty(self.shape, np.uint16)
        with self._snap_lock:  # one noise stream: frames snapped in one order are reproducible
            noise = self._noise[int(self._noise_rng.integers(len(self._noise)))]
            ny, nx = (int(v) for v in self._noise_rng.integers(0, 2 * MARGIN_PX, size=2))
            buf = self._buf
            # a window across the canvas edge is up to four blocks: views, never copies
            for dst, src in _blocks(win):
                b = buf[dst]
                (r, c) = dst
                nz = noise[ny + r.start : ny + r.stop, nx + c.start : nx + c.stop]
                np.multiply(sigma[src], nz, out=b)
                np.add(b, mean[src], out=b)
            np.clip(buf, 0, self.camera.max_adu, out=buf)
            np.rint(buf, out=buf)
            out[...] = buf
        return out


def _wrapped(start: int, n: int, size: int) -> list[tuple[slice, slice]]:
    """``n`` indices from ``start`` on a periodic axis of ``size``, as (destination,
    source) slice pairs: one when they do not wrap, two when they cross the edge."""
    if n > size:
        raise ValueError(f"a window of {n} px does not fit a canvas of {size}")
    start %= size
    if start + n <= size:
        return [(slice(0, n), slice(start, start + n))]
    first = size - start
    return [(slice(0, first), slice(start, size)), (slice(first, n), slice(0, n - first))]


Window = tuple[list[tuple[slice, slice]], list[tuple[slice, slice]]]


def _blocks(win: Window) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """The (destination, source) 2D blocks of a window: one, two or four."""
    rows, cols = win
    return [((dr, dc), (sr, sc)) for dr, sr in rows for dc, sc in cols]


def _crop(a: np.ndarray, win: Window) -> np.ndarray:
    """``a`` at a `_window`: a view when it does not wrap, else a copy of its blocks."""
    blocks = _blocks(win)
    if len(blocks) == 1:
        return a[blocks[0][1]]
    h = win[0][-1][0].stop
    w = win[1][-1][0].stop
    out = np.empty((h, w), a.dtype)
    for dst, src in blocks:
        out[dst] = a[src]
    return out
