"""The per-frame index on disk, and its incremental reader (what `view` follows a run with)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scopestream.streaming.frame import make_meta
from scopestream.streaming.frame_index import (
    FILE_NAME,
    FRAME_DTYPE,
    FrameIndexTail,
    FrameIndexWriter,
    read_frame_index,
)

if TYPE_CHECKING:
    from pathlib import Path

    from scopestream.streaming.frame import FrameMeta


def _meta(seq: int, t: int, c: int) -> FrameMeta:
    m = make_meta(t=t, c=c, exposure_ms=5.0)
    m["seq"] = seq
    return m


def _write(w: FrameIndexWriter, seqs: range, n_c: int = 2) -> None:
    for s in seqs:
        w.append(_meta(s, s // n_c, s % n_c))


def test_the_tail_returns_each_record_once_and_waits_for_a_half_written_one(
    tmp_path: Path,
) -> None:
    w = FrameIndexWriter(tmp_path)
    tail = FrameIndexTail(tmp_path)
    try:
        assert len(tail.read_new()) == 0
        _write(w, range(6))
        first = tail.read_new()
        assert first["seq"].tolist() == list(range(6))
        assert len(tail.read_new()) == 0  # nothing new: nothing read again
        _write(w, range(6, 9))
        # a record half on disk (a writer caught mid-write) is not returned yet
        with open(tmp_path / FILE_NAME, "ab") as f:
            f.write(b"\0" * (FRAME_DTYPE.itemsize // 2))
        assert tail.read_new()["seq"].tolist() == [6, 7, 8]
        assert tail.rows == 9
    finally:
        w.close()
    assert read_frame_index(tmp_path)["seq"].tolist() == list(range(9))


def test_a_followed_run_reads_only_what_was_written_since_the_last_look(
    tmp_path: Path,
) -> None:
    from scopestream.viewer.saved import IndexedTimes

    w = FrameIndexWriter(tmp_path)
    index = IndexedTimes()
    try:
        _write(w, range(4))  # t 0, 1 on channels 0 and 1
        assert index.times(tmp_path, 2) == [[0, 1], [0, 1]]
        _write(w, range(4, 7))  # t 2 on both channels, t 3 on channel 0 only
        tail = index._tails[tmp_path]
        before = tail.rows
        assert index.times(tmp_path, 2) == [[0, 1, 2, 3], [0, 1, 2]]
        assert tail.rows - before == 3  # the three new records, not the whole file
        # a late frame of an earlier time point (e.g. read back from a spill) is placed
        w.append(_meta(7, 1, 1))
        w.append(_meta(8, 5, 1))
        assert index.times(tmp_path, 2) == [[0, 1, 2, 3], [0, 1, 2, 5]]
    finally:
        w.close()
    assert IndexedTimes().times(tmp_path / "nothing", 1) is None
    assert np.array_equal(
        np.unique(read_frame_index(tmp_path)["t"]), np.array([0, 1, 2, 3, 5])
    )


_MANY_FIELDS = """
import sys
import numpy as np
from scopestream.streaming.frame import make_meta
from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.layout import Position, StreamInfo
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.zarr_sink import ZarrSink

n, out = int(sys.argv[1]), sys.argv[2]
fields = tuple(Position(f"f{i}", x_um=float(i)) for i in range(n))
sink = ZarrSink(out, StreamInfo((16, 16), n_t=2, positions=fields))
pred = sink.add_output("denoise", channel_names=("raw",))
seq = 0
for t in range(2):
    for p in range(n):
        m = make_meta(t=t, p=p)
        m["seq"] = seq
        seq += 1
        sink.write(np.full((16, 16), p, np.uint16), m)
        pred.write(np.full((16, 16), p, np.float32), m)
sink.close()
run = SavedRun(out)
assert sink.frames_written == 2 * n and len(read_frame_index(out)) == 2 * n
assert all(len(read_frame_index(im.path)) == 2 for im in run.images)
print("ok", len(run.images))
"""


def test_a_run_of_more_fields_than_open_files_allowed_records_every_index(
    tmp_path: Path,
) -> None:
    """300 images (150 fields, raw and one output) under a limit of 256 open files: each
    image's frames.npy held open made image 247 fail with 'Too many open files'."""
    import resource
    import subprocess
    import sys

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    r = subprocess.run(
        [sys.executable, "-c", _MANY_FIELDS, "150", str(tmp_path / "many.ome.zarr")],
        capture_output=True, text=True, timeout=600, preexec_fn=limit_files,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "300"]
