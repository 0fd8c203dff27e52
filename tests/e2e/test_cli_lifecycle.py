"""How a run ends, said truthfully: stopped by a signal, aborted, or refused before it began."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.zarr_sink import complete_frames, inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult

    Cli = Callable[..., CliResult]


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "scopestream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_frames(proc: subprocess.Popen[str], run: Path, n: int, timeout: float = 120) -> None:
    """Until ``n`` raw frames have their record on disk (the run is really acquiring)."""
    deadline = time.monotonic() + timeout
    while len(read_frame_index(run)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote no frames"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_run_and_it_is_recorded_as_stopped(
    tmp_path: Path, sig: signal.Signals
) -> None:
    run = tmp_path / "r.ome.zarr"
    with _start(
        "run", "--source", "sim", "--shape", "64x64", "--fps", "200", "--frames", "100000",
        "--model", "none", "--out", str(run), "--json",
    ) as proc:  # fmt: skip
        _wait_for_frames(proc, run, 10)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # stopped before the plan ended: not 0, not a crash
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "stopped"
    assert summary["frames_expected"] == 100000
    assert 10 <= summary["frames_acquired"] < 100000
    assert summary["frames_written"] == summary["frames_acquired"]
    assert summary["stopped"] == f"stopped after {summary['frames_acquired']} of 100000 frames"
    report = inspect_run(run)
    assert report.status == "stopped"
    assert report.frames_complete == summary["frames_acquired"]


def test_a_second_interrupt_aborts_cleanly_and_keeps_complete_frames(tmp_path: Path) -> None:
    # every frame predicted on 2 CPU cores: the model falls far behind, so stopping drains long
    run = tmp_path / "r.ome.zarr"
    with _start(
        "run", "--source", "sim", "--shape", "512x512", "--fps", "0", "--frames", "100000",
        "--channels", "nuclei:1", "--model", "denoise", "--model-policy", "all",
        "--backend", "onnxruntime",
        "--out", str(run), "--json",
    ) as proc:  # fmt: skip
        _abort_during_the_drain(proc, run)
    report = inspect_run(run)
    assert report.status == "aborted"
    flags = complete_frames(run)
    assert flags.sum() == report.frames_complete >= 40
    recorded = {(int(r["t"]), int(r["c"]), int(r["z"])) for r in read_frame_index(run)}
    assert {tuple(int(v) for v in i) for i in zip(*flags.nonzero(), strict=True)} <= recorded


def _abort_during_the_drain(proc: subprocess.Popen[str], run: Path) -> None:
    _wait_for_frames(proc, run, 40)
    assert proc.stderr is not None
    lines: list[str] = []
    stopping = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "SIGINT: stopping" in line:
                stopping.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.send_signal(signal.SIGINT)
    assert stopping.wait(60), "".join(lines)  # the first one was handled: now the second
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, "".join(lines)  # a clean exit, not SIGABRT (-6)
    reader.join(10)
    assert any("aborting" in ln for ln in lines)


def test_bad_input_exits_2_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "x.ome.zarr"
    r = cli("run", "--source", "mmcore:demo", "--sim-truth", "--out", str(out))
    assert r.code == 2
    assert "needs --source sim" in r.stderr
    assert not out.exists()
    r = cli("run", "--source", "sim", "--shape", "64x64", "--model", "stain", "--out", str(out))
    assert r.code == 2 and "takes channel" in r.stderr
    assert not out.exists()


def test_install_hints_print_the_extra_as_written(cli: Cli, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.pop("QT_QPA_PLATFORM", None)
    r = cli("run", "--viewer", "--frames", "3", "--out", str(tmp_path / "v.ome.zarr"), env=env)
    assert r.code == 2
    assert "xvfb-run" in r.stderr


def test_overwrite_never_deletes_a_store_being_written(cli: Cli, tmp_path: Path) -> None:
    run = tmp_path / "live.ome.zarr"
    with _start(
        "run", "--source", "sim", "--shape", "64x64", "--fps", "100", "--frames", "100000",
        "--model", "none", "--out", str(run), "--json",
    ) as proc:  # fmt: skip
        _wait_for_frames(proc, run, 5)
        other = cli("run", "--frames", "3", "--shape", "32x32", "--out", str(run), "--overwrite")
        assert other.code == 2
        assert "being written by another run" in other.stderr
        assert "Traceback" not in other.stderr
        second = cli("run", "--frames", "3", "--shape", "32x32", "--out", str(run))
        assert second.code == 2  # and never a second writer
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    summary = json.loads(out.strip().splitlines()[-1])
    report = inspect_run(run)
    assert report.frames_complete == summary["frames_written"] == summary["frames_acquired"]
    # once the writer is gone, --overwrite may replace it
    again = cli("run", "--frames", "3", "--shape", "32x32", "--out", str(run), "--overwrite")
    assert again.code == 0, again.stderr


def test_the_simulator_is_paced_by_the_recording(cli: Cli, tmp_path: Path) -> None:
    # as fast as possible into a 4-slot ring: a camera would outrun it, the simulator waits
    r = cli(
        "run", "--source", "sim", "--shape", "64x64", "--fps", "0", "--frames", "300",
        "--buffer-mb", "0.03", "--model", "none", "--out", str(tmp_path / "p.ome.zarr"), "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    s = r.json
    assert s["buffer"]["slots"] == 4
    assert s["status"] == "complete" and s["frames_written"] == 300 and s["frames_lost"] == 0


def test_predict_bad_input_exits_2_and_leaves_no_output(cli: Cli, tmp_path: Path) -> None:
    from tests.conftest import record_sim

    run = record_sim(tmp_path / "nuc.ome.zarr", "--frames", "3", "--shape", "64x64")
    for out in ("stain.ome.zarr", "stain.tif"):  # the stain model takes brightfield only
        target = str(tmp_path / out)
        r = cli("predict", "--model", "stain", "--input", str(run), "--output", target)
        assert r.code == 2, r.stderr
        assert "takes channel ['brightfield']" in r.stderr
        assert not (tmp_path / out).exists()  # no empty store, no 16-byte TIFF
    x = str(tmp_path / "x.tif")
    r = cli("predict", "--model", "no-such", "--input", str(run), "--output", x)
    assert r.code == 2 and not (tmp_path / "x.tif").exists()
