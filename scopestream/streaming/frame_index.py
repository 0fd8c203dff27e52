"""The per-frame index of an image: every frame's metadata, on disk beside its pixels.

Each image group of a run (``RUN.ome.zarr`` for raw, ``RUN.ome.zarr/<output>``)
holds ``frames.npy``: a NumPy ``.npy`` file of fixed-size records, one per frame
in the order they were written (`FRAME_DTYPE`: seq, t/c/z/p, monotonic and
wall-clock acquisition time, exposure, stage x/y/z, the engine's elapsed time and
image number). Read it with ``numpy.load(path)`` (or ``pandas.DataFrame(numpy.load(path))``),
or with `read_frame_index`.

A record is written (one ``write`` of ``itemsize`` bytes, no buffering) before the
frame's pixels are submitted, so after a crash — even ``kill -9`` — every frame
whose chunk is on disk has its record. The ``.npy`` header's row count is
rewritten every second and at close; `read_frame_index` trusts the file size
instead, so it also sees the records written after the header's last update.
The writer keeps nothing per frame in memory: looking a frame up by ``seq``
reads its record back from the file.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.streaming.frame import FRAME_META_VERSION

if TYPE_CHECKING:
    from scopestream.streaming.frame import FrameMeta

FILE_NAME = "frames.npy"
#: one record per frame (little-endian, 96 bytes); NaN / -1 where the engine said nothing
FRAME_DTYPE = np.dtype(
    [
        ("seq", "<i8"),
        ("t", "<i8"),
        ("c", "<i4"),
        ("z", "<i4"),
        ("p", "<i4"),
        ("_pad", "<i4"),
        ("timestamp_ns", "<i8"),
        ("wall_ns", "<i8"),
        ("exposure_ms", "<f8"),
        ("stage_x_um", "<f8"),
        ("stage_y_um", "<f8"),
        ("stage_z_um", "<f8"),
        ("engine_time_ms", "<f8"),
        ("image_number", "<i8"),
    ]
)
_HEADER_BYTES = 1024  # fixed, so the row count can be rewritten in place


def _header(rows: int) -> bytes:
    """An .npy v1 header for ``rows`` records, padded to `_HEADER_BYTES`."""
    d = {"descr": np.lib.format.dtype_to_descr(FRAME_DTYPE), "fortran_order": False,
         "shape": (rows,)}
    text = repr(d).encode("latin1")
    magic = b"\x93NUMPY\x01\x00"
    pad = _HEADER_BYTES - len(magic) - 2 - len(text) - 1
    body = text + b" " * pad + b"\n"
    return magic + len(body).to_bytes(2, "little") + body


def _opt(v: float | None) -> float:
    return math.nan if v is None else float(v)


def to_record(meta: FrameMeta) -> np.ndarray:
    """One `FRAME_DTYPE` record of ``meta``."""
    rec = np.zeros(1, FRAME_DTYPE)
    r = rec[0]
    r["seq"], r["t"], r["c"], r["z"], r["p"] = (
        meta["seq"], meta["t"], meta["c"], meta["z"], meta["p"],
    )
    r["timestamp_ns"], r["wall_ns"] = meta["timestamp_ns"], meta.get("wall_ns", 0)
    r["exposure_ms"] = meta["exposure_ms"]
    r["stage_x_um"] = _opt(meta.get("stage_x_um"))
    r["stage_y_um"] = _opt(meta.get("stage_y_um"))
    r["stage_z_um"] = _opt(meta.get("stage_z_um"))
    r["engine_time_ms"] = _opt(meta.get("engine_time_ms"))
    r["image_number"] = meta.get("image_number", -1)
    return rec


def _none_if_nan(v: Any) -> float | None:
    f = float(v)
    return None if math.isnan(f) else f


def to_meta(rec: np.void, source: str = "recording") -> FrameMeta:
    """The `FrameMeta` a record holds (what a frame read back from disk carries)."""
    from scopestream.streaming.frame import FrameMeta

    return FrameMeta(
        version=FRAME_META_VERSION,
        seq=int(rec["seq"]),
        t=int(rec["t"]),
        p=int(rec["p"]),
        c=int(rec["c"]),
        z=int(rec["z"]),
        timestamp_ns=int(rec["timestamp_ns"]),
        wall_ns=int(rec["wall_ns"]),
        exposure_ms=float(rec["exposure_ms"]),
        stage_x_um=_none_if_nan(rec["stage_x_um"]),
        stage_y_um=_none_if_nan(rec["stage_y_um"]),
        stage_z_um=_none_if_nan(rec["stage_z_um"]),
        engine_time_ms=_none_if_nan(rec["engine_time_ms"]),
        image_number=int(rec["image_number"]),
        source=source,
    )


#: index files a process keeps open at once; the others are opened for each record.
#: A 96-well plate with 4 fields, raw and two outputs is 1,152 images: one open file
#: each would exceed the usual limit of 1,024 descriptors (``ulimit -n``).
MAX_OPEN_INDEXES = 64
_open_lock = threading.Lock()
_open_count = 0


def _reserve() -> bool:
    global _open_count
    with _open_lock:
        if _open_count >= MAX_OPEN_INDEXES:
            return False
        _open_count += 1
        return True


def _release() -> None:
    global _open_count
    with _open_lock:
        _open_count -= 1


class FrameIndexWriter:
    """Appends one record per frame to ``GROUP/frames.npy`` (see the module docstring).

    The first `MAX_OPEN_INDEXES` writers of a process keep their file open; the
    others open it for each record (a few µs), so a run of many fields never runs
    out of file descriptors.
    """

    def __init__(self, group: Path, header_interval_s: float = 1.0) -> None:
        self.path = Path(group) / FILE_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, _header(0))
        except BaseException:
            os.close(fd)
            raise
        self._held: int | None = fd if _reserve() else None
        if self._held is None:
            os.close(fd)
        self._closed = False
        self.rows = 0
        self._interval = header_interval_s
        self._last_header = time.monotonic()
        self._lock = threading.Lock()  # appends (one writer thread) vs reads (others)

    def _pwrite(self, data: bytes, offset: int) -> None:
        if self._held is not None:
            os.pwrite(self._held, data, offset)
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def append(self, meta: FrameMeta) -> None:
        """Persist one frame's metadata (before its pixels are submitted)."""
        data = to_record(meta).tobytes()
        with self._lock:
            self._pwrite(data, _HEADER_BYTES + self.rows * FRAME_DTYPE.itemsize)
            self.rows += 1
        now = time.monotonic()
        if now - self._last_header >= self._interval:
            self._last_header = now
            self._write_header()

    def _write_header(self) -> None:
        self._pwrite(_header(self.rows), 0)

    def read(self, row: int) -> np.void | None:
        """Record ``row`` (0-based, in write order), or None past the end."""
        if not 0 <= row < self.rows:
            return None
        offset = _HEADER_BYTES + row * FRAME_DTYPE.itemsize
        if self._held is not None:
            raw = os.pread(self._held, FRAME_DTYPE.itemsize, offset)
        else:  # not held open, or closed: the file is still there
            with open(self.path, "rb") as f:
                f.seek(offset)
                raw = f.read(FRAME_DTYPE.itemsize)
        if len(raw) < FRAME_DTYPE.itemsize:
            return None
        rec: np.void = np.frombuffer(raw, FRAME_DTYPE)[0]
        return rec

    def find_seq(self, seq: int) -> np.void | None:
        """The record of frame ``seq`` (records are written in seq order, possibly with gaps)."""
        lo, hi = 0, self.rows
        guess = self.read(min(max(seq, 0), hi - 1)) if hi else None
        if guess is not None and int(guess["seq"]) == seq:
            return guess
        while lo < hi:  # binary search: seq increases with the row
            mid = (lo + hi) // 2
            rec = self.read(mid)
            if rec is None:
                return None
            s = int(rec["seq"])
            if s == seq:
                return rec
            if s < seq:
                lo = mid + 1
            else:
                hi = mid
        return None

    def close(self) -> None:
        """Write the final row count, sync, and close the file."""
        if self._closed:
            return
        self._closed = True
        held, self._held = self._held, None
        fd = held if held is not None else os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, _header(self.rows), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
            if held is not None:
                _release()


