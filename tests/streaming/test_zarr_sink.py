from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tensorstore as ts
import zarr
from ome_zarr_models.v05 import BioFormats2Raw, Image

from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.saved_run import SavedRun, read_group_attrs
from scopestream.streaming.zarr_sink import (
    SinkError,
    ZarrSink,
    complete_frames,
    inspect_run,
)

if TYPE_CHECKING:
    from pathlib import Path

INFO = StreamInfo(
    frame_shape=(32, 40), dtype="uint16", n_t=5, channel_names=("bf", "nuclei"), n_z=2
)


def fill(t: int, c: int, z: int) -> np.ndarray:
    return np.full((32, 40), 1000 * t + 100 * c + 10 * z + 1, np.uint16)


def write_all(sink: ZarrSink, info: StreamInfo, n_t: int) -> None:
    for t in range(n_t):
        for c in range(info.n_c):
            for z in range(info.n_z):
                sink.write(fill(t, c, z), make_meta(t=t, c=c, z=z))


def test_writes_valid_ome_zarr_05_with_attributes(tmp_path: Path) -> None:
    out = tmp_path / "run.ome.zarr"
    sink = ZarrSink(out, INFO, config={"source": "sim"}, source={"kind": "test"})
    write_all(sink, INFO, 5)
    sink.close(summary={"frames_written": 20})
    coll = BioFormats2Raw.from_zarr(zarr.open_group(str(out), mode="r"))
    assert list(coll.images) == ["0"]  # the run of one position: its raw image only
    raw = SavedRun(out).raw
    assert raw.path == out / "0"
    img = Image.from_zarr(zarr.open_group(str(raw.path), mode="r"))
    ms = img.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["t", "c", "z", "y", "x"]
    assert [a.unit for a in ms.axes] == ["second", None, "micrometer", "micrometer", "micrometer"]
    image_attrs = read_group_attrs(raw.path)
    assert [c["label"] for c in image_attrs["ome"]["omero"]["channels"]] == ["bf", "nuclei"]
    assert image_attrs["scopestream"]["status"] == "complete"
    assert image_attrs["scopestream"]["frames_written"] == 20
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    sc = attrs["scopestream"]
    assert sc["status"] == "complete"
    assert sc["frames_written"] == 20
    assert sc["config"] == {"source": "sim"}
    assert sc["source"] == {"kind": "test"}
    assert sc["summary"] == {"frames_written": 20}
    data = zarr.open_group(str(raw.path), mode="r")["0"][...]
    assert data.shape == (5, 2, 2, 32, 40)
    assert data[3, 1, 0, 0, 0] == 3101
    assert complete_frames(out).all()


def test_open_ended_time_axis_grows_and_is_trimmed(tmp_path: Path) -> None:
    info = StreamInfo(frame_shape=(16, 16), n_t=None)
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    for t in range(150):  # more than the initial capacity (64) twice over
        sink.write(np.full((16, 16), t + 1, np.uint16), make_meta(t=t))
    sink.close()
    arr = SavedRun(tmp_path / "r.ome.zarr").raw.array()
    assert arr.shape == (150, 1, 1, 16, 16)
    assert arr[149, 0, 0, 0, 0] == 150
    assert inspect_run(tmp_path / "r.ome.zarr").frames_complete == 150


