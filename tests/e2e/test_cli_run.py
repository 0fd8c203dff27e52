from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from ome_zarr_models.v05 import BioFormats2Raw, Image

from scopestream.config import dump_config, load_config
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.zarr_sink import inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import CliResult

DATA = Path(__file__).parent / "data"


def attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def raw_array(store: Path) -> zarr.Array:
    """The run's raw pixels (t, c, z, y, x): the array of its raw image (series ``0``)."""
    arr = zarr.open_group(str(SavedRun(store).raw.path), mode="r")["0"]
    assert isinstance(arr, zarr.Array)
    return arr


def test_run_sim_200_frames_valid_ome_zarr(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    out = tmp_path / "X.ome.zarr"
    r = cli(
        "run",
        "--source",
        "sim",
        "--frames",
        "200",
        "--shape",
        "512x512",
        "--model",
        "none",
        "--out",
        str(out),
        "--json",
    )
    assert r.code == 0, r.stderr
    s = r.json
    assert s["frames_acquired"] == 200
    assert s["frames_written"] == 200
    assert s["frames_lost"] == 0
    assert s["status"] == "complete"
    assert s["out"] == str(out)
    assert s["frames_skipped"] == {"zarr": 0}
    assert s["malformed"] == 0
    assert s["fps"] > 0
    assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
    coll = BioFormats2Raw.from_zarr(zarr.open_group(str(out), mode="r"))
    assert coll.ome_attributes.version == "0.5" and list(coll.images) == ["0"]
    img = Image.from_zarr(zarr.open_group(str(out / "0"), mode="r"))
    assert img.ome_attributes.version == "0.5"
    arr = raw_array(out)
    assert arr.shape == (200, 1, 1, 512, 512)
    assert float(np.asarray(arr[199]).mean()) > 100  # real content, not fill value
    sc = attrs(out)["scopestream"]
    assert sc["config"]["source"] == "sim"
    assert sc["config"]["frames"] == 200
    assert sc["source"]["kind"] == "sim"
    assert sc["status"] == "complete"
    assert sc["summary"]["frames_written"] == 200


def test_existing_output_is_refused_unless_overwrite(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    out = tmp_path / "X.ome.zarr"
    assert cli("run", "--frames", "5", "--shape", "32x32", "--out", str(out)).code == 0
    r = cli("run", "--frames", "5", "--shape", "32x32", "--out", str(out))
    assert r.code == 2
    assert "already exists" in r.stderr and "--overwrite" in r.stderr
    assert inspect_run(out).frames_complete == 5  # untouched
    r = cli("run", "--frames", "7", "--shape", "32x32", "--out", str(out), "--overwrite", "--json")
    assert r.code == 0
    assert inspect_run(out).frames_complete == 7


def test_bad_input_exits_2_with_a_reason(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    r = cli("run", "--source", "webcam", "--out", str(tmp_path / "a.ome.zarr"))
    assert r.code == 2
    assert "unknown source 'webcam'" in r.stderr
    r = cli("run", "--shape", "12 by 12", "--out", str(tmp_path / "b.ome.zarr"))
    assert r.code == 2
    assert "shape must look like 512x512" in r.stderr
    r = cli("run", "--model", "segment-everything", "--out", str(tmp_path / "c.ome.zarr"))
    assert r.code == 2
    assert "no model named 'segment-everything'" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = cli("run", "--frames", "3", "--out", str(blocker / "x.ome.zarr"))
    assert r.code == 2
    assert "is not a directory" in r.stderr
    assert not list(tmp_path.glob("*.ome.zarr"))
    # a long path is printed whole, never broken at the console's width
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.parent.mkdir()
    deep.write_text("")
    r = cli("run", "--frames", "3", "--out", str(deep / "x.ome.zarr"))
    assert r.code == 2
    assert f"{deep} is not a directory" in r.stderr


def test_config_file_flags_override_and_effective_config_saved(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    out = tmp_path / "cfg.ome.zarr"
    r = cli(
        "run", "--config", str(DATA / "run.yaml"), "--frames", "12", "--out", str(out), "--json"
    )
    assert r.code == 0, r.stderr
    assert r.json["frames_written"] == 12
    cfg = attrs(out)["scopestream"]["config"]
    assert cfg["frames"] == 12  # flag
    assert cfg["shape"] == [64, 96]  # file
    assert cfg["seed"] == 5
    assert raw_array(out).shape == (12, 1, 1, 64, 96)
    # the saved config is itself a valid config file that reproduces the run
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(cfg))
    assert load_config(saved).model_dump(mode="json") == cfg


@pytest.mark.parametrize("name", ["run", "zstack"])
def test_golden_config_round_trip(name: str) -> None:
    """User YAML (with shorthand) → canonical YAML, byte for byte; canonical → same config."""
    cfg = load_config(DATA / f"{name}.yaml")
    golden = (DATA / f"{name}.golden.yaml").read_text()
    assert dump_config(cfg) == golden
    assert load_config(DATA / f"{name}.golden.yaml") == cfg


def test_shorthand_is_understood() -> None:
    cfg = load_config(DATA / "zstack.yaml")
    assert cfg.shape == (256, 256)
    assert [(c.name, c.exposure_ms) for c in cfg.plan.channels] == [
        ("brightfield", 5),
        ("nuclei", 20),
    ]
    assert load_config(DATA / "run.yaml").shape == (64, 96)


def test_config_typo_is_an_error(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: sim\nframse: 10\n")
    r = cli("run", "--config", str(bad), "--out", str(tmp_path / "x.ome.zarr"))
    assert r.code == 2
    assert "framse: unknown setting" in r.stderr


def test_remote_run_over_loopback_delivers_identical_pixels(
    cli: Callable[..., CliResult], tmp_path: Path, free_port: int
) -> None:
    # record a run, publish it from one process, receive and record it in another
    src = tmp_path / "src.ome.zarr"
    assert (
        cli("run", "--frames", "40", "--shape", "128x160", "--seed", "3", "--out", str(src)).code
        == 0
    )
    address = f"tcp://127.0.0.1:{free_port}"
    pub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scopestream",
            "publish",
            "--source",
            f"replay:{src}",
            "--fps",
            "0",
            "--bind",
            address,
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        dst = tmp_path / "dst.ome.zarr"
        r = cli("run", "--source", address, "--out", str(dst), "--json", timeout=120)
        assert r.code == 0, r.stderr
        out, err = pub.communicate(timeout=60)
        assert pub.returncode == 0, err
    finally:
        pub.kill()
    s = r.json
    assert s["frames_written"] == 40
    assert s["malformed"] == 0
    assert json.loads(out.strip().splitlines()[-1])["frames_written"] == 40
    a = raw_array(src)[...]
    b = raw_array(dst)[...]
    np.testing.assert_array_equal(a, b)
    assert attrs(dst)["scopestream"]["source"]["kind"] == "remote"


def test_replay_run(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    stack = np.random.default_rng(0).integers(0, 4000, (9, 48, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    out = tmp_path / "r.ome.zarr"
    r = cli(
        "run",
        "--source",
        f"replay:{tmp_path / 's.tif'}",
        "--fps",
        "0",
        "--out",
        str(out),
        "--json",
    )
    assert r.code == 0, r.stderr
    assert r.json["frames_written"] == 9
    np.testing.assert_array_equal(raw_array(out)[:, 0, 0], stack)


def _small_files_only() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_disk_full_stops_cleanly_and_keeps_what_was_written(tmp_path: Path) -> None:
    """Chunk writes start failing mid-run with a real OS error (file size limit)."""
    rng = np.random.default_rng(0)
    stack = np.concatenate(
        [
            np.zeros((10, 256, 256), np.uint16),
            rng.integers(0, 65535, (10, 256, 256), dtype=np.uint16),
        ]
    )
    tifffile.imwrite(
        tmp_path / "mixed.tif", stack
    )  # dark frames compress to bytes, noise does not
    out = tmp_path / "full.ome.zarr"
    exe = shutil.which("scopestream") or sys.executable
    args = [exe] if exe.endswith("scopestream") else [exe, "-m", "scopestream"]
    proc = subprocess.run(
        [
            *args,
            "run",
            "--source",
            f"replay:{tmp_path / 'mixed.tif'}",
            "--fps",
            "0",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_small_files_only,
    )
    assert proc.returncode == 1
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s["status"] == "failed"
    assert "File too large" in s["error"]
    assert "frame t=10" in s["error"] or "frame 10" in s["error"]
    assert s["frames_written"] == 10
    assert s["frames_lost"] == 10
    report = inspect_run(out)
    assert report.status == "failed"
    assert report.frames_complete == 10
    np.testing.assert_array_equal(raw_array(out)[:10, 0, 0], stack[:10])


def test_demo_runs_to_its_summary(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    out = tmp_path / "demo.ome.zarr"
    r = cli("demo", "--frames", "30", "--fps", "0", "--out", str(out), "--json")
    assert r.code == 0, r.stderr
    s = r.json
    assert s["frames_written"] == 30
    assert s["status"] == "complete"
    assert "run summary" in r.stderr
    # each output scored against the simulator's truth, beside the raw frames'
    q = {(row["model"], row["channel"]): row for row in s["quality"]}
    # the denoiser runs on the channel it was trained on only: brightfield is not denoised
    assert set(q) == {("denoise", "nuclei"), ("stain", "nuclei")}
    assert all(row["raw"] is not None and row["frames"] >= 1 for row in q.values())
    assert q["stain", "nuclei"]["metric"] == "pearson" and q["stain", "nuclei"]["output"] > 0.5
    # every bundled model beats the raw frames against the truth
    assert all(row["output"] > row["raw"] for row in q.values()), q
    assert "against the simulator's truth" in r.stderr


def test_inspect_reports_a_run(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    out = tmp_path / "i.ome.zarr"
    assert cli("run", "--frames", "6", "--shape", "16x16", "--out", str(out)).code == 0
    r = cli("inspect", str(out), "--json")
    assert r.code == 0
    rep = r.json
    assert rep["status"] == "complete"
    assert rep["frames_complete"] == 6
    assert rep["images"][0]["shape"] == [6, 1, 1, 16, 16]
    r = cli("inspect", str(tmp_path / "nothing.ome.zarr"))
    assert r.code == 2


def test_bench_streaming_smoke(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    """The command runs and reports its documented keys; timings belong to `benchmarks/`."""
    r = cli(
        "bench", "streaming", "--frames", "8", "--shape", "64x64", "--repeats", "1",
        "--workdir", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    b = r.json
    assert b["benchmark"] == "streaming"
    assert (b["frames"], b["shape"], b["repeats"]) == (8, [64, 64], 1)
    writers = {"pipeline", "tensorstore", "file"}
    assert set(b["fps"]) == set(b["mb_per_s"]) == set(b["all_fps"]) == writers
    for v in [*b["fps"].values(), *b["mb_per_s"].values()]:
        assert math.isfinite(v) and v > 0
    assert all(len(v) == 1 for v in b["all_fps"].values())  # one value per repeat
    for key in (
        "ratio_pipeline_vs_tensorstore",
        "ratio_tensorstore_vs_file",
        "ratio_pipeline_vs_file",
    ):
        assert math.isfinite(b[key]) and b[key] > 0, key
    assert not list(tmp_path.iterdir())  # cleaned up


def test_version(cli: Callable[..., CliResult]) -> None:
    r = cli("--version")
    assert r.code == 0
    assert r.stdout.startswith("scopestream ")
