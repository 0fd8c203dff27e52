"""OME-Zarr 0.5 run store, written with tensorstore's ``zarr3`` driver.

A run is a ``bioformats2raw.layout`` collection (`scopestream.streaming.collection`)::

    zarr.json          the collection: layout marker + ``scopestream`` attributes
                       (status, counts, config, source, outputs, series)
    OME/               the series list and METADATA.ome.xml (what readers list)
    0/                 raw image of the first position (OME multiscales, omero channels)
      0/               its pixels, (t, c, z, y, x), one chunk per frame, blosc-lz4
      frames.npy       its per-frame metadata
    1/, 2/, ...        raw images of further positions, then every model output per position

Every frame is stored as its own chunk file, dark frames included
(``store_data_equal_to_fill_value``), and tensorstore writes each chunk to a
temporary file and renames it. So a chunk file exists exactly when that frame
is completely on disk: after a crash (even ``kill -9``) the store opens and
`complete_frames` lists which frames are whole. A frame never acquired has no
chunk file, so it cannot be mistaken for a dark frame. Every group's
``zarr.json`` is written when the run starts, so a crashed store opens.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import os
import re
import socket
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from scopestream.streaming.collection import (
    Series,
    is_plate,
    plate_path,
    root_attrs,
    write_plate,
    write_series_index,
)
from scopestream.streaming.frame_index import FrameIndexWriter, to_meta
from scopestream.streaming.metrics import StageMetrics
from scopestream.streaming.ome import Window, WindowSample, image_attrs
from scopestream.streaming.saved_run import (  # the reader of saved runs; re-exported here
    TIMELINE_FILE,
    ImageReport,
    RunReport,
    complete_frames,
    inspect_run,
    read_group_attrs,
)
from scopestream.streaming.store_lock import StoreLock, cleanup_empty, prepare_output_path

__all__ = [
    "TIMELINE_FILE",
    "ImageReport",
    "ImageWriter",
    "PositionWriters",
    "RunReport",
    "SinkError",
    "ZarrSink",
    "complete_frames",
    "inspect_run",
    "prepare_output_path",
    "read_group_attrs",
]

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo

STORE_FORMAT = 1
RESERVED_NAMES = frozenset({"raw", "OME"})
_T_INITIAL = 64


class SinkError(RuntimeError):
    """Writing to the store failed (disk full, unwritable path, ...)."""


def _explain(e: BaseException) -> str:
    """Lead a tensorstore error with the OS reason in plain words (e.g. 'No space left')."""
    text = str(e)
    m = re.search(r"os_error_code='(\d+)'", text)
    if m:
        return f"{os.strerror(int(m.group(1)))} ({text})"
    return text


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    # per process and thread: the recorder and an abort may write the same file at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _blosc_codecs(itemsize: int) -> list[dict[str, Any]]:
    return [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {
            "name": "blosc",
            "configuration": {
                "cname": "lz4",
                "clevel": 1,
                "shuffle": "shuffle",
                "typesize": itemsize,
            },
        },
    ]


def _frame_chunk(shape: tuple[int, int], itemsize: int, max_bytes: int = 16 * 2**20) -> list[int]:
    """One chunk per frame, split in y/x only for very large frames."""
    y, x = shape
    while y * x * itemsize > max_bytes and y > 256:
        y = (y + 1) // 2
    while y * x * itemsize > max_bytes and x > 256:
        x = (x + 1) // 2
    return [y, x]


def _ts_file(path: Path) -> dict[str, Any]:
    return {"driver": "file", "path": str(path)}


class ImageWriter:
    """Writes frames of one image (raw or one model output) into its group.

    Several chunk writes are in flight at once (``max_in_flight``); `write`
    returns once tensorstore has copied the frame, so the caller may reuse its
    buffer (or, with ``reference=True``, keeps a view of it until the frame is
    committed: no copy). Completed frames are counted and timed in ``metrics``.

    The omero ``window`` of each channel comes from the pixels written: a small
    strided sample of some frames (`WindowSample`) sets it at the channel's first
    frame and again whenever the attributes are rewritten, last at `close`. A
    frame never written reads as the fill value: NaN in a float image (missing,
    never a prediction of 0), 0 in an integer one.
    """

    def __init__(
        self,
        group: Path,
        name: str,
        info: StreamInfo,
        *,
        channel_names: Sequence[str] | None = None,
        dtype: np.dtype | str | None = None,
        attrs: Mapping[str, Any] | None = None,
        max_in_flight: int = 8,
        windows: Sequence[tuple[float, float]] | None = None,
        exist_ok: bool = False,
        p: int = 0,
        title: str | None = None,
        resume: bool = False,
    ) -> None:
        self.group = group
        self.name = name
        #: the position this image holds (frames of another position are refused)
        self.p = p
        self.title = title or name
        self.info = info
        self.channel_names = tuple(channel_names or info.channel_names)
        self.dtype = np.dtype(dtype or info.dtype)
        self.max_in_flight = max(1, max_in_flight)
        self.metrics = StageMetrics(f"write:{name}")
        self.frames_written = 0
        self.frames_submitted = 0
        self._extra_attrs = dict(attrs or {})
        self._windows = windows  # given by the caller: kept instead of the data's
        self.window_sample = WindowSample(len(self.channel_names))
        self._data_windows: tuple[int, list[Window]] | None = None
        self._status = "acquiring"
        self._pending: deque[tuple[Any, int, int, int, int]] = deque()
        self._t_cap = info.n_t or _T_INITIAL
        self._t_max = -1
        self._closed = False
        n_c, n_z = len(self.channel_names), info.n_z
        fy, fx = info.frame_shape
        # which (t, c, z) were written: a second write to one is an error, never an overwrite
        self._written = np.zeros((self._t_cap, n_c, n_z), bool)
        #: the interval between time points measured from the frames (plans without one)
        self.measured_interval_s: float | None = None
        self._t_starts: dict[int, int] = {}
        group.mkdir(parents=True, exist_ok=exist_ok or resume)
        if resume:  # the frames adopted again are indexed anew (`adopt`)
            (group / "frames.npy").unlink(missing_ok=True)
        self.index = FrameIndexWriter(group)
        self._write_attrs(status="acquiring")
        self._arr = ts.open(
            {
                "driver": "zarr3",
                "kvstore": _ts_file(group / "0"),
                "metadata": {
                    "shape": [self._t_cap, n_c, n_z, fy, fx],
                    "data_type": self.dtype.name,
                    "chunk_grid": {
                        "name": "regular",
                        "configuration": {
                            "chunk_shape": [1, 1, 1, *_frame_chunk((fy, fx), self.dtype.itemsize)]
                        },
                    },
                    "chunk_key_encoding": {"name": "default"},
                    "codecs": _blosc_codecs(self.dtype.itemsize),
                    # float images: NaN where nothing was written (a model skipped the frame)
                    "fill_value": "NaN" if self.dtype.kind == "f" else 0,
                    "dimension_names": ["t", "c", "z", "y", "x"],
                },
                "create": True,
                # resumed: the array as created before (the same metadata, or an error)
                "open": resume,
                # a chunk file for every frame, dark ones too: existence = complete
                "store_data_equal_to_fill_value": True,
            }
        ).result()

    # -- attributes -------------------------------------------------------
    def _windows_now(self) -> Sequence[Window | tuple[float, float]]:
        if self._windows is not None:
            return self._windows
        version = self.window_sample.version
        if self._data_windows is None or self._data_windows[0] != version:
            self._data_windows = (version, self.window_sample.windows(self.dtype))
        return self._data_windows[1]

    def _write_attrs(self, status: str, **extra: Any) -> None:
        self._status = status
        sc = {
            "format": STORE_FORMAT,
            "image": self.name,
            "status": status,
            "frames_written": self.frames_written,
            "updated": _now_iso(),
            **self._extra_attrs,
            **extra,
        }
        info = self.info
        if not info.interval_s:
            # no interval in the plan: the time scale is what the frames measured, never made up
            sc["interval_s"] = (
                {"measured": self.measured_interval_s}
                if self.measured_interval_s
                else {"unknown": "fewer than two time points so far; the t scale is 1"}
            )
            info = replace(info, interval_s=self.measured_interval_s or 1.0)
        attrs = {
            "ome": image_attrs(
                self.title, info, self.channel_names, self.dtype, self._windows_now()
            ),
            "scopestream": sc,
        }
        write_json_atomic(
            self.group / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        )

    def read_frame(self, t: int, c: int, z: int, p: int = 0) -> np.ndarray:
        """A frame that is already written (for consumers that fell behind the ring buffer)."""
        if p != self.p:
            raise SinkError(f"image {self.title!r} holds position {self.p}, not p={p}")
        out: np.ndarray = np.asarray(self._arr[t, c, z].read().result())
        return out

    def frame_meta(self, seq: int) -> FrameMeta | None:
        """The persisted metadata of the frame with sequence number ``seq``."""
        rec = self.index.find_seq(seq)
        return None if rec is None else to_meta(rec)

    def update_attrs(self, status: str = "acquiring", **extra: Any) -> None:
        """Rewrite this group's attributes with current counts."""
        self._extra_attrs.update(extra)
        self._write_attrs(status)

    # -- pixels -----------------------------------------------------------
    def _ensure_t(self, t: int) -> None:
        if t < self._t_cap:
            return
        if self.info.n_t is not None:
            raise SinkError(
                f"frame at t={t} is outside the plan's {self.info.n_t} time points ({self.name})"
            )
        new_cap = max(t + 1, self._t_cap * 2)
        self.flush()  # resize rewrites metadata; no write may be in flight across it
        n_c, n_z = len(self.channel_names), self.info.n_z
        fy, fx = self.info.frame_shape
        self._arr = self._arr.resize(
            exclusive_max=[new_cap, n_c, n_z, fy, fx], resize_metadata_only=True
        ).result()
        grown = np.zeros((new_cap, n_c, n_z), bool)
        grown[: self._t_cap] = self._written
        self._written = grown
        self._t_cap = new_cap

    def write(self, data: np.ndarray, meta: FrameMeta, *, reference: bool = False) -> None:
        """Start writing one frame at its ``(t, c, z)``.

        Returns once tensorstore has copied the pixels, or at once with
        ``reference=True``: then ``data`` must stay unchanged until the frame is
        counted in ``frames_written`` (the zero-copy path of the recording sink).
        """
        if self._closed:
            raise SinkError(f"image {self.name!r} is closed")
        t, c, z = meta["t"], meta["c"], meta["z"]
        if meta["p"] != self.p:
            raise SinkError(
                f"frame {meta['seq']} is at position {meta['p']}; image {self.title!r} holds "
                f"position {self.p}"
            )
        if not (0 <= c < len(self.channel_names) and 0 <= z < self.info.n_z and t >= 0):
            raise SinkError(
                f"frame {meta['seq']} has indices t={t}, c={c}, z={z} outside the plan "
                f"(c < {len(self.channel_names)}, z < {self.info.n_z})"
            )
        if data.shape != self.info.frame_shape:
            raise SinkError(
                f"frame {meta['seq']} has shape {data.shape}, image {self.name!r} holds "
                f"{self.info.frame_shape}"
            )
        self._ensure_t(t)
        if self._written[t, c, z]:
            raise SinkError(
                f"frame {meta['seq']} is a second frame at t={t}, c={c}, z={z} of image "
                f"{self.name!r}; the first one is kept (a stream may not write a frame twice)"
            )
        self._written[t, c, z] = True
        self._note_time(t, meta["timestamp_ns"])
        first_of_channel = self.window_sample.offer(c, data)
        try:
            self.index.append(meta)  # the metadata is on disk before the pixels
        except OSError as e:
            raise SinkError(
                f"writing the frame index of {self.group} failed: {_explain(e)}"
            ) from e
        try:
            if reference:
                futures = self._arr[t, c, z].write(
                    data.astype(self.dtype, copy=False),
                    can_reference_source_data_indefinitely=True,
                )
            else:
                futures = self._arr[t, c, z].write(data.astype(self.dtype, copy=False))
                futures.copy.result()
        except Exception as e:
            raise SinkError(
                f"writing frame {meta['seq']} to {self.group} failed: {_explain(e)}"
            ) from e
        self._pending.append((futures, t, c, z, meta["timestamp_ns"]))
        self.frames_submitted += 1
        self._t_max = max(self._t_max, t)
        if first_of_channel:  # a reader opening the store now sees this channel's contrast
            try:
                self._write_attrs(self._status)
            except OSError as e:
                raise SinkError(
                    f"updating the attributes of {self.group} failed: {_explain(e)}"
                ) from e
        self.reap(block=len(self._pending) >= self.max_in_flight)

    def adopt(self, meta: FrameMeta, sample: np.ndarray) -> None:
        """Count a frame another process wrote (its chunk is on disk): index its metadata
        and offer ``sample`` (a strided subsample of its pixels) to the omero windows.

        What `scopestream.cluster` calls for each frame a worker wrote.
        """
        t, c, z = meta["t"], meta["c"], meta["z"]
        n_c, n_z = len(self.channel_names), self.info.n_z
        if meta["p"] != self.p or not (0 <= c < n_c and 0 <= z < n_z):
            raise SinkError(
                f"adopted frame t={t} c={c} z={z} p={meta['p']} is not of {self.title!r}"
            )
        self._ensure_t(t)
        if self._written[t, c, z]:
            raise SinkError(f"frame t={t}, c={c}, z={z} of {self.title!r} was adopted twice")
        self._written[t, c, z] = True
        self.index.append(meta)
        self.window_sample.offer(c, sample)
        self.frames_submitted += 1
        self.frames_written += 1
        self._t_max = max(self._t_max, t)

    def _note_time(self, t: int, ts_ns: int) -> None:
        """Measure the interval between time points (median of the first frames' spacing)."""
        if self.info.interval_s or t in self._t_starts or len(self._t_starts) > 64:
            return
        self._t_starts[t] = ts_ns
        if len(self._t_starts) >= 2:
            ts = sorted(self._t_starts.items())
            steps = [(b - a) / 1e9 / (tb - ta) for (ta, a), (tb, b) in itertools.pairwise(ts)]
            if steps:
                self.measured_interval_s = round(float(np.median(steps)), 6) or None

    @property
    def frames_committed(self) -> int:
        """Frames completely on disk."""
        return self.frames_written

    def reap(self, block: bool = False) -> None:
        """Count the frames whose chunks are on disk (in order); wait for one if ``block``."""
        while self._pending and (block or self._pending[0][0].done()):
            futures, t, c, z, ts_ns = self._pending.popleft()
            block = False
            try:
                futures.commit.result()
            except Exception as e:
                raise SinkError(
                    f"writing frame t={t} c={c} z={z} to {self.group} failed: {_explain(e)}"
                ) from e
            self.frames_written += 1
            self.metrics.record(ts_ns)

    def flush(self) -> None:
        """Wait until every frame submitted so far is on disk."""
        while self._pending:
            self.reap(block=True)

    def close(self, status: str = "complete", **extra: Any) -> None:
        """Flush, trim an open-ended time axis to what was written, and record ``status``."""
        if self._closed:
            return
        try:
            if status != "failed":
                self.flush()
            else:
                with contextlib.suppress(SinkError):
                    self.flush()
            if self.info.n_t is None and self._t_max + 1 != self._t_cap:
                n_c, n_z = len(self.channel_names), self.info.n_z
                fy, fx = self.info.frame_shape
                t_len = max(self._t_max + 1, 1)
                self._arr.resize(
                    exclusive_max=[t_len, n_c, n_z, fy, fx], resize_metadata_only=True
                ).result()
        finally:
            self._closed = True
            with contextlib.suppress(OSError):
                self.index.close()
            with contextlib.suppress(OSError):
                self._write_attrs(status, finished=_now_iso(), **extra)