def test_outputs_are_series_of_the_collection_with_provenance(tmp_path: Path) -> None:
    out = tmp_path / "r.ome.zarr"
    info = StreamInfo(frame_shape=(16, 16), n_t=3)
    sink = ZarrSink(out, info)
    w = sink.add_output(
        "stain",
        channel_names=["nuclei", "membrane"],
        provenance={"model": "stain", "version": 2, "sha256": "ab"},
    )
    for t in range(3):
        sink.write(np.zeros((16, 16), np.uint16), make_meta(t=t))
        w.write(np.full((16, 16), 0.5, np.float32), make_meta(t=t, c=1))
    sink.close()
    coll = BioFormats2Raw.from_zarr(zarr.open_group(str(out), mode="r"))
    assert list(coll.images) == ["0", "1"]  # raw, then the output: both series
    root = json.loads((out / "zarr.json").read_text())["attributes"]["scopestream"]
    assert root["series"] == [
        {"path": "0", "image": "raw", "p": 0, "position": None},
        {"path": "1", "image": "stain", "p": 0, "position": None},
    ]
    # the OME/ group lists the same series, and its OME-XML has one Image each
    index = json.loads((out / "OME" / "zarr.json").read_text())["attributes"]["ome"]
    assert index["series"] == [e["path"] for e in root["series"]]
    xml = (out / "OME" / "METADATA.ome.xml").read_text()
    assert xml.count("<Image ") == 2 and 'Name="stain"' in xml
    run = SavedRun(out)
    stain = run.image("stain")
    assert stain.path == out / "1"
    Image.from_zarr(zarr.open_group(str(run.raw.path), mode="r"))
    out_img = Image.from_zarr(zarr.open_group(str(stain.path), mode="r"))
    assert out_img.ome_attributes.multiscales[0].name == "stain"
    assert stain.channels == ("nuclei", "membrane")
    assert root["outputs"]["stain"]["version"] == 2
    # the image carries its own provenance too
    assert stain.attrs["prediction"] == {"kind": "prediction", **root["outputs"]["stain"]}
    assert stain.attrs["prediction"]["sha256"] == "ab"
    report = inspect_run(out)
    assert [(i.name, i.frames_complete) for i in report.images] == [("raw", 3), ("stain", 3)]
    with pytest.raises(ValueError, match="reserved"):
        sink.add_output("raw", channel_names=["x"])
    with pytest.raises(ValueError, match="already used"):
        sink.add_output("stain", channel_names=["x"])


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "r.ome.zarr"
    ZarrSink(out, INFO).close()
    with pytest.raises(FileExistsError, match="--overwrite"):
        ZarrSink(out, INFO)
    ZarrSink(out, INFO, overwrite=True).close()
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        ZarrSink(precious, INFO, overwrite=True)
    assert (precious / "chapter1.tex").exists()


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SinkError, match="is not a directory"):
        ZarrSink(blocker / "run.ome.zarr", INFO)


def test_frames_outside_the_plan_are_refused(tmp_path: Path) -> None:
    sink = ZarrSink(tmp_path / "r.ome.zarr", INFO)
    with pytest.raises(SinkError, match="outside the plan"):
        sink.write(fill(0, 0, 0), make_meta(t=0, c=5))
    with pytest.raises(SinkError, match="outside the plan's 5 time points"):
        sink.write(fill(0, 0, 0), make_meta(t=7))
    with pytest.raises(SinkError, match="has shape"):
        sink.write(np.zeros((8, 8), np.uint16), make_meta())
    sink.close("failed", error="test")
    assert inspect_run(tmp_path / "r.ome.zarr").status == "failed"


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from scopestream.streaming.frame import make_meta
    from scopestream.streaming.layout import StreamInfo
    from scopestream.streaming.zarr_sink import ZarrSink
    info = StreamInfo(frame_shape=(64, 64), n_t=1000)
    sink = ZarrSink(sys.argv[1], info, attrs_interval_s=0.05)
    for t in range(1000):
        # frame 0 is a genuinely dark frame: it must still count as written
        sink.write(np.full((64, 64), 0 if t == 0 else t, np.uint16), make_meta(t=t))
        sink.raw.flush()
        print(t + 1, flush=True)
        time.sleep(0.01)
    """
)


def test_kill_9_mid_run_leaves_an_openable_store(tmp_path: Path) -> None:
    out = tmp_path / "crash.ome.zarr"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True
    ) as proc:  # the pipe is closed on the way out
        assert proc.stdout is not None
        done = 0
        for line in proc.stdout:
            done = int(line)
            if done >= 40:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    report = inspect_run(out)
    assert report.interrupted and report.status == "interrupted"
    # every frame flushed before the kill is complete; at most the one in flight more
    assert done <= report.frames_complete <= done + 1
    flags = complete_frames(out)[:, 0, 0]
    assert flags[: report.frames_complete].all() and not flags[report.frames_complete :].any()
    data = np.asarray(
        ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "0" / "0")}})
        .result()
        .read()
        .result()
    )
    assert (data[0] == 0).all() and flags[0]  # a dark frame that was acquired ...
    assert (data[-1] == 0).all() and not flags[-1]  # ... vs a frame never acquired
    for t in range(1, report.frames_complete):
        assert (data[t, 0, 0] == t).all()
    BioFormats2Raw.from_zarr(zarr.open_group(str(out), mode="r"))  # still valid OME-Zarr
    Image.from_zarr(zarr.open_group(str(SavedRun(out).raw.path), mode="r"))