def read_frame_index(group: str | os.PathLike[str]) -> np.ndarray:
    """Every record of an image group's ``frames.npy`` (all of them, even after a crash).

    Given a run (the collection's root), the raw frames of every position, in
    ``seq`` order (the ``p`` field says which position). Returns an empty
    `FRAME_DTYPE` array for images without an index (runs recorded before
    per-frame metadata was kept, or other OME-Zarr stores).
    """
    raws = _raw_series(Path(group))
    if raws:
        parts = [read_frame_index(g) for g in raws]
        table = np.concatenate(parts) if parts else np.zeros(0, FRAME_DTYPE)
        return table[np.argsort(table["seq"], kind="stable")]
    path = Path(group) / FILE_NAME
    if not path.exists():
        return np.zeros(0, FRAME_DTYPE)
    size = path.stat().st_size
    rows = max(0, (size - _HEADER_BYTES) // FRAME_DTYPE.itemsize)
    with open(path, "rb") as f:
        f.seek(_HEADER_BYTES)
        out = np.fromfile(f, FRAME_DTYPE, count=rows)
    return out


def _raw_series(path: Path) -> list[Path]:
    """The raw image groups of a run's collection root (none for an image group)."""
    if not (path / "OME").is_dir():  # not a collection: an image group (or an older run)
        return []
    from scopestream.streaming.saved_run import SavedRun  # it reads this module's files

    return [im.path for im in SavedRun(path).images if im.name == "raw"]


class FrameIndexTail:
    """Reads a growing ``frames.npy`` incrementally: each `read_new` returns only the
    records appended since the last call (whole records; a half-written one waits).

    What a viewer following a run that is still written calls every second: the cost
    is that of the new records, not of the whole index.
    """

    def __init__(self, group: str | os.PathLike[str]) -> None:
        self.path = Path(group) / FILE_NAME
        self.rows = 0  # records returned so far

    def read_new(self) -> np.ndarray:
        """The records written since the previous call (empty when there are none)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return np.zeros(0, FRAME_DTYPE)
        rows = max(0, (size - _HEADER_BYTES) // FRAME_DTYPE.itemsize)
        if rows <= self.rows:
            return np.zeros(0, FRAME_DTYPE)
        with open(self.path, "rb") as f:
            f.seek(_HEADER_BYTES + self.rows * FRAME_DTYPE.itemsize)
            out = np.fromfile(f, FRAME_DTYPE, count=rows - self.rows)
        self.rows += len(out)
        return out