class PositionWriters:
    """One image (a model output, the truth) at every position: writes go to the frame's own.

    What `ZarrSink.add_output` returns for a run of several positions; a run of one
    position gets its `ImageWriter` itself. Same interface as an `ImageWriter`.
    """

    def __init__(self, name: str, writers: Sequence[ImageWriter]) -> None:
        self.name = name
        self.writers = list(writers)
        self.channel_names = self.writers[0].channel_names
        self.dtype = self.writers[0].dtype
        self.metrics = self.writers[0].metrics

    def _for(self, p: int) -> ImageWriter:
        if not 0 <= p < len(self.writers):
            raise SinkError(
                f"a frame at position {p}; image {self.name!r} has {len(self.writers)} positions"
            )
        return self.writers[p]

    @property
    def frames_written(self) -> int:
        """Frames completely written, all positions."""
        return sum(w.frames_written for w in self.writers)

    def write(self, data: np.ndarray, meta: FrameMeta, *, reference: bool = False) -> None:
        """Write one frame into its position's image."""
        self._for(meta["p"]).write(data, meta, reference=reference)

    def read_frame(self, t: int, c: int, z: int, p: int = 0) -> np.ndarray:
        """A frame already written."""
        return self._for(p).read_frame(t, c, z, p)

    def adopt(self, meta: FrameMeta, sample: np.ndarray) -> None:
        """Count a frame another process wrote into its position's image."""
        self._for(meta["p"]).adopt(meta, sample)

    def update_attrs(self, status: str = "acquiring", **extra: Any) -> None:
        """Rewrite every position's attributes."""
        for w in self.writers:
            w.update_attrs(status, **extra)

    def flush(self) -> None:
        """Wait until everything submitted is on disk."""
        for w in self.writers:
            w.flush()

    def close(self, status: str = "complete", **extra: Any) -> None:
        """Close every position's image (all of them, even if one fails)."""
        errors = []
        for w in self.writers:
            try:
                w.close(status, **extra)
            except SinkError as e:
                errors.append(str(e))
        if errors:
            raise SinkError("; ".join(errors))


