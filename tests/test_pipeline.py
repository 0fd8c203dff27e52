"""`scopestream.Pipeline`: the Python API, in a notebook's way, and attached to the user's own
acquisition on the real engines (pycromanager's and pymmcore-plus's, DemoCamera)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zarr

import scopestream as ss
from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.saved_run import SavedRun, read_group_attrs
from scopestream.streaming.signals import FrameEvent, RunResult
from scopestream.streaming.zarr_sink import complete_frames

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def test_import_is_cheap_and_the_api_is_lazy() -> None:
    code = (
        "import sys, json, scopestream\n"
        "heavy = ['torch', 'napari', 'PySide6', 'onnxruntime', 'pycromanager', 'zarr']\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "scopestream.Pipeline\n"
        "print(json.dumps(before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    # reading runs and writing plans needs none of them either
    code = (
        "import sys, json, scopestream as ss\n"
        "ss.SavedRun, ss.AcquisitionPlan, ss.read_frame_index\n"
        "heavy = ['torch', 'napari', 'PySide6', 'onnxruntime', 'pycromanager', 'useq']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_notebook_run_of_the_simulator_with_live_denoising(tmp_path: Path) -> None:
    pipe = ss.Pipeline.from_config(
        {
            "source": "sim",
            "frames": 12,
            "shape": "64x64",
            "plan": {"channels": "nuclei:2"},
            "models": ["denoise"],
            "model_policy": "all",
            "backend": "onnxruntime",
            "out": str(tmp_path / "nb.ome.zarr"),
        }
    )
    predicted: list[FrameEvent] = []
    finished: list[RunResult] = []
    pipe.events.predictionReady.connect(lambda image, ev: predicted.append(ev))
    pipe.events.runFinished.connect(finished.append)
    summary = pipe.run(timeout=120)
    assert summary["status"] == "complete"
    assert summary["frames_written"] == 12
    assert summary["models"]["model:denoise"]["predicted"] == 12
    assert sorted(ev.seq for ev in predicted) == list(range(12))
    assert all(isinstance(ev, FrameEvent) for ev in predicted)
    assert finished == [
        RunResult("complete", 12, 12, 12, 0, None, str(tmp_path / "nb.ome.zarr"))
    ]
    assert SavedRun(tmp_path / "nb.ome.zarr").image("denoise").complete().all()
    stored = zarr.open_group(str(tmp_path / "nb.ome.zarr"), mode="r").attrs["scopestream"]
    model = stored["summary"]["models"]["model:denoise"]  # in the run's attributes too
    assert model["predicted"] == 12
    assert model["contract"] == "every"
    # the registry watcher's errors and refusals are reported, not swallowed
    assert model["registry_watcher"]["counters"]["errors"] == 0


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "never.ome.zarr"
    with pytest.raises(ss.PipelineError, match="needs --source sim"):
        ss.Pipeline.from_config(
            {"source": "mmcore:demo", "sim_truth": True, "out": str(out)}
        ).build()
    with pytest.raises(ss.PipelineError, match="no model named"):
        ss.Pipeline.from_config({"models": ["no-such-model"], "out": str(out)}).build()
    with pytest.raises(ss.PipelineError, match=r"takes channel \['brightfield'\]"):
        ss.Pipeline.from_config(
            {"source": "sim", "shape": "64x64", "models": ["stain"], "out": str(out)}
        ).build()
    with pytest.raises(ss.PipelineError, match="mm_hooks apply to pycromanager sources only"):
        ss.Pipeline.from_config(
            {"source": "sim", "mm_hooks": {"pre_hardware": "this:s"}, "out": str(out)}
        ).build()
    assert not out.exists()
    assert "this" not in sys.modules  # the hook module was never imported


def test_a_plan_of_several_positions_records_one_collection(tmp_path: Path) -> None:
    """Several positions are no longer refused: each is a raw series of the run's store."""
    out = tmp_path / "four.ome.zarr"
    four = [{"x_um": 60.0 * i} for i in range(4)]
    summary = ss.Pipeline.from_config(
        {"shape": "64x64", "plan": {"time_points": 1, "positions": four}, "out": str(out)}
    ).run(timeout=120)
    assert summary["status"] == "complete" and summary["frames_written"] == 4
    run = SavedRun(out)
    assert run.is_collection and run.n_positions == 4
    assert [(im.name, im.p, im.path.name) for im in run.images] == [
        ("raw", p, str(p)) for p in range(4)
    ]
    index = read_group_attrs(out / "OME")["ome"]["series"]
    assert index == [e["path"] for e in run.attrs["series"]] == ["0", "1", "2", "3"]
    assert (out / "OME" / "METADATA.ome.xml").read_text().count("<Image ") == 4
    assert sorted(read_frame_index(out)["p"].tolist()) == [0, 1, 2, 3]


@pytest.fixture
def demo_core() -> Iterator[Any]:
    """The user's own CMMCorePlus on the DemoCamera (mm-test-adapters)."""
    from scopestream.acquisition.mmcore import demo_config, load_core

    core = load_core(*demo_config())
    yield core
    core.unloadAllDevices()


