"""Training end to end on small simulated data (CPU, seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from scopestream.inference.package import load_package
from tests.conftest import record_sim

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult


@pytest.fixture(scope="module")
def low_light_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in range(4):
        out = record_sim(
            d / f"f{seed}.ome.zarr",
            "--channels", "nuclei:1,nuclei_hi=nuclei:20", "--time-points", "6",
            "--sim-time-step", "60", "--shape", "128x128", "--seed", str(seed), "--sim-truth",
        )  # fmt: skip
        runs.append(out)
    return runs


def _args(runs: list[Path]) -> list[str]:
    return [a for r in runs for a in ("--data", str(r))]


@pytest.fixture(scope="module")
def n2v_trained(
    low_light_runs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """N2V on the noisy channel only, evaluated against the simulator's truth."""
    tmp = tmp_path_factory.mktemp("n2v")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "scopestream",
            "train",
            "--task",
            "denoise",
            "--mode",
            "n2v",
            "--out",
            str(tmp / "reg" / "dn"),
            *_args(low_light_runs),
            "--input-channel",
            "nuclei",
            "--eval-target",
            "truth:nuclei",
            "--max-steps",
            "300",
            "--patch",
            "64x64",
            "--work-dir",
            str(tmp / "work"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_n2v_learns_without_clean_targets(
    cli: Callable[..., CliResult], n2v_trained: dict[str, Any], low_light_runs: list[Path]
) -> None:
    res = n2v_trained
    assert (res["model"], res["version"], res["steps"]) == ("dn", 1, 300)
    assert res["metrics"]["psnr"] > res["baseline_metrics"]["psnr"] + 3
    pkg = load_package(res["package"])
    assert {"report.json", "report.png", "losses.csv", "losses.png"} <= set(
        pkg.manifest.files_sha256
    )
    curve = iio.imread(pkg.files["losses.png"])
    assert curve.ndim == 3 and curve.std() > 10  # a drawn plot, not an empty canvas
    report = json.loads(pkg.files["report.json"])
    assert report["images"] and "baseline_metrics" in report
    assert pkg.manifest.training["mode"] == "n2v"
    assert pkg.manifest.architecture.params["n2v2"] is True
    assert pkg.manifest.input_norm.source == "training"
    # the new version is usable at once by evaluate (and by run --model)
    e = cli(
        "evaluate",
        "--model",
        res["package"],
        "--data",
        str(low_light_runs[2]),
        "--input-channel",
        "nuclei",
        "--target-channel",
        "truth:nuclei",
        "--json",
    )
    assert e.code == 0, e.stderr
    assert e.json["metrics"]["psnr"] > e.json["baseline_metrics"]["psnr"]


def test_care_on_pairs_beats_n2v_on_the_same_data(
    cli: Callable[..., CliResult],
    tmp_path: Path,
    low_light_runs: list[Path],
    n2v_trained: dict[str, Any],
) -> None:
    r = cli(
        "train",
        "--task",
        "denoise",
        "--mode",
        "care",
        "--out",
        str(tmp_path / "reg" / "care"),
        *_args(low_light_runs),
        "--input-channel",
        "nuclei",
        "--target-channel",
        "nuclei_hi",
        "--eval-target",
        "truth:nuclei",
        "--max-steps",
        "300",
        "--patch",
        "64x64",
        "--loss",
        "l1",
        "--work-dir",
        str(tmp_path / "w1"),
        "--json",
        timeout=600,
    )
    assert r.code == 0, r.stderr
    care, n2v = r.json["metrics"], n2v_trained["metrics"]
    # the same held-out split (same fields, seed and patch) and the same ground truth
    assert r.json["baseline_metrics"] == n2v_trained["baseline_metrics"]
    assert care["psnr"] > n2v["psnr"], (care, n2v)
    assert care["ssim"] > n2v["ssim"], (care, n2v)
    r = cli(
        "train",
        "--task",
        "stain",
        "--mode",
        "supervised",
        "--out",
        str(tmp_path / "reg" / "st"),
        *_args(low_light_runs),
        "--input-channel",
        "nuclei",
        "--target-channel",
        "oops",
        "--max-steps",
        "5",
        "--work-dir",
        str(tmp_path / "w2"),
    )
    assert r.code == 2
    assert "has no channel 'oops'" in r.stderr


def test_interrupted_training_resumes_from_its_checkpoint(
    tmp_path: Path, low_light_runs: list[Path]
) -> None:
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "scopestream",
        "train",
        "--task",
        "denoise",
        "--mode",
        "n2v",
        "--out",
        str(tmp_path / "reg" / "dn"),
        *_args(low_light_runs),
        "--input-channel",
        "nuclei",
        "--max-steps",
        "400",
        "--work-dir",
        str(work),
        "--json",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(work.glob("*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert list(work.glob("*/checkpoints/last.ckpt")), "no checkpoint was written"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    res: dict[str, Any] = json.loads(second.stdout.strip().splitlines()[-1])
    assert res["resumed"] is True
    assert res["steps"] == 400


def test_nan_loss_stops_and_says_when(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        tifffile.imwrite(
            tmp_path / f"n{i}.tif",
            rng.normal(500, 50, (4, 96, 96)).astype(np.float32),
            photometric="minisblack",
        )
    r = cli(
        "train",
        "--task",
        "denoise",
        "--mode",
        "n2v",
        "--out",
        str(tmp_path / "reg" / "x"),
        "--inputs",
        str(tmp_path),
        "--lr",
        "1e12",
        "--max-steps",
        "50",
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert r.code == 1
    assert "training loss became" in r.stderr
    assert "at step" in r.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(
    cli: Callable[..., CliResult], tmp_path: Path, low_light_runs: list[Path]
) -> None:
    r = cli(
        "train",
        "--task",
        "denoise",
        "--mode",
        "n2v",
        "--out",
        str(tmp_path / "reg" / "ddp"),
        *_args(low_light_runs),
        "--input-channel",
        "nuclei",
        "--max-steps",
        "20",
        "--devices",
        "2",
        "--work-dir",
        str(tmp_path / "w"),
        "--json",
        timeout=600,
    )
    assert r.code == 0, r.stderr
    assert r.json["steps"] == 20
    assert "gloo" in r.stderr.lower() or "ddp" in r.stderr.lower() or r.json["version"] == 1
