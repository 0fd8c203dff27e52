"""Training end to end on small simulated data (CPU, seconds)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from scopestream.inference.package import Registry, load_package
from scopestream.training.train import TrainConfig
from tests.conftest import CliResult, record_sim

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


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


#: the training budget of the n2v and care comparison (the same split and budget for both)
_LIGHT = ["--max-steps", "200", "--batch", "8", "--lr", "8e-4", "--patch", "64x64"]


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
            "train", "--force",
            "--task",
            "denoise",
            "--mode",
            "n2v",
            "--out",
            str(tmp / "reg" / "denoise"),  # a bundled model's name: the retrain is v2
            *_args(low_light_runs),
            "--input-channel",
            "nuclei",
            "--eval-target",
            "truth:nuclei",
            # light enough for a loaded 2-core machine, still 3 dB over the input
            *_LIGHT,
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
    # above the bundled denoise v1, and what `--model denoise` now runs
    assert (res["model"], res["version"], res["steps"]) == ("denoise", 2, 200)
    reg = Registry(load_package(res["package"]).path.parents[1])
    assert reg.resolve("denoise").sha256 == load_package(res["package"]).sha256
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
    # the default network: the plain N2V U-Net (bench quality: 1.4 dB over N2V2's)
    assert not pkg.manifest.architecture.params.get("n2v2", False)
    assert pkg.manifest.training["config"]["mask_fraction"] == 0.015
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
        "train", "--force",
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
        *_LIGHT,  # the same budget as n2v's
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
        "train", "--force",
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


#: ``python -c`` driver: ``scopestream ARGS`` with every channel of a run over the in-memory
#: threshold, so runs are read lazily from zarr as a run of many GB is
_LAZY = """
import scopestream.training.data as data
data.IN_MEMORY_BYTES = 0
from scopestream.cli import main
main()
"""


def _driven(driver: str, *args: str) -> CliResult:
    """``scopestream ARGS`` run by a ``python -c`` driver."""
    proc = subprocess.run(
        [sys.executable, "-c", driver, *args], capture_output=True, text=True, timeout=600
    )
    return CliResult(proc)


def test_a_run_over_the_in_memory_threshold_trains_evaluates_and_registers(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """Large runs are read lazily from zarr: training, evaluation and publishing all work."""
    run = record_sim(
        tmp_path / "cut.ome.zarr",
        "--channels", "nuclei:1,nuclei_hi=nuclei:20", "--time-points", "6", "--frames", "11",
        "--sim-time-step", "60", "--shape", "128x128", "--seed", "5", "--sim-truth",
    )  # fmt: skip
    # 11 of 12 frames: nuclei_hi (and its truth) at the last time point was never acquired
    reg = tmp_path / "reg"
    r = _driven(
        _LAZY, "train", "--force",
        "--task", "denoise", "--mode", "care", "--out", str(reg / "big"),
        "--data", str(run), "--input-channel", "nuclei", "--target-channel", "nuclei_hi",
        "--eval-target", "truth:nuclei_hi", "--max-steps", "4", "--patch", "32x32",
        "--batch", "4", "--work-dir", str(tmp_path / "w"), "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    assert (r.json["model"], r.json["version"], r.json["steps"]) == ("big", 1, 4)
    assert r.json["metrics"] and r.json["baseline_metrics"]  # evaluated after training
    published = Registry(reg, bundled=False).resolve("big")
    assert published.sha256 == r.json["sha256"]
    report = json.loads(published.files["report.json"])
    assert report["images"]
    # the model evaluated lazily and in memory: the same frames, the same numbers
    results = []
    ev = ("evaluate", "--model", r.json["package"], "--data", str(run))
    ev += ("--input-channel", "nuclei", "--target-channel", "truth:nuclei_hi", "--json")
    for e in (_driven(_LAZY, *ev), cli(*ev)):
        assert e.code == 0, e.stderr
        results.append(e.json)
    assert results[0]["images"] == 5  # the incomplete time point is left out
    assert results[0] == results[1]


#: ``python -c`` driver: ``scopestream ARGS`` that is SIGKILLed right after its first
#: ``last.ckpt`` is on disk (a crash at a known step, with no race against the training)
_DIE_AFTER_FIRST_CHECKPOINT = """
import os, signal
from lightning.pytorch.callbacks import ModelCheckpoint

save_last = ModelCheckpoint._save_last_checkpoint

def save_then_die(self, trainer, monitor_candidates):
    save_last(self, trainer, monitor_candidates)
    os.kill(os.getpid(), signal.SIGKILL)

