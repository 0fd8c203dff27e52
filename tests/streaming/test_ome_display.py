"""What a reader shows from the store alone: omero windows from the data, missing frames as NaN."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import Image

from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.ome import estimate_limits
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.zarr_sink import ImageWriter, ZarrSink
from tests.conftest import record_sim

if TYPE_CHECKING:
    from pathlib import Path


def _windows(group: Path) -> list[dict[str, float]]:
    attrs = json.loads((group / "zarr.json").read_text())["attributes"]
    return [c["window"] for c in attrs["ome"]["omero"]["channels"]]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("display") / "run.ome.zarr"
    return record_sim(
        out, "--channels", "brightfield:5,nuclei:20", "--time-points", "6", "--shape", "96x96",
        "--fps", "0", "--model", "denoise", "--model", "stain", "--model-policy", "all",
        "--backend", "onnxruntime", "--sim-truth", timeout=240,
    )  # fmt: skip


def test_every_image_window_brackets_the_data_written(sim_run: Path) -> None:
    run = SavedRun(sim_run)
    assert run.images[0].name == "raw" and len(run.images) >= 4
    for im in run.images:
        arr = im.array()
        flags = im.complete()
        windows = _windows(im.path)
        assert len(windows) == len(im.channels)
        for c, w in enumerate(windows):
            t_done = np.flatnonzero(flags[:, c].any(axis=-1))
            assert t_done.size, (im.name, c)
            data = np.asarray(arr[t_done, c], np.float64)
            lo, hi = np.percentile(data, [5, 95])
            where = f"{im.name}[{im.channels[c]}]: {w}, data {data.min()}..{data.max()}"
            # the contrast window lies inside the data and keeps its bulk visible
            assert data.min() <= w["start"] <= lo, where
            assert hi <= w["end"] <= data.max(), where
            if np.issubdtype(arr.dtype, np.integer):
                info = np.iinfo(arr.dtype)
                assert (w["min"], w["max"]) == (info.min, info.max), where
            else:
                assert (w["start"], w["end"]) != (0.0, 1.0), where
                assert data.min() <= w["min"] <= w["start"] < w["end"] <= w["max"], where
                assert w["max"] <= data.max(), where
        Image.from_zarr(zarr.open_group(str(im.path), mode="r"))  # still valid OME-Zarr 0.5


INFO = StreamInfo(frame_shape=(128, 128), dtype="uint16", n_t=None, channel_names=("nuclei",))


def test_window_follows_the_whole_run_in_a_bounded_sample(tmp_path: Path) -> None:
    """A run that brightens: the window at close reflects its late frames too."""
    w = ImageWriter(tmp_path / "img", "raw", INFO)
    rng = np.random.default_rng(0)
    for t in range(300):
        frame = rng.normal(100 + 10 * t, 5, INFO.frame_shape).clip(0).astype(np.uint16)
        w.write(frame, make_meta(t=t))
        if t == 0:  # set from the first frame already (a live reader opens the store)
            first = _windows(tmp_path / "img")[0]
            assert 80 <= first["start"] < first["end"] <= 120, first
    # a few frames' strided subsample (~4096 pixels each), however long the run
    assert w.window_sample.nbytes <= 17 * 4096 * 2 < 300 * frame.nbytes / 20
    w.close()
    win = _windows(tmp_path / "img")[0]
    assert win["start"] <= 200 and win["end"] >= 2900, win
    assert (win["min"], win["max"]) == (0, 65535)


def test_window_sample_keeps_frames_spread_over_the_run() -> None:
    from scopestream.streaming.ome import WindowSample

    s = WindowSample(1, frames=8, values=256)
    for t in range(1000):
        s.offer(0, np.full((64, 64), t, np.float32))
    kept = s.values(0)
    assert kept.size <= 9 * 256
    assert kept.min() == 0 and kept.max() >= 800  # early and late frames both represented


def _output_run(tmp_path: Path) -> tuple[Path, ZarrSink]:
    info = StreamInfo(frame_shape=(32, 32), dtype="uint16", n_t=4, channel_names=("nuclei",))
    sink = ZarrSink(tmp_path / "run.ome.zarr", info)
    out = sink.add_output("denoise", channel_names=("nuclei",), provenance={"task": "denoise"})
    for t in range(4):
        sink.write(np.full((32, 32), 100 + t, np.uint16), make_meta(t=t))
        if t % 2 == 0:  # a 'latest' model that skipped t = 1 and 3
            out.write(np.linspace(0.2, 0.7, 32 * 32, dtype=np.float32).reshape(32, 32),
                      make_meta(t=t))  # fmt: skip
    return tmp_path / "run.ome.zarr", sink


def test_frames_a_model_skipped_read_as_nan_not_zero(tmp_path: Path) -> None:
    path, sink = _output_run(tmp_path)
    sink.close()
    run = SavedRun(path)
    den = run.image("denoise").path
    arr = zarr.open_array(str(den / "0"), mode="r")
    assert np.isnan(arr.fill_value)
    got = np.asarray(arr[:, 0, 0])
    assert np.isnan(got[1]).all() and np.isnan(got[3]).all()
    assert np.isfinite(got[0]).all() and np.isfinite(got[2]).all()
    raw = zarr.open_array(str(run.raw.path / "0"), mode="r")
    assert raw.fill_value == 0  # integer images keep 0 (and a chunk file per frame)
    w = _windows(den)[0]
    assert 0.19 <= w["start"] < w["end"] <= 0.71, w  # NaN never reaches the window
    # contrast from a plane with missing pixels ignores them
    assert estimate_limits(got[:2]) == pytest.approx(estimate_limits(got[0]))
    Image.from_zarr(zarr.open_group(str(den), mode="r"))


def test_saved_run_lists_what_each_output_lacks(tmp_path: Path) -> None:
    path, sink = _output_run(tmp_path)
    sink.close()
    by_name: dict[str, Any] = {s.name: s for s in SavedRun(path).channels()}
    assert by_name["nuclei (raw)"].complete_t == [0, 1, 2, 3]
    assert by_name["nuclei (denoised)"].complete_t == [0, 2]
