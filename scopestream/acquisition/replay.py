"""Replay a recording (OME-Zarr, NDTiff, OME-TIFF / TIFF) as a live stream."""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.acquisition.base import SourceError, ThreadedSource
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import Position, StreamInfo
from scopestream.streaming.saved_run import complete_frames

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from scopestream.streaming.frame import FrameMeta

#: preload a recording when it is smaller than this
PRELOAD_BYTES = 2 * 2**30


class _AxisView:
    """Index an array with named axes as (t, c, z) -> (y, x) frames, lazily.

    Axes other than t, c, z, y, x (e.g. TIFF's ``q`` or ``i``) are folded into t.
    """

    def __init__(self, arr: Any, axes: str, *, on_close: Callable[[], None] | None = None) -> None:
        self._on_close = on_close  # releases the files ``arr`` reads from, if it holds any
        axes = axes.lower()
        if "y" not in axes or "x" not in axes:
            raise SourceError(f"cannot replay an image without y and x axes (axes {axes!r})")
        if len(axes) != len(arr.shape) or len(set(axes)) != len(axes):
            raise SourceError(f"axes {axes!r} do not match the array's shape {arr.shape}")
        self.arr = arr
        self.axes = axes
        self.time_axes = [i for i, a in enumerate(axes) if a not in "czyx"]
        self.time_shape = tuple(arr.shape[i] for i in self.time_axes)
        size = dict(zip(axes, arr.shape, strict=True))
        self.shape = (
            int(np.prod(self.time_shape)) if self.time_axes else 1,
            size.get("c", 1),
            size.get("z", 1),
            size["y"],
            size["x"],
        )
        self.swap_yx = axes.index("x") < axes.index("y")

    def close(self) -> None:
        """Release the files the array reads from (an NDTiff dataset keeps them open)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def frame(self, t: int, c: int, z: int) -> np.ndarray:
        """The (y, x) frame at (t, c, z)."""
        t_idx = np.unravel_index(t, self.time_shape) if self.time_axes else ()
        idx: list[Any] = []
        k = 0
        for i, a in enumerate(self.axes):
            if i in self.time_axes:
                idx.append(int(t_idx[k]))
                k += 1
            elif a == "c":
                idx.append(c)
            elif a == "z":
                idx.append(z)
            else:
                idx.append(slice(None))
        out = np.asarray(self.arr[tuple(idx)])
        return out.T if self.swap_yx else out


def _open_zarr(path: Path) -> tuple[list[_AxisView], StreamInfo, list[np.ndarray] | None]:
    """A run's raw image of every position (one view each) or one OME-Zarr image."""
    from scopestream.streaming.saved_run import SavedRun

    try:
        saved = SavedRun(path)
    except (OSError, ValueError):
        saved = None
    if saved is None or not saved.is_collection:
        view, info, image_written = _open_zarr_image(path)
        return [view], info, None if image_written is None else [image_written]
    raws = sorted((im for im in saved.images if im.name == "raw"), key=lambda im: im.p)
    if [im.p for im in raws] != list(range(len(raws))) or not raws:
        raise SourceError(f"replay: {path} lacks the raw image of some of its positions")
    opened = [_open_zarr_image(im.path) for im in raws]
    first = opened[0][1]
    for im, opened_image in zip(raws, opened, strict=True):
        info = opened_image[1]
        if (info.frame_shape, info.dtype, info.channel_names, info.n_z, info.n_t) != (
            first.frame_shape, first.dtype, first.channel_names, first.n_z, first.n_t
        ):  # fmt: skip
            raise SourceError(
                f"replay: position {im.position} of {path} differs in shape, dtype or "
                "channels from the first; it cannot be replayed as one stream"
            )
    views = [o[0] for o in opened]
    flags = [o[2] for o in opened]
    positions = saved.positions if len(raws) > 1 else ()
    info = replace(first, positions=positions)
    if any(w is None for w in flags):
        return views, info, None
    return views, info, [w for w in flags if w is not None]


