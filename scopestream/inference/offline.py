"""Offline prediction of a recording or image file, plane by plane."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.inference.backends import make_backend
from scopestream.inference.engine import (
    InferenceEngine,
    check_channels,
    output_names,
    trained_channels,
)
from scopestream.inference.package import Registry, split_model_spec
from scopestream.inference.predictor import Predictor, tile_from_string
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.store_lock import prepare_output_path
from scopestream.streaming.zarr_sink import ImageWriter, PositionWriters, ZarrSink

if TYPE_CHECKING:
    from rich.console import Console

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.seams import FrameReader


class PredictionFailed(RuntimeError):
    """Prediction failed after the output was created (what was written is kept)."""


class TiffPlaneWriter:
    """Writes predictions plane by plane into an OME-TIFF (BigTIFF, t-c-z-y-x, float32).

    The file is laid out whole at the start (every plane NaN: not predicted) and
    memory-mapped; each prediction goes to its plane as it comes, so nothing is held
    in memory and a plane never predicted reads as NaN, never as a black prediction.
    """

    def __init__(self, path: Path, info: StreamInfo, channel_names: tuple[str, ...]) -> None:
        import tifffile

        self.path = path
        self.shape = (info.n_t or 1, len(channel_names), info.n_z, *info.frame_shape)
        meta: dict[str, Any] = {"axes": "TCZYX", "Channel": {"Name": list(channel_names)}}
        if info.pixel_size_um and info.pixel_size_um != 1.0:
            meta.update(PhysicalSizeX=info.pixel_size_um, PhysicalSizeY=info.pixel_size_um)
        self._map: Any = tifffile.memmap(
            path, shape=self.shape, dtype=np.float32, ome=True, bigtiff=True, metadata=meta
        )
        for t in range(self.shape[0]):  # plane by plane: never a whole-stack buffer
            self._map[t] = np.nan
        self.name = path.stem
        self.frames_written = 0

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Write a plane at its (t, c, z)."""
        self._map[meta["t"], meta["c"], meta["z"]] = np.asarray(data, np.float32)
        self.frames_written += 1

    def update_attrs(self, **kw: Any) -> None:
        """TIFF has no room for live attributes."""

    def close(self, status: str = "complete", **kw: Any) -> None:
        """Flush the planes to the file."""
        if self._map is not None:
            self._map.flush()
            self._map = None


def open_prediction_output(
    out: Path,
    info: StreamInfo,
    names: tuple[str, ...],
    name: str,
    provenance: dict[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> tuple[Any, ZarrSink | None]:
    """The output of an offline prediction of a stream laid out as ``info``.

    A TIFF (``.tif``): one t-c-z-y-x stack. An OME-Zarr of one position: the prediction
    is the root image. Of several positions (a plate too): a collection like a run's,
    whose ``raw`` image of every field is the prediction (each carries ``provenance``),
    so `SavedRun`, ``view``, ``inspect`` and ``report`` read it as a run. Returns the
    writer of the frames and, for a collection, its `ZarrSink` (closed after the writer).
    ``overwrite``: replace an existing output; ``resume``: open the OME-Zarr output as
    it was created before (`cluster`).
    """
    out_info = StreamInfo(
        frame_shape=info.frame_shape,
        dtype="float32",
        n_t=info.n_t,
        channel_names=names,
        n_z=info.n_z,
        pixel_size_um=info.pixel_size_um,
        z_step_um=info.z_step_um,
        interval_s=info.interval_s,
        positions=info.positions,
    )
    if out.suffix.lower() in (".tif", ".tiff") and info.n_p > 1:
        raise ValueError(
            f"the input holds {info.n_p} positions; a TIFF output holds one: write "
            "an .ome.zarr (one image per position)"
        )
    if not resume:
        prepare_output_path(out, overwrite)
    if out.suffix.lower() in (".tif", ".tiff"):
        return TiffPlaneWriter(out, out_info, names), None
    if info.n_p > 1:
        # the root image is the model's output: `view`/`report` name it as a prediction
        sink = ZarrSink(
            out,
            out_info,
            source=provenance.get("input"),
            raw_attrs={"prediction": provenance},
            attrs={"prediction": provenance},
            resume=resume,
        )
        return PositionWriters(name, sink.raws), sink
    writer = ImageWriter(
        out,
        name,
        replace(out_info, positions=()),
        channel_names=names,
        dtype="float32",
        attrs={"prediction": provenance},
        resume=resume,
    )
    return writer, None


def resolve_channels(
    predictor: Predictor,
    info: StreamInfo,
    input_channel: str | None,
    channels: tuple[str, ...] | None,
) -> tuple[str | None, tuple[str, ...], list[str]]:
    """Which of the input's channels the model runs on, before anything is written.

    Returns the input channel to give the model (a plain TIFF's one unnamed channel
    is taken as the model's one input), the output's channel names and notes for the
    user. Raises `ModelChannelError` (a `ValueError`) for a model the input cannot feed.
    """
    m = predictor.package.manifest
    trained = trained_channels(predictor)
    notes: list[str] = []
    if (
        input_channel is None
        and channels is None
        and info.channel_names == ("raw",)
        and len(m.inputs) == 1
        and not (m.accepts("raw") and (not trained or "raw" in trained))
    ):
        input_channel = "raw"
        taken = trained[0] if trained else m.inputs[0]  # never the wildcard's '*'
        notes.append(f"the input's one unnamed channel is taken as {taken!r}")
    targets = check_channels(
        predictor,
        info.channel_names,
        input_channel=input_channel,
        channels=channels,
        hint="choose the one it takes with --input-channel NAME",
        force_hint="to run it there anyway: --model {model}:{channel} or --input-channel NAME",
    )
    return input_channel, output_names(predictor, info.channel_names, targets), notes


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
    input_channel: str | None = None,
    border: str = "zero",
) -> dict[str, Any]:
    """Run ``model`` over every frame of ``src`` and write the outputs to ``output``.

    ``input_channel``: the source channel to give the model when none is named as
    its input. A source of one unnamed channel (``raw``: a plain TIFF) goes to a model
    of one input (or of any input, trained on one channel) without being named.
    ``model`` may name the channels a model of any input runs on (``denoise:c1,c2``).
    """
    spec, channels = split_model_spec(model)
    pkg = Registry(registry).resolve(spec)
    predictor = Predictor(
        pkg,
        make_backend(pkg, backend),
        tile=tile_from_string(tile, pkg.manifest.n_spatial),
        border=border,
    )
    info = src.info
    input_channel, names, notes = resolve_channels(predictor, info, input_channel, channels)
    out = Path(output)
    prov = {"kind": "prediction", "offline": True, **predictor.describe(), "input": src.describe()}
    writer, sink = open_prediction_output(out, info, names, pkg.name, prov, overwrite=overwrite)
    engine = InferenceEngine(
        predictor,
        writer,
        source_channels=info.channel_names,
        n_z=info.n_z,
        policy="every",
        input_channel=input_channel,
        channels=channels,
        pixel_size_um=info.pixel_size_um,
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
        try:
            engine.close(status)
        finally:
            if sink is not None:
                sink.close(status)
    return {
        "output": str(out),
        "model": pkg.identity,
        "frames_in": n,
        "frames": engine.predicted,
        "seconds": round(time.perf_counter() - t0, 3),
        "backend": predictor.backend.describe()["backend"],
        "notes": [*notes, *predictor.notes],
        "domain_shift": engine.guard.describe(),
    }