ModelCheckpoint._save_last_checkpoint = save_then_die
from scopestream.cli import main
main()
"""


def test_interrupted_training_resumes_from_its_checkpoint(
    cli: Callable[..., CliResult], tmp_path: Path, low_light_runs: list[Path]
) -> None:
    work = tmp_path / "work"
    args = [
        "train", "--force",
        "--task", "denoise", "--mode", "n2v", "--out", str(tmp_path / "reg" / "dn"),
        *_args(low_light_runs), "--input-channel", "nuclei", "--max-steps", "200",
        "--patch", "32x32", "--batch", "8", "--work-dir", str(work), "--json",
    ]  # fmt: skip
    first = _driven(_DIE_AFTER_FIRST_CHECKPOINT, *args)
    # killed at its first checkpoint (validation every 100 steps), not finished
    assert first.code == -signal.SIGKILL, first.stderr
    assert list(work.glob("*/checkpoints/last.ckpt")), "no checkpoint was written"
    second = cli(*args, timeout=600)
    assert second.code == 0, second.stderr
    res = second.json
    # continued from the checkpoint's step (a restart would start from 0) to the end
    assert (res["resumed"], res["resumed_from_step"], res["steps"]) == (True, 100, 200)
    training = load_package(res["package"]).manifest.training
    assert (training["resumed_from_step"], training["steps"]) == (100, 200)


def test_a_version_worse_than_the_input_is_not_published_unless_forced(
    cli: Callable[..., CliResult], tmp_path: Path, low_light_runs: list[Path]
) -> None:
    """Evaluated against its own input (the input is then perfect), any model is worse
    than leaving the data alone: refused, nothing registered; --force publishes it."""
    reg = tmp_path / "reg"
    args = [
        "train", "--task", "denoise", "--mode", "care", "--out", str(reg / "dn"),
        "--data", str(low_light_runs[0]), "--input-channel", "nuclei",
        "--target-channel", "nuclei", "--max-steps", "2", "--patch", "32x32", "--batch", "4",
        "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    refused = cli(*args)
    assert refused.code == 1, refused.stderr
    flat = " ".join(refused.stderr.split())
    assert "not published" in flat and "below the untouched input's" in flat
    assert "--force" in flat
    assert Registry(reg).versions("dn") == []
    forced = cli(*args, "--force", "--json")
    assert forced.code == 0, forced.stderr
    assert forced.json["version"] == 1
    assert [v for v, _ in Registry(reg).versions("dn")] == [1]


def test_worse_than_input_compares_psnr_for_denoisers_and_pearson_for_stains() -> None:
    from scopestream.training.train import worse_than_input

    m, b = {"psnr": 14.0, "pearson": 0.9}, {"psnr": 20.2, "pearson": 0.3}
    assert "PSNR is 14 dB, below the untouched input's 20.2 dB" in str(
        worse_than_input("denoise", m, b)
    )
    assert worse_than_input("stain", m, b) is None  # r 0.9 over the input's 0.3
    assert "Pearson r is 0.2" in str(worse_than_input("stain", {"pearson": 0.2}, b))
    assert worse_than_input("denoise", {}, {}) is None  # nothing measured: nothing to say


def test_nan_loss_stops_and_says_when(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        tifffile.imwrite(
            tmp_path / f"n{i}.tif",
            rng.normal(500, 50, (4, 96, 96)).astype(np.float32),
            photometric="minisblack",
        )
    r = cli(
        "train", "--force",
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
        "train", "--force",
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
    # the size of the process group the ranks formed: 1 for any single-process training
    assert r.json["world_size"] == 2
    assert load_package(r.json["package"]).manifest.training["world_size"] == 2


def test_each_normalization_maps_the_training_data_as_its_method_says() -> None:
    from scopestream.training.data import FieldData, Region
    from scopestream.training.train import _norm_from

    rng = np.random.default_rng(0)
    flat = rng.uniform(100, 1100, (6, 64, 64)).astype(np.float32)
    fields = [FieldData("f", flat)]
    whole = [Region(0, slice(0, 64), slice(0, 64))]

    def mapped(method: str, f: list[FieldData] = fields) -> np.ndarray:
        n = _norm_from(f, whole, None, method)
        assert n.source == "training"
        return (np.asarray(f[0].input, np.float64) - n.offset[0]) / n.scale[0]

    sym = mapped("percentile-sym")  # p0.5 / p99.5 -> -1 / 1 (from a sample: close)
    assert np.percentile(sym, 0.5) == pytest.approx(-1, abs=0.05)
    assert np.percentile(sym, 99.5) == pytest.approx(1, abs=0.05)
    unit = mapped("percentile")  # p1 / p99.8 -> 0 / 1
    assert np.percentile(unit, 1) == pytest.approx(0, abs=0.03)
    assert np.percentile(unit, 99.8) == pytest.approx(1, abs=0.05)
    z = mapped("standard")
    assert z.mean() == pytest.approx(0, abs=0.05) and z.std() == pytest.approx(1, abs=0.05)
    # center: a 70-plane stack whose outer planes are far brighter: only the central
    # 32 planes (19..50) set the constants, so they map to mean 0 / std 1
    bright = np.full((19, 64, 64), 5000.0, np.float32)
    middle = rng.normal(300, 20, (32, 64, 64)).astype(np.float32)
    f3 = [FieldData("s", np.concatenate([bright, middle, bright]), z=70)]
    c = mapped("center", f3)[19:51]
    assert c.mean() == pytest.approx(0, abs=0.05) and c.std() == pytest.approx(1, abs=0.05)


def test_train_freezes_the_chosen_normalization_and_preset_in_the_package(
    cli: Callable[..., CliResult], tmp_path: Path, low_light_runs: list[Path]
) -> None:
    args = [
        "train", "--task", "denoise", "--mode", "care", "--out", str(tmp_path / "reg" / "dn"),
        "--data", str(low_light_runs[0]), "--input-channel", "nuclei",
        "--target-channel", "nuclei_hi", "--max-steps", "2", "--patch", "32x32", "--batch", "4",
        "--work-dir", str(tmp_path / "work"), "--force", "--json",
    ]  # fmt: skip
    r = cli(*args, "--norm", "standard", "--target-norm", "percentile-sym", "--preset", "quality")
    assert r.code == 0, r.stderr
    m = load_package(r.json["package"]).manifest
    raw = np.asarray(_raw_frames(low_light_runs[0], "nuclei"), np.float64)
    assert m.input_norm.offset[0] == pytest.approx(raw.mean(), rel=0.05)
    assert m.input_norm.scale[0] == pytest.approx(raw.std(), rel=0.1)
    assert m.architecture.params["base"] == 32 and m.architecture.params["max_channels"] == 128
    assert m.training["config"]["norm"] == "standard"
    assert m.training["config"]["target_norm"] == "percentile-sym"
    bad = cli(*args, "--norm", "minmax")
    assert bad.code == 2 and "--norm must be one of" in bad.stderr


def test_each_mode_has_its_own_normalization_and_sampling_defaults() -> None:
    n2v = TrainConfig(task="denoise", mode="n2v", out="r/dn")
    care = TrainConfig(task="denoise", mode="care", out="r/dn")
    stain = TrainConfig(task="stain", mode="supervised", out="r/st")
    assert (n2v.norm, n2v.foreground) == ("standard", False)
    assert (care.norm, care.target_norm, care.foreground) == ("standard", "standard", True)
    assert (stain.norm, stain.target_norm, stain.foreground) == ("percentile", "percentile", True)
    chosen = TrainConfig(task="denoise", mode="n2v", out="r/dn", norm="center", foreground=True)
    assert (chosen.norm, chosen.foreground) == ("center", True)
    assert len({n2v.key(), chosen.key()}) == 2


def test_n2v_masking_options_are_recorded_and_bad_ones_refused(
    cli: Callable[..., CliResult], tmp_path: Path, low_light_runs: list[Path]
) -> None:
    args = [
        "train", "--task", "denoise", "--mode", "n2v", "--out", str(tmp_path / "reg" / "dn"),
        "--data", str(low_light_runs[0]), "--input-channel", "nuclei", "--max-steps", "2",
        "--patch", "32x32", "--batch", "4", "--work-dir", str(tmp_path / "work"), "--force",
        "--json",
    ]  # fmt: skip
    r = cli(*args, "--mask-fraction", "0.015", "--mask-replace", "uniform", "--variant", "n2v")
    assert r.code == 0, r.stderr
    m = load_package(r.json["package"]).manifest
    assert m.training["config"]["mask_fraction"] == 0.015
    assert m.training["config"]["mask_replace"] == "uniform"
    assert not m.architecture.params.get("n2v2", False)
    # n2v's defaults from bench quality: z-scored inputs, patches drawn evenly
    assert m.training["config"]["norm"] == "standard"
    assert m.training["config"]["foreground"] is False
    raw = np.asarray(_raw_frames(low_light_runs[0], "nuclei"), np.float64)
    assert m.input_norm.offset[0] == pytest.approx(raw.mean(), rel=0.05)
    bad = cli(*args, "--mask-replace", "mean")
    assert bad.code == 2 and "--mask-replace must be one of" in bad.stderr
    bad = cli(*args, "--mask-fraction", "0.7")
    assert bad.code == 2 and "--mask-fraction must be in" in bad.stderr


def _raw_frames(run: Path, channel: str) -> np.ndarray:
    from scopestream.streaming.saved_run import SavedRun

    raw = SavedRun(run).image("raw")
    return np.asarray(raw.array()[:, raw.channels.index(channel)])