def _open_zarr_image(path: Path) -> tuple[_AxisView, StreamInfo, np.ndarray | None]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs: dict[str, Any] = root.attrs.asdict()
    ome: dict[str, Any] = attrs.get("ome", attrs)  # 0.5 nests under "ome", 0.4 does not
    try:
        ms: dict[str, Any] = ome["multiscales"][0]
    except (KeyError, IndexError, TypeError):
        raise SourceError(f"{path} is not an OME-Zarr image (no multiscales)") from None
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms["axes"])
    arr: Any = root[ms["datasets"][0]["path"]]
    scale: list[float] = [1.0] * len(axes)
    for tr in ms["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = tr["scale"]
    sc = dict(zip(axes.lower(), scale, strict=False))
    names = [
        c.get("label", f"c{i}") for i, c in enumerate(ome.get("omero", {}).get("channels", []))
    ]
    written: np.ndarray | None = None
    if "scopestream" in attrs:  # a scopestream run: replay only frames completely written
        written = complete_frames(path)
    data = _AxisView(arr, axes)
    n_t, n_c, n_z, h, w = data.shape
    if len(names) != n_c:
        names = [f"c{i}" for i in range(n_c)]
    info = StreamInfo(
        frame_shape=(h, w),
        dtype=str(arr.dtype),
        n_t=n_t,
        channel_names=tuple(names),
        n_z=n_z,
        pixel_size_um=float(sc.get("x", 1.0)),
        z_step_um=float(sc.get("z", 1.0)),
        interval_s=float(sc.get("t", 0.0)),
    )
    return data, info, written


#: what ``--axes`` may name: time, channel, z, y, x, and q for "some other stack axis"
#: (folded into time, as any axis that is not c, z, y or x)
TIFF_AXES = "TCZYXQ"


def check_axes(axes: str, shape: tuple[int, ...]) -> str:
    """``axes`` (``TYX``, ``ZYX``, ``CYX``, ``TCZYX``, …) checked against ``shape``; lower case."""
    a = axes.strip().upper()
    bad = sorted(set(a) - set(TIFF_AXES))
    if bad:
        raise SourceError(
            f"--axes {axes!r}: unknown letter(s) {', '.join(bad)}; use T, C, Z, Y, X (Q: other)"
        )
    if len(set(a)) != len(a):
        raise SourceError(f"--axes {axes!r} names an axis twice")
    if "Y" not in a or "X" not in a:
        raise SourceError(f"--axes {axes!r} must name Y and X")
    if len(a) != len(shape):
        raise SourceError(
            f"--axes {axes!r} has {len(a)} axes; the image has {len(shape)} (shape "
            f"{tuple(shape)})"
        )
    return a.lower()


def _tiff_axes(tf: Any, series: Any) -> str:
    """The series' axes as scopestream reads them (lower case, c for colour samples only).

    tifffile reads a plain stack of 3 or 4 planes (as ``tifffile.imwrite`` writes a
    (3, H, W) or (4, H, W) array without metadata) as planar RGB(A) samples ``S``; a
    microscope's 16-bit planes are not colours, so separate-plane samples of more than
    8 bits are a stack axis (``q``), while interleaved 8-bit RGB(A) stays channels.
    """
    axes = str(series.axes).lower()
    if "s" in axes:
        page = series.pages[0] if series.pages else tf.pages[0]
        interleaved = getattr(page, "planarconfig", 1) == 1
        colour = interleaved and np.dtype(series.dtype).itemsize == 1
        axes = axes.replace("s", "c" if colour and "c" not in axes else "q")
    for other in "ir":  # tifffile's "image series" / "tile" letters: stack axes
        axes = axes.replace(other, "q")
    return axes


def _ome_pixels(tf: Any) -> dict[str, Any]:
    """Channel names and pixel size of an OME-TIFF's first image (empty if none or unreadable)."""
    if not tf.is_ome or not tf.ome_metadata:
        return {}
    import tifffile

    try:
        image = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return {}
    channels = pixels.get("Channel") or []
    channels = channels if isinstance(channels, list) else [channels]
    out: dict[str, Any] = {
        "names": [str(c.get("Name", "")) for c in channels if isinstance(c, dict)]
    }
    size = pixels.get("PhysicalSizeX")
    if isinstance(size, int | float) and size > 0 and pixels.get("PhysicalSizeXUnit", "µm") in (
        "µm",
        "um",
    ):
        out["pixel_size_um"] = float(size)
    return out


def _open_tiff(path: Path, axes: str | None = None) -> tuple[_AxisView, StreamInfo, None]:
    """A TIFF / OME-TIFF read plane by plane (through tifffile's zarr store).

    Axes come from ``axes`` when given, else the file's OME or ImageJ metadata, else
    tifffile's reading of its shape (see `_tiff_axes`): unknown stack axes are time.
    Channel names and the pixel size come from OME metadata when present; a single
    unnamed channel is ``raw``, several are ``c0``, ``c1``, ….
    """
    import tifffile
    import zarr

    tf = tifffile.TiffFile(path)
    try:
        series = tf.series[0]
        shape = tuple(int(n) for n in series.shape)
        letters = check_axes(axes, shape) if axes else _tiff_axes(tf, series)
        if ("y" not in letters or "x" not in letters) and len(shape) >= 2:
            letters = "q" * (len(shape) - 2) + "yx"
        arr: Any = zarr.open(series.aszarr(), mode="r")
        ome = _ome_pixels(tf)
        data = _AxisView(arr, letters, on_close=tf.close)
    except BaseException:
        tf.close()
        raise
    n_t, n_c, n_z, h, w = data.shape
    names = ome.get("names") or []
    if len(names) == n_c and all(names) and len(set(names)) == n_c:
        channel_names = tuple(names)
    else:
        channel_names = tuple(f"c{i}" for i in range(n_c)) if n_c > 1 else ("raw",)
    info = StreamInfo(
        frame_shape=(h, w),
        dtype=str(series.dtype),
        n_t=n_t,
        channel_names=channel_names,
        n_z=n_z,
        pixel_size_um=float(ome.get("pixel_size_um", 1.0)),
        interval_s=0.0,
    )
    return data, info, None


def _find_ndtiff(path: Path) -> Path | None:
    """The NDTiff dataset folder at ``path`` or directly inside it (pycromanager nests one)."""
    if (path / "NDTiff.index").exists():
        return path
    inner = sorted(p.parent for p in path.glob("*/NDTiff.index"))
    return inner[0] if len(inner) == 1 else None


def _open_ndtiff(path: Path) -> tuple[_AxisView, StreamInfo, None]:
    try:
        from ndtiff import Dataset
    except ImportError as e:
        raise SourceError(
            "reading NDTiff needs the ndtiff package; pip install 'scopestream[mm]'"
        ) from e
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress on stdout
        ds = Dataset(str(path))
    names = {"time": "t", "channel": "c", "z": "z"}
    present = [a for a in ds.axes if len(ds.axes[a]) > 0]
    ordered = [a for a in ("time", "channel", "z") if a in present]
    others = [a for a in present if a not in names]
    axes_letters = "".join("q" for _ in others) + "".join(names[a] for a in ordered) + "yx"
    try:
        arr = ds.as_array(axes=[*others, *ordered])
        data = _AxisView(arr, axes_letters, on_close=ds.close)
    except BaseException:
        ds.close()
        raise
    n_t, n_c, n_z, h, w = data.shape
    summary = ds.summary_metadata or {}
    channels = [str(c) for c in ds.axes.get("channel", [])] or ["raw"]
    info = StreamInfo(
        frame_shape=(h, w),
        dtype=str(arr.dtype),
        n_t=n_t,
        channel_names=tuple(channels)
        if len(channels) == n_c
        else tuple(f"c{i}" for i in range(n_c)),
        n_z=n_z,
        pixel_size_um=float(summary.get("PixelSize_um", 1.0) or 1.0),
        z_step_um=float(summary.get("z-step_um", 1.0) or 1.0),
        interval_s=float(summary.get("Interval_ms", 0.0) or 0.0) / 1000.0,
    )
    return data, info, None


class ReplaySource(ThreadedSource):
    """Stream a recorded dataset in acquisition order (t, then position, c, z).

    A scopestream run of several positions replays every field, interleaved as
    it was acquired (``t, p, c, z``), with each frame's recorded stage position;
    what it records is again a run of those positions.

    Parameters
    ----------
    path
        ``.ome.zarr`` / ``.zarr`` directory, an NDTiff dataset folder (as
        Micro-Manager/pycromanager save them) or a ``.tif``/``.tiff`` file.
    fps
        ``None``: the recorded frame rate (as fast as possible when unknown);
        ``0``: as fast as the pipeline takes frames; otherwise that rate.
    loop
        Replay this many times (for soak tests and benchmarks).
    axes
        A TIFF's axes (``TYX``, ``ZYX``, ``CYX``, ``TCZYX``, …) when its metadata does
        not say or says wrong; see `_open_tiff`.
    preload
        Read the whole recording into memory first (default: when it is smaller than
        `PRELOAD_BYTES`); ``False`` reads each frame when it is asked for (`frames_at`:
        the blocks of a distributed re-processing).
    """

    kind = "replay"
    #: frames are views of a recording nobody modifies: the ring adopts them
    hands_over_frames = True

    def __init__(
        self,
        path: str | Path,
        *,
        fps: float | None = None,
        loop: int = 1,
        axes: str | None = None,
        preload: bool | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"replay: {self.path} does not exist")
        suffixes = "".join(self.path.suffixes).lower()
        ndtiff = _find_ndtiff(self.path) if self.path.is_dir() else None
        views: list[_AxisView]
        written: list[np.ndarray] | None = None
        if self.path.is_dir() and any((self.path / f).exists() for f in ("zarr.json", ".zattrs")):
            views, info, written = _open_zarr(self.path)
        elif ndtiff is not None:
            view, info, _ = _open_ndtiff(ndtiff)
            views = [view]
        elif suffixes.endswith((".tif", ".tiff")):
            view, info, _ = _open_tiff(self.path, axes)
            views = [view]
        else:
            raise SourceError(
                f"replay: cannot read {self.path}; give an OME-Zarr or NDTiff directory "
                "or a TIFF file"
            )
        if axes is not None and not suffixes.endswith((".tif", ".tiff")):
            raise SourceError(
                "--axes is for TIFF files; OME-Zarr and NDTiff name their own axes"
            )
        nbytes = sum(int(np.prod(v.shape)) for v in views) * np.dtype(info.dtype).itemsize
        self.preloaded = nbytes <= PRELOAD_BYTES if preload is None else preload
        for data in views:
            if self.preloaded and not isinstance(data.arr, np.ndarray):
                try:
                    data.arr = np.asarray(data.arr[...])
                finally:
                    data.close()  # everything is in memory now
        self._views = views
        self._written = written
        self.loop = max(1, int(loop))
        if fps is None:
            fps = (
                1.0 / (info.interval_s * info.frames_per_timepoint) if info.interval_s > 0 else 0.0
            )
        super().__init__(fps=fps)
        n_t = info.n_t * self.loop if info.n_t is not None else None
        self.info = StreamInfo(
            frame_shape=info.frame_shape,
            dtype=info.dtype,
            n_t=n_t,
            channel_names=info.channel_names,
            n_z=info.n_z,
            pixel_size_um=info.pixel_size_um,
            z_step_um=info.z_step_um,
            interval_s=info.interval_s,
            positions=info.positions,
        )
        self._n_t_once = info.n_t or 0
        #: what was recorded per frame (a scopestream run's frames.npy), by (t, p, c, z)
        self._recorded = _recorded_meta(self.path) if written is not None else {}
        self._seq: np.ndarray | None = None  # each frame's place in `frames` (`frames_at`)

    @property
    def frames_planned(self) -> int:
        """Frames this replay will emit: a cut recording's complete frames, not its plan's."""
        per = (
            sum(int(w.sum()) for w in self._written)
            if self._written is not None
            else self._n_t_once * self.info.n_c * self.info.n_z * len(self._views)
        )
        return per * self.loop

    def describe(self) -> dict[str, Any]:
        """Where the frames come from."""
        return {
            **super().describe(),
            "path": str(self.path),
            "loop": self.loop,
            "preloaded": self.preloaded,
        }

    def finished(self) -> None:
        """Close the recording's files (a recording too large to preload is read until now)."""
        for data in self._views:
            data.close()

    def stop(self) -> None:
        """Ask the thread to stop; a source never started closes its files here."""
        super().stop()
        if self._thread is None:
            for data in self._views:
                data.close()

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Frames in order; frames a scopestream run never wrote are not replayed."""
        info = self.info
        for rep in range(self.loop):
            for t, p, c, z in itertools.product(
                range(self._n_t_once), range(len(self._views)), range(info.n_c), range(info.n_z)
            ):
                if self._written is not None and not self._written[p][t, c, z]:
                    continue
                yield self._frame(rep, t, p, c, z)

    def frames_at(self, p: int, ts: range) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """The frames of position ``p`` at time points ``ts`` (every c and z), in order, each
        with the sequence number `frames` gives it (one pass, no loop)."""
        info = self.info
        if self._seq is None:
            written = (
                np.stack(self._written, axis=1)
                if self._written is not None
                else np.ones((self._n_t_once, len(self._views), info.n_c, info.n_z), bool)
            )  # (t, p, c, z): the order `frames` replays in
            self._seq = np.cumsum(written.ravel()).reshape(written.shape) - 1
            self._seq[~written] = -1
        for t, c, z in itertools.product(ts, range(info.n_c), range(info.n_z)):
            if not 0 <= t < self._n_t_once or (
                self._written is not None and not self._written[p][t, c, z]
            ):
                continue
            frame, meta = self._frame(0, t, p, c, z)
            meta["seq"] = int(self._seq[t, p, c, z])
            yield frame, meta

    def _frame(self, rep: int, t: int, p: int, c: int, z: int) -> tuple[np.ndarray, FrameMeta]:
        frame = self._views[p].frame(t, c, z)
        meta = make_meta(
            t=rep * self._n_t_once + t, c=c, z=z, p=p, source=f"replay:{self.path.name}"
        )
        rec = self._recorded.get((t, p, c, z))
        if rec is not None:  # what the microscope said of this frame
            for key in (
                "exposure_ms",
                "stage_x_um",
                "stage_y_um",
                "stage_z_um",
                "engine_time_ms",
                "image_number",
            ):
                meta[key] = rec[key]  # type: ignore[literal-required]
        return frame, meta


def _recorded_meta(path: Path) -> dict[tuple[int, int, int, int], FrameMeta]:
    """The raw images' per-frame metadata of a scopestream run, by (t, p, c, z)."""
    from scopestream.streaming.frame_index import read_frame_index, to_meta

    out: dict[tuple[int, int, int, int], FrameMeta] = {}
    for rec in read_frame_index(path):
        m = to_meta(rec)
        out[(m["t"], m["p"], m["c"], m["z"])] = m
    return out


class ArraySource(ThreadedSource):
    """Replay frames held in memory, ``(n, y, x)``, cycling until ``n_frames`` are sent.

    Used by benchmarks and tests: no disk read on the acquisition path.
    """

    kind = "memory"
    #: frames are views of a recording nobody modifies: the ring adopts them
    hands_over_frames = True

    def __init__(
        self,
        frames: np.ndarray,
        n_frames: int,
        *,
        fps: float = 0.0,
        channel: str = "raw",
        positions: tuple[Position, ...] = (),
    ) -> None:
        if frames.ndim != 3 or len(frames) == 0:
            raise ValueError("frames must be a non-empty (n, y, x) array")
        super().__init__(fps=fps)
        self._frames = frames
        self.n_frames = int(n_frames)
        n_p = max(1, len(positions))
        self.info = StreamInfo(
            frame_shape=(int(frames.shape[1]), int(frames.shape[2])),
            dtype=frames.dtype.name,
            n_t=-(-self.n_frames // n_p),
            channel_names=(channel,),
            positions=positions,
        )

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """The held frames, cycled (with positions: each time point visits them in turn)."""
        k = len(self._frames)
        n_p = self.info.n_p
        for i in range(self.n_frames):
            t, p = divmod(i, n_p)
            yield self._frames[i % k], make_meta(t=t, p=p, source=self.kind)
