"""Offline prediction of a recording or image file, plane by plane."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.inference.backends import make_backend
from scopestream.inference.engine import InferenceEngine, check_channels, output_names
from scopestream.inference.package import Registry
from scopestream.inference.predictor import Predictor, tile_from_string
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.store_lock import prepare_output_path
from scopestream.streaming.zarr_sink import ImageWriter

if TYPE_CHECKING:
    from rich.console import Console

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.seams import FrameReader


class PredictionFailed(RuntimeError):
    """Prediction failed after the output was created (what was written is kept)."""


class TiffPlaneWriter:
    """Writes predictions plane by plane into an OME-TIFF (BigTIFF), t-c-z order."""

    def __init__(self, path: Path, info: StreamInfo, channel_names: tuple[str, ...]) -> None:
        import tifffile

        self.path = path
        self.shape = (info.n_t or 1, len(channel_names), info.n_z, *info.frame_shape)
        self._planes: dict[tuple[int, int, int], np.ndarray] = {}
        self._next = 0
        self._order = [
            (t, c, z)
            for t in range(self.shape[0])
            for c in range(self.shape[1])
            for z in range(self.shape[2])
        ]
        self._tif = tifffile.TiffWriter(path, bigtiff=True, ome=True)
        self._meta = {"axes": "TCZYX", "Channel": {"Name": list(channel_names)}}
        self.name = path.stem
        self.frames_written = 0

    def _planes_in_order(self) -> Any:
        while self._next < len(self._order):
            key = self._order[self._next]
            while key not in self._planes:
                yield np.zeros(self.shape[-2:], np.float32)  # never predicted: left empty
                self._next += 1
                if self._next >= len(self._order):
                    return
                key = self._order[self._next]
            yield self._planes.pop(key)
            self._next += 1

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Keep a plane until the file can take it in order."""
        self._planes[(meta["t"], meta["c"], meta["z"])] = np.asarray(data, np.float32)
        self.frames_written += 1

    def update_attrs(self, **kw: Any) -> None:
        """TIFF has no room for live attributes."""

    def close(self, status: str = "complete", **kw: Any) -> None:
        """Write all planes (in t, c, z order)."""
        self._tif.write(
            self._planes_in_order(), shape=self.shape, dtype=np.float32, metadata=self._meta
        )
        self._tif.close()


def predict_file(
    src: FrameReader,
    model: str,
    output: str,
    *,
    tile: str | None = None,
    backend: str = "auto",
    registry: str | None = None,
    overwrite: bool = False,
    progress: Console | None = None,
) -> dict[str, Any]:
    """Run ``model`` over every frame of ``src`` and write the outputs to ``output``."""
    pkg = Registry(registry).resolve(model)
    predictor = Predictor(
        pkg, make_backend(pkg, backend), tile=tile_from_string(tile, pkg.manifest.n_spatial)
    )
    info = src.info
    check_channels(predictor, info.channel_names)  # bad input: before anything is written
    names = output_names(predictor, info.channel_names)
    out = Path(output)
    prepare_output_path(out, overwrite)
    out_info = StreamInfo(
        frame_shape=info.frame_shape,
        dtype="float32",
        n_t=info.n_t,
        channel_names=names,
        n_z=info.n_z,
        pixel_size_um=info.pixel_size_um,
        z_step_um=info.z_step_um,
        interval_s=info.interval_s,
    )
    writer: Any
    if out.suffix.lower() in (".tif", ".tiff"):
        writer = TiffPlaneWriter(out, out_info, names)
    else:
        writer = ImageWriter(
            out,
            pkg.name,
            out_info,
            channel_names=names,
            dtype="float32",
            # the root image is the model's output: `view`/`report` name it as a prediction
            attrs={
                "prediction": {
                    "kind": "prediction",
                    "offline": True,
                    **predictor.describe(),
                    "input": src.describe(),
                }
            },
        )
    engine = InferenceEngine(
        predictor, writer, source_channels=info.channel_names, n_z=info.n_z, policy="every"
    )
    total = info.expected_frames
    t0 = time.perf_counter()
    n = 0
    status = "failed"
    try:
        from rich.progress import Progress

        with Progress(console=progress, disable=progress is None, transient=True) as bar:
            task = bar.add_task(f"predicting with {pkg.name} v{pkg.version}", total=total)
            for seq, (frame, meta) in enumerate(src.frames()):
                meta["seq"] = seq
                engine.write(frame, meta)
                n += 1
                bar.update(task, completed=n)
        status = "complete"
    except Exception as e:  # after writing began: what was written is kept, exit 1
        raise PredictionFailed(
            f"prediction failed after {n} frames ({engine.predicted} written to {out}): {e}"
        ) from e
    finally:
        engine.close(status)
    return {
        "output": str(out),
        "model": pkg.identity,
        "frames_in": n,
        "frames": engine.predicted,
        "seconds": round(time.perf_counter() - t0, 3),
        "backend": predictor.backend.describe()["backend"],
        "notes": predictor.notes,
    }