def test_attach_to_a_users_own_pymmcore_plus_mda(tmp_path: Path, demo_core: Any) -> None:
    import useq

    seq = useq.MDASequence(
        time_plan={"interval": 0, "loops": 3},
        channels=[{"config": "DAPI", "exposure": 5}, {"config": "FITC", "exposure": 8}],
    )
    pipe = ss.Pipeline.from_config(
        {
            "models": ["denoise:DAPI,FITC"],  # the DemoCamera's channels: not what it knows
            "model_policy": "all",
            "backend": "onnxruntime",
            "out": str(tmp_path / "mda.ome.zarr"),
        }
    )
    pipe.attach(demo_core, seq)
    demo_core.mda.run(seq)  # the user's own code runs the MDA (here, on this thread)
    assert pipe.wait(120)
    s = pipe.summary
    assert s is not None and s["status"] == "complete", s
    assert s["frames_written"] == 6 and s["frames_expected"] == 6
    assert s["models"]["model:denoise"]["predicted"] == 6
    run = tmp_path / "mda.ome.zarr"
    assert complete_frames(run).all() and SavedRun(run).image("denoise").complete().all()
    table = read_frame_index(run)
    assert table["c"].tolist() == [0, 1, 0, 1, 0, 1]
    assert table["exposure_ms"].tolist() == [5.0, 8.0] * 3
    assert (table["engine_time_ms"] >= 0).all()  # pymmcore-plus's runner time, per frame
    raw_group = zarr.open_group(str(SavedRun(run).raw.path), mode="r")
    names = [c["label"] for c in raw_group.attrs["ome"]["omero"]["channels"]]
    assert names == ["DAPI", "FITC"]


def test_pycromanager_hook_in_a_users_own_acquisition(tmp_path: Path) -> None:
    import pycromanager as pm
    from mmpycorex import launcher

    from scopestream.acquisition.mmcore import demo_config
    from scopestream.acquisition.pycromanager_source import _forget_engine

    mm_dir, cfg = demo_config()
    _forget_engine()
    pm.start_headless(mm_dir, cfg, python_backend=True)
    try:
        pipe = ss.Pipeline.from_config(
            {
                "plan": {"channels": "DAPI,FITC"},
                "models": ["denoise:DAPI,FITC"],
                "model_policy": "all",
                "backend": "onnxruntime",
                "out": str(tmp_path / "pm.ome.zarr"),
            }
        )
        with pipe:
            events = pm.multi_d_acquisition_events(
                num_time_points=3, channel_group="Channel", channels=["DAPI", "FITC"]
            )
            with pm.Acquisition(
                directory=None, image_process_fn=pipe.pycromanager_hook(), show_display=False
            ) as acq:
                acq.acquire(events)
        s = pipe.summary
    finally:
        pm.stop_headless()
        launcher._PYMMCORES.clear()
        gc.collect()
        _forget_engine()
    assert s is not None and s["status"] == "complete", s
    assert s["frames_written"] == 6
    assert s["models"]["model:denoise"]["predicted"] == 6
    run = tmp_path / "pm.ome.zarr"
    assert complete_frames(run).all() and SavedRun(run).image("denoise").complete().all()
    table = read_frame_index(run)
    assert sorted(zip(table["t"].tolist(), table["c"].tolist(), strict=True)) == [
        (t, c) for t in range(3) for c in range(2)
    ]
    raw = zarr.open_array(str(SavedRun(run).raw.path / "0"), mode="r")
    assert raw.shape[0] == 3  # open-ended in time, trimmed to what was acquired
    assert np.asarray(raw[2, 1, 0]).std() > 0  # a real DemoCamera frame


def test_sim_truth_is_the_simulators_truth_for_every_frame_even_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scopestream.acquisition import sim

    slow = sim.TruthSink.write

    def slow_write(self: Any, data: np.ndarray, meta: Any) -> None:
        time.sleep(0.04)  # a truth writer slower than the camera: it is lapped by the ring
        slow(self, data, meta)

    monkeypatch.setattr(sim.TruthSink, "write", slow_write)
    pipe = ss.Pipeline.from_config(
        {
            "source": "sim",
            "shape": "64x64",
            "buffer_mb": 16 * 64 * 64 * 2 / 2**20,  # 16 slots
            "plan": {
                "channels": "nuclei:2,membrane:9",
                "z_planes": 3,
                "z_step_um": 1.5,
                "time_points": 8,
                "interval_s": 0.1,
            },
            "sim_truth": True,
            "out": str(tmp_path / "t.ome.zarr"),
        }
    )
    summary = pipe.run(timeout=120)
    assert summary["status"] == "complete", summary["error"]
    assert summary["frames_from_recording"]["truth"] > 0  # the slow consumer read frames back
    src = pipe.source
    assert isinstance(src, sim.SimulatedSource)
    truth = SavedRun(tmp_path / "t.ome.zarr").image("truth").array()
    records = read_frame_index(tmp_path / "t.ome.zarr")
    assert len(records) == 48
    from scopestream.streaming.frame_index import to_meta

    for rec in records:
        meta = to_meta(rec)
        expected = src.ground_truth(meta)
        np.testing.assert_allclose(truth[meta["t"], meta["c"], meta["z"]], expected, rtol=1e-6)
    # and it is not the same picture everywhere: exposure and z matter
    assert not np.allclose(truth[0, 0, 0], truth[0, 1, 0])
    assert not np.allclose(truth[0, 0, 0], truth[0, 0, 2])