class ZarrSink:
    """The run's OME-Zarr store (a collection, `scopestream.streaming.collection`); as a
    frame sink it writes the raw frames, each into its position's image.

    Parameters
    ----------
    path
        ``RUN.ome.zarr`` directory to create.
    info
        The stream's layout (its ``positions``: one raw image each).
    config, source
        JSON-able run configuration and source description, saved in attributes.
    overwrite
        Replace an existing store at ``path``; refused by default.
    raw_attrs, attrs
        Extra attributes of every raw image, and of the run (``scopestream`` of the root):
        a ``scopestream predict`` store of several positions is a collection whose
        ``raw`` images are the prediction (``{"prediction": provenance}`` in both).
    resume
        Open the store ``path`` as it was created before (same layout) instead of a
        new one: what `scopestream.cluster` does to finish a re-processing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        info: StreamInfo,
        *,
        config: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        max_in_flight: int = 8,
        attrs_interval_s: float = 1.0,
        raw_attrs: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.info = info
        self._resume = resume
        if not resume:
            prepare_output_path(self.path, overwrite)
        try:
            # held for the writer's lifetime: no --overwrite or second writer while we write
            self.lock: StoreLock | None = StoreLock.acquire(self.path, create=True)
        except OSError as e:
            raise SinkError(f"cannot create the run store at {self.path}: {e}") from e
        self.attrs_interval_s = attrs_interval_s
        self._last_attrs = 0.0
        self.outputs: dict[str, ImageWriter | PositionWriters] = {}
        self._series: list[Series] = []
        self._all: list[ImageWriter] = []
        self._order: deque[tuple[ImageWriter, int]] = deque()  # raw submissions, in order
        self._submitted: dict[int, int] = {}  # per raw writer: frames submitted
        self._provenance: dict[str, Any] = {}
        self._run: dict[str, Any] = {
            "format": STORE_FORMAT,
            "layout": "collection",
            "config": dict(config or {}),
            "source": dict(source or {}),
            "stream": info.to_json(),
            "frames_expected": info.expected_frames,
            "started": _now_iso(),
            "writer": {"pid": os.getpid(), "host": socket.gethostname()},
            "outputs": self._provenance,
            **dict(attrs or {}),
        }
        try:
            self._write_root("acquiring")
            self.raws = self._images(
                "raw", info.channel_names, info.dtype, dict(raw_attrs or {}), max_in_flight
            )
            self._write_index()
        except (OSError, ValueError) as e:
            for w in self._all:
                with contextlib.suppress(Exception):
                    w.index.close()
            cleanup_empty(self.path, self.lock)  # exit 2 "nothing written" leaves nothing
            self.lock = None
            raise SinkError(f"cannot create the run store at {self.path}: {e}") from e
        #: the raw image of the first (or only) position
        self.raw = self.raws[0]
        self.max_in_flight = max_in_flight

    # -- the collection ------------------------------------------------------
    def _images(
        self,
        image: str,
        channel_names: Sequence[str],
        dtype: np.dtype | str,
        attrs: Mapping[str, Any],
        max_in_flight: int,
        windows: Sequence[tuple[float, float]] | None = None,
    ) -> list[ImageWriter]:
        """One image group per position, as the collection's next series (on a plate:
        the fields of the image's own HCS plate)."""
        info = self.info
        several = len(info.positions) > 1
        plate = is_plate(info.positions)
        if plate:
            write_plate(self.path, image, info.positions)
        writers = []
        for p in range(info.n_p):
            pos = info.positions[p] if info.positions else None
            path = str(len(self._series))
            if plate and pos is not None:
                path = plate_path(image, pos) or path
            series = Series(
                path=path,
                image=image,
                p=p,
                position=pos.name if several and pos is not None else None,
                dtype=np.dtype(dtype).name,
                channels=tuple(channel_names),
                shape=(info.n_t or 0, len(channel_names), info.n_z, *info.frame_shape),
                pixel_size_um=info.pixel_size_um,
                z_step_um=info.z_step_um,
                stage=pos,
            )
            where = {"p": p, "position": None if pos is None else pos.to_json()}
            w = ImageWriter(
                self.path / path,
                image,
                info,
                channel_names=channel_names,
                dtype=dtype,
                attrs={**attrs, **where},
                max_in_flight=max_in_flight,
                windows=windows,
                p=p,
                title=series.name,
                resume=self._resume,
            )
            self._series.append(series)
            self._all.append(w)
            writers.append(w)
        return writers

    def _write_index(self) -> None:
        self._run["series"] = [s.to_json() for s in self._series]
        write_series_index(self.path, self._series)

    @property
    def metrics(self) -> StageMetrics:
        """Metrics of the (first position's) raw writer."""
        return self.raw.metrics

    @property
    def frames_written(self) -> int:
        """Raw frames completely written (every position)."""
        return sum(w.frames_written for w in self.raws)

    def add_output(
        self,
        name: str,
        *,
        channel_names: Sequence[str],
        dtype: np.dtype | str = "float32",
        provenance: Mapping[str, Any] | None = None,
        windows: Sequence[tuple[float, float]] | None = None,
    ) -> ImageWriter | PositionWriters:
        """Create the images of one model output (one series per position)."""
        if name in RESERVED_NAMES or name in self.outputs or "/" in name or not name:
            raise ValueError(f"output name {name!r} is reserved, empty or already used")
        prov = {"kind": "prediction", **dict(provenance or {})}
        writers = self._images(
            name, channel_names, dtype, {"prediction": prov}, self.raw.max_in_flight, windows
        )
        writer: ImageWriter | PositionWriters = (
            writers[0] if len(writers) == 1 else PositionWriters(name, writers)
        )
        self.outputs[name] = writer
        self._provenance[name] = prov
        self._write_index()
        self._write_root("acquiring")
        return writer

    def flush(self) -> None:
        """Wait until everything submitted is on disk."""
        for w in self._all:
            w.flush()

    def _raw_for(self, p: int) -> ImageWriter:
        if not 0 <= p < len(self.raws):
            raise SinkError(
                f"a frame at position {p}; the run records {len(self.raws)} position(s)"
            )
        return self.raws[p]

    def read_frame(self, t: int, c: int, z: int, p: int = 0) -> np.ndarray:
        """A raw frame already written."""
        return self._raw_for(p).read_frame(t, c, z, p)

    def frame_meta(self, seq: int) -> FrameMeta | None:
        """The persisted metadata of raw frame ``seq`` (from its position's ``frames.npy``)."""
        for w in self.raws:
            found = w.frame_meta(seq)
            if found is not None:
                return found
        return None

    @property
    def frames_committed(self) -> int:
        """Raw frames completely on disk."""
        return self.frames_written

    @property
    def max_outstanding(self) -> int:
        """Frames `submit` may hold before `collect` must be asked to wait."""
        return self.raw.max_in_flight

    def submit(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Write one raw frame without copying it: ``data`` must stay valid until collected."""
        w = self._raw_for(meta["p"])
        w.write(data, meta, reference=True)
        k = self._submitted.get(id(w), 0)
        self._submitted[id(w)] = k + 1
        self._order.append((w, k))
        self._tick()

    def collect(self, block: bool = False) -> int:
        """How many submitted frames are on disk since the last call, counted in submission
        order across positions (a frame is counted once every frame before it is)."""
        done = 0
        while self._order:
            w, k = self._order[0]
            w.reap(block=block and w.frames_written <= k)
            if w.frames_written <= k:
                break
            self._order.popleft()
            done += 1
            block = False
        return done

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Write one raw frame (copied before returning)."""
        self._raw_for(meta["p"]).write(data, meta)
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_attrs >= self.attrs_interval_s:
            self._last_attrs = now
            self._write_root("acquiring")
            for w in self.raws:
                w.update_attrs("acquiring")

    def _write_root(self, status: str, **extra: Any) -> None:
        self._run.update(extra)
        self._run.update(
            status=status,
            frames_written=sum(w.frames_written for w in getattr(self, "raws", [])),
            updated=_now_iso(),
        )
        try:
            write_json_atomic(
                self.path / "zarr.json",
                {"zarr_format": 3, "node_type": "group", "attributes": root_attrs(self._run)},
            )
        except OSError as e:
            raise SinkError(f"updating the attributes of {self.path} failed: {e}") from e

    def update_run_attrs(self, **extra: Any) -> None:
        """Add ``extra`` to the run's attributes (written with the next status)."""
        self._run.update(extra)

    def mark(self, status: str, error: str | None = None) -> None:
        """Record ``status`` in the run's attributes now (an abort: the process exits next)."""
        with contextlib.suppress(SinkError, OSError):
            self._write_root(status, error=error)

    def close(
        self, status: str = "complete", error: str | None = None, summary: Any = None
    ) -> None:
        """Finish every image and record the final status (``complete``, ``stopped``, ``failed``).

        The raw images are closed after every output and the run's own attributes
        last: if an output fails to close, the run is recorded as ``failed``, never
        as complete. The per-second timeline goes to ``timeline.json`` beside the
        images (the root ``zarr.json`` stays small however long the run).
        """
        errors: list[str] = []
        for out in self.outputs.values():
            try:
                out.close(status)
            except SinkError as e:
                errors.append(str(e))
                status = "failed"
        for w in self.raws:
            try:
                w.close(status)
            except SinkError as e:
                errors.append(str(e))
                status = "failed"
        extra: dict[str, Any] = {"error": error or ("; ".join(errors) or None)}
        if summary is not None:
            summary = dict(summary)
            timeline = summary.pop("timeline", None)
            if timeline is not None:
                try:
                    write_json_atomic(self.path / TIMELINE_FILE, timeline)
                except (OSError, ValueError) as e:
                    errors.append(f"writing {TIMELINE_FILE} failed: {e}")
            if errors:
                summary["status"] = "failed"
            extra["summary"] = summary
        try:
            # the series' sizes as written (an open-ended run's time points are known now)
            self._series = [
                replace(s, shape=(self._t_len(w), *s.shape[1:]))
                for s, w in zip(self._series, self._all, strict=True)
            ]
            with contextlib.suppress(OSError):
                self._write_index()
            self._write_root(status, finished=_now_iso(), **extra)
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
        if errors:
            raise SinkError("; ".join(errors))

    @staticmethod
    def _t_len(w: ImageWriter) -> int:
        return int(w._arr.shape[0])
