"""`Predictor`: a model package on a backend, with normalization and tiling.

``predict`` takes what the model's spatial mode needs and returns its outputs
in data units:

=========  =====================  ==========================
spatial    input                  output
=========  =====================  ==========================
``2d``     frame ``(Y, X)``        ``(C_out, Y, X)``
``2.5d-*`` window ``(k, Y, X)``    ``(C_out, Y, X)``
``3d``     stack ``(Z, Y, X)``     ``(C_out, Z, Y, X)``
=========  =====================  ==========================

Tiles (or whole frames) are batched to a fixed batch size, the last batch
padded, so a compiled backend only ever sees one shape. If the whole frame
does not fit on the GPU, the predictor falls back to tiles and says so.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.inference.tiling import pad_to_multiple, predict_tiled

if TYPE_CHECKING:
    from scopestream.inference.backends import Backend
    from scopestream.inference.manifest import Normalization
    from scopestream.inference.package import ModelPackage

FALLBACK_TILE = 512
#: what the network sees beyond the frame's edges (`Predictor`'s ``border``)
BORDERS = ("zero", "reflect")
#: members of a test-time-augmentation ensemble (`Predictor.predict_tta`)
TTA_MEMBERS = (2, 8)


class ImageTooSmall(ValueError):
    """An image smaller than the model can take."""


class Predictor:
    """A loaded model that predicts frames, windows or stacks.

    Parameters
    ----------
    package
        The verified model package.
    backend
        Where it runs.
    tile
        Tile size per spatial axis (``None``: whole frame when it fits).
    input_norm
        Override the manifest's input normalization (frozen calibration constants).
    batch
        Tiles per backend call.
    border
        What the network sees beyond the image's y/x edges: ``zero`` (its own zero
        padding) or ``reflect`` (the image mirrored by the halo, then cropped: the
        border band closer to the inside's quality, at the cost of the extra pixels).
        Tiled and whole predictions agree either way.
    """

    def __init__(
        self,
        package: ModelPackage,
        backend: Backend,
        *,
        tile: tuple[int, ...] | None = None,
        input_norm: Normalization | None = None,
        batch: int = 4,
        border: str = "zero",
    ) -> None:
        if border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
        self.border = border
        self.package = package
        self.manifest = m = package.manifest
        self.backend = backend
        self.input_norm = input_norm or m.input_norm
        self.output_norm = m.output_norm
        self.tile = tile
        self.batch = max(1, batch)
        self.halo = tuple(m.halo)
        self.mult = tuple(m.size_multiple)
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._prepared: set[tuple[int, ...]] = set()
        if tile is not None and len(tile) != m.n_spatial:
            raise ValueError(f"tile needs {m.n_spatial} sizes for a {m.spatial} model")
        if tile is not None:
            kept = float(
                np.prod([max(t - 2 * h, 0) / t for t, h in zip(tile, self.halo, strict=True)])
            )
            if kept < 0.25:
                best = [2 * h * 4 for h in self.halo]
                self.notes.append(
                    f"tiles of {tuple(tile)} keep {kept:.0%} of each tile after the "
                    f"{self.halo} px halo; tiles of about {tuple(best)} waste far less"
                )

    @property
    def min_size(self) -> tuple[int, ...]:
        """Smallest image (per spatial axis) the model takes."""
        return self.mult

    def describe(self) -> dict[str, Any]:
        """Model identity, backend, tiling and normalization, for provenance."""
        return {
            **self.package.identity,
            **self.backend.describe(),
            "tile": list(self.tile) if self.tile else None,
            "border": self.border,
            "halo": list(self.halo),
            "input_norm": self.input_norm.model_dump(mode="json"),
            "output_norm": self.output_norm.model_dump(mode="json"),
            "notes": list(self.notes),
        }

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Backend call; the shape is prepared (compiled) once."""
        shape = tuple(x.shape)
        if shape not in self._prepared:
            self.backend.prepare(shape)
            self._prepared.add(shape)
        return self.backend(x)

    def _run_tiles(self, x: np.ndarray) -> np.ndarray:
        """Backend call on exactly ``batch`` tiles (the last group padded with zeros)."""
        n = x.shape[0]
        if n < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - n, *x.shape[1:]), np.float32)])
        return self._run(x)[:n]

    def _check_size(self, spatial: tuple[int, ...]) -> None:
        small = [s < m for s, m in zip(spatial, self.mult, strict=True)]
        if any(small):
            raise ImageTooSmall(
                f"image of size {spatial} is smaller than the model's minimum {self.mult}"
            )

    def _predict_spatial(self, x: np.ndarray) -> np.ndarray:
        """(C_in, *spatial) normalized → (C_out, *spatial) normalized."""
        cout = len(self.manifest.outputs)
        tile = self.tile
        if tile is None:
            try:
                return predict_tiled(
                    self._run, x, out_channels=cout, tile=None, halo=self.halo, mult=self.mult
                )
            except RuntimeError as e:
                if "out of memory" not in str(e).lower():
                    raise
                padded, _ = pad_to_multiple(x, self.mult, len(self.mult))
                tile = tuple(min(FALLBACK_TILE, s) for s in padded.shape[1:])
                self.tile = tile
                self.notes.append(
                    f"the whole frame did not fit in GPU memory; now running tiles of {tile}"
                )
        return predict_tiled(
            self._run_tiles,
            x,
            out_channels=cout,
            tile=tile,
            halo=self.halo,
            mult=self.mult,
            batch=self.batch,
        )

    def _fused(self, data: np.ndarray) -> bool:
        """Whole frames of the right size go straight to a CUDA backend, raw."""
        dev = getattr(self.backend, "device", "cpu")
        spatial = data.shape[-self.manifest.n_spatial :]
        return (
            self.tile is None
            and dev.startswith("cuda")
            and hasattr(self.backend, "predict_raw")
            and self.manifest.spatial != "3d"
            and len(self.input_norm.offset) == 1
            and all(s % k == 0 for s, k in zip(spatial, self.mult, strict=True))
        )

    def predict(self, data: np.ndarray) -> np.ndarray:
        """Outputs in data units (see the module docstring for shapes)."""
        if self.border == "reflect":
            pads = [min(h, s - 1) for h, s in zip(self.halo[-2:], data.shape[-2:], strict=True)]
            widths = [(0, 0)] * (data.ndim - 2) + [(q, q) for q in pads]
            y = self._predict_unpadded(np.pad(data, widths, mode="reflect"))
            (py, px), (ny, nx) = pads, data.shape[-2:]
            return y[..., py : py + ny, px : px + nx]
        return self._predict_unpadded(data)

    def _predict_unpadded(self, data: np.ndarray) -> np.ndarray:
        m = self.manifest
        if self._fused(data):
            raw = data[None] if m.spatial == "2d" else data
            n_out = len(m.outputs)
            off = np.resize(np.asarray(self.output_norm.offset, np.float32), n_out)
            sc = np.resize(np.asarray(self.output_norm.scale, np.float32), n_out)
            with self._lock:
                out: np.ndarray = self.backend.predict_raw(  # type: ignore[attr-defined]
                    raw, (self.input_norm.offset[0], self.input_norm.scale[0]), (off, sc)
                )
                return out
        with self._lock:
            if m.spatial == "2d":
                if data.ndim != 2:
                    raise ValueError(f"a 2d model takes one frame (Y, X), got {data.shape}")
                x = self.input_norm.apply(data[None], channel_axis=0)
            elif m.spatial.startswith("2.5d"):
                if data.ndim != 3 or data.shape[0] != m.window:
                    raise ValueError(
                        f"this model takes a window of {m.window} frames, got {data.shape}"
                    )
                # one input channel's constants for every frame of the window
                x = self.input_norm.apply(data[:, None], channel_axis=1)[:, 0]
            else:
                if data.ndim != 3:
                    raise ValueError(f"a 3d model takes a stack (Z, Y, X), got {data.shape}")
                x = self.input_norm.apply(data[None], channel_axis=0)
            self._check_size(tuple(x.shape[1:]))
            y = self._predict_spatial(x)
            return self.output_norm.invert(y, channel_axis=0)

    def predict_tta(self, data: np.ndarray, members: int) -> tuple[np.ndarray, np.ndarray]:
        """A test-time-augmentation ensemble: the mean and per-pixel spread (std) of
        ``members`` predictions of flipped (2) or flipped and rotated (8, square
        frames) copies of ``data``, each turned back before they are compared.

        The networks are not equivariant to flips and rotations, so where the
        copies disagree the model is unsure: the spread is in output units, beside
        an output of the same shape (`predict`'s). It costs ``members``× a
        prediction.
        """
        if members not in TTA_MEMBERS:
            raise ValueError(f"a flip ensemble has {' or '.join(map(str, TTA_MEMBERS))} members")
        if members == 8 and data.shape[-1] != data.shape[-2]:
            raise ValueError(
                f"8 members rotate the frame: it must be square, not {data.shape[-2:]} "
                "(2 members only flip)"
            )
        outs = []
        for k in range(4 if members == 8 else 1):
            for flip in (False, True):
                x = np.rot90(data, k, axes=(-2, -1))
                x = np.ascontiguousarray(x[..., ::-1] if flip else x)
                y = self.predict(x)
                y = y[..., ::-1] if flip else y
                outs.append(np.rot90(y, -k, axes=(-2, -1)))
        stack = np.stack(outs).astype(np.float32, copy=False)
        return stack.mean(0), stack.std(0)

    def calibrated(self, frames: np.ndarray) -> Predictor:
        """The same model with input constants frozen from a calibration burst."""
        from scopestream.inference.manifest import Normalization

        return self.with_input_norm(Normalization.from_percentiles(frames, source="calibration"))

    def with_input_norm(self, norm: Normalization) -> Predictor:
        """The same model (same backend) with other input constants.

        A denoiser's output is the input's own quantity: its output constants
        follow the input's through the same affine map (training input range →
        this range), so a calibrated denoiser keeps the data's brightness. A
        stain model's output is another quantity and keeps its constants.
        """
        from scopestream.inference.manifest import Normalization

        p = Predictor(
            self.package,
            self.backend,
            tile=self.tile,
            input_norm=norm,
            batch=self.batch,
            border=self.border,
        )
        p._prepared = self._prepared
        m = self.manifest
        base = m.input_norm
        if m.task == "denoise" and len(base.offset) == len(norm.offset) == 1:
            ratio = norm.scale[0] / base.scale[0]
            p.output_norm = Normalization(
                offset=tuple(
                    norm.offset[0] + (o - base.offset[0]) * ratio for o in m.output_norm.offset
                ),
                scale=tuple(s * ratio for s in m.output_norm.scale),
                source="calibration",
            )
        return p


def tile_from_string(spec: str | None, n_spatial: int) -> tuple[int, ...] | None:
    """``"512x512"`` → (512, 512); ``"512"`` → that size on every axis."""
    if not spec:
        return None
    parts = [int(p) for p in spec.lower().replace("×", "x").split("x") if p.strip()]
    if len(parts) == 1:
        parts = parts * n_spatial
    if len(parts) != n_spatial or min(parts) < 1:
        raise ValueError(f"tile {spec!r} needs {n_spatial} positive sizes")
    return tuple(parts)


def halo_for(radius: tuple[int, ...], mult: tuple[int, ...]) -> tuple[int, ...]:
    """A halo covering the receptive field, on multiples of the size multiple."""
    return tuple(math.ceil(r / m) * m for r, m in zip(radius, mult, strict=True))
