"""``predict --cluster``: an archive re-processed on a real dask.distributed cluster (a
scheduler and workers as processes on loopback) is the single-process prediction, pixel
for pixel, and survives a killed worker and a killed client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile
import zarr

from scopestream.cluster import BLOCKS_DIR
from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.saved_run import SavedRun, inspect_run
from tests.conftest import record_sim
from tests.inference.conftest import package

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import CliResult

pytest.importorskip("distributed")

PLATE_YAML = """\
stage_positions:
  plate: 96-well
  a1_center_xy: [0, 0]
  selected_wells: [[0, 0, 1, 1], [0, 1, 0, 1]]
  well_points_plan: {rows: 1, columns: 2}
time_plan: {interval: 0, loops: 3}
z_plan: {range: 1, step: 1}
channels:
  - {config: brightfield, exposure: 5}
  - {config: nuclei, exposure: 20}
"""


def images(store: Path) -> dict[tuple[str, int], np.ndarray]:
    """Every image's pixels, by (name, position)."""
    out = {}
    for im in SavedRun(store).images:
        arr = zarr.open_group(str(im.path), mode="r")["0"]
        assert isinstance(arr, zarr.Array)
        out[im.name, im.p] = np.asarray(arr[...])
    return out


def assert_identical(a: Path, b: Path) -> None:
    """Same images, same pixels (NaN where neither wrote), same frames indexed."""
    ia, ib = images(a), images(b)
    assert ia.keys() == ib.keys()
    for k in ia:
        assert ia[k].shape == ib[k].shape, k
        assert not np.isnan(ia[k]).any(), k  # every plane predicted
        np.testing.assert_array_equal(ia[k], ib[k], err_msg=str(k))  # max |diff| = 0
    for im_a, im_b in zip(SavedRun(a).images, SavedRun(b).images, strict=True):
        ra, rb = read_frame_index(im_a.path), read_frame_index(im_b.path)
        key = ["t", "c", "z", "p", "seq"]
        assert sorted(ra[key].tolist()) == sorted(rb[key].tolist())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A dask scheduler and workers (no nanny: a killed worker stays dead), on loopback."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.procs.append(self._start(
            "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
            "--no-dashboard",
        ))  # fmt: skip

    def _start(self, module: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{module.rsplit('.', 1)[-1]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT
        )

    def add_worker(self) -> subprocess.Popen[bytes]:
        w = self._start(
            "distributed.cli.dask_worker", self.address, "--nthreads", "1", "--no-nanny",
            "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "60",
        )  # fmt: skip
        self.procs.append(w)
        self.workers.append(w)
        return w

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(n, timeout=120)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        c.add_worker()
        c.add_worker()
        c.wait_for_workers(2)
        yield c
    finally:
        c.close()


def summary(r: CliResult) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_a_plate_reprocessed_on_a_local_cluster_is_the_single_process_prediction(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """Every field of a plate, on ``--cluster local:2``: the same store as ``predict``."""
    plan = tmp_path / "plate.yaml"
    plan.write_text(PLATE_YAML)
    run = record_sim(tmp_path / "P.ome.zarr", "--shape", "48x48", "--mda", str(plan))
    single, dist = tmp_path / "single.ome.zarr", tmp_path / "dist.ome.zarr"
    r = cli("predict", "--model", "denoise", "--input", str(run), "--output", str(single))
    assert r.code == 0, r.stderr
    r = cli("predict", "--model", "denoise", "--input", str(run), "--output", str(dist),
            "--cluster", "local:2", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    s = summary(r)
    # 8 fields x 3 time points, the nuclei channel (what the bundled denoiser was trained on)
    assert s["planes"] == 8 * 3 * 2 and s["blocks_failed"] == 0 and s["workers"] == 2
    assert s["blocks_run"] == s["blocks"] and s["blocks_done_before"] == 0
    assert sum(w["planes"] for w in s["per_worker"].values()) == s["planes"]
    assert_identical(single, dist)
    saved = SavedRun(dist)
    assert saved.status == "complete" and saved.n_positions == 8
    assert inspect_run(dist).frames_complete == 8 * 3 * 2
    prov = saved.attrs["prediction"]
    assert prov["model"] == "denoise" and prov["cluster"]["workers"] == 2
    assert saved.attrs["reprocess"]["planes"] == s["planes"]
    from ome_zarr_models.v05 import HCS, BioFormats2Raw

    BioFormats2Raw.from_zarr(zarr.open_group(str(dist), mode="r"))
    HCS.from_zarr(zarr.open_group(str(dist / "raw"), mode="r"))  # the fields are a plate


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 24-frame 192² TIFF time-lapse and a model wide enough that blocks take a while."""
    root = tmp_path_factory.mktemp("stack")
    rng = np.random.default_rng(3)
    data = rng.poisson(80, (24, 192, 192)).astype(np.uint16)
    tif = root / "movie.tif"
    tifffile.imwrite(tif, data)
    pkg = package(root, params={"base": 32}, norm=(80.0, 10.0))
    return tif, pkg.path


def markers(out: Path) -> int:
    return len(list((out / BLOCKS_DIR).glob("*/*.npz")))


def wait_for_markers(out: Path, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while markers(out) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no block finished"
        time.sleep(0.02)


def predict_cmd(tif: Path, pkg: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "scopestream", "predict", "--model", str(pkg), "--input",
            str(tif), "--output", str(out), "--cluster", address, "--block-t", "1",
            "--json"]  # fmt: skip


def test_killed_worker_and_killed_client_finish_identical(
    tmp_path: Path, cli: Callable[..., CliResult], cluster: Cluster, stack: tuple[Path, Path]
) -> None:
    tif, pkg = stack
    single = tmp_path / "single.ome.zarr"
    r = cli("predict", "--model", str(pkg), "--input", str(tif), "--output", str(single))
    assert r.code == 0, r.stderr

    # a worker killed mid-run: its block in flight runs again on the other one
    out = tmp_path / "w.ome.zarr"
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen(predict_cmd(tif, pkg, out, cluster.address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    wait_for_markers(out, 2, proc)
    victim = cluster.workers[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    s = json.loads(stdout.strip().splitlines()[-1])
    assert markers(out) == s["blocks"] == 24
    assert s["blocks_run"] + s["blocks_reused"] == 24 and s["blocks_failed"] == 0
    assert s["retries"] <= 1  # at most the one block in flight on the killed worker (1 thread)
    assert_identical(single, out)

    # the client killed mid-run: run again, only the blocks without a marker are redone
    cluster.add_worker()
    cluster.wait_for_workers(2)
    out = tmp_path / "c.ome.zarr"
    proc = subprocess.Popen(predict_cmd(tif, pkg, out, cluster.address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    wait_for_markers(out, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left_by_kill = markers(out)
    assert left_by_kill < 24, "the run ended before the client was killed"
    assert SavedRun(out).status == "acquiring"  # what a crash leaves: not complete
    r = cli(*predict_cmd(tif, pkg, out, cluster.address)[3:])
    assert r.code == 0, r.stderr
    s = summary(r)
    assert s["blocks_done_before"] >= left_by_kill
    assert s["blocks_done_before"] + s["blocks_run"] + s["blocks_reused"] == 24
    assert "resumed" in r.stderr
    assert_identical(single, out)
    assert SavedRun(out).status == "complete"

    # another model setting: the markers are not reused, the output is not touched
    r = cli(*predict_cmd(tif, pkg, out, cluster.address)[3:], "--tile", "96x96")
    assert r.code == 2 and "tile" in r.stderr and "--overwrite" in r.stderr
    assert_identical(single, out)
    r = cli(*predict_cmd(tif, pkg, out, cluster.address)[3:], "--border", "reflect",
            "--overwrite")  # fmt: skip
    assert r.code == 0, r.stderr
    assert summary(r)["blocks_run"] == 24 and summary(r)["blocks_done_before"] == 0


def test_cluster_refuses_what_it_cannot_do(
    tmp_path: Path, cli: Callable[..., CliResult], stack: tuple[Path, Path]
) -> None:
    tif, pkg = stack
    r = cli("predict", "--model", str(pkg), "--input", str(tif), "--output",
            str(tmp_path / "x.tif"), "--cluster", "local:1")  # fmt: skip
    assert r.code == 2 and "OME-Zarr" in r.stderr
    r = cli("predict", "--model", str(pkg), "--input", str(tif), "--output",
            str(tmp_path / "x.ome.zarr"), "--cluster", "lokal")  # fmt: skip
    assert r.code == 2 and "local:N" in r.stderr
    r = cli("predict", "--model", str(pkg), "--input", str(tif), "--output",
            str(tmp_path / "x.ome.zarr"), "--block-t", "2")  # fmt: skip
    assert r.code == 2 and "--cluster" in r.stderr
    assert not (tmp_path / "x.ome.zarr").exists()


def test_a_temporal_model_reads_its_window_across_block_edges(
    tmp_path: Path, cli: Callable[..., CliResult], cluster: Cluster, stack: tuple[Path, Path]
) -> None:
    """Blocks of one time point: each reads the two before it (a window of 3), so every
    time point from the third on is predicted as in one pass, the first two never."""
    tif, _ = stack
    pkg = package(tmp_path, params={"in_channels": 3, "base": 8}, spatial="2.5d-t", window=3)
    single, dist = tmp_path / "single.ome.zarr", tmp_path / "dist.ome.zarr"
    r = cli("predict", "--model", str(pkg.path), "--input", str(tif), "--output", str(single))
    assert r.code == 0, r.stderr
    r = cli(*predict_cmd(tif, pkg.path, dist, cluster.address)[3:])
    assert r.code == 0, r.stderr
    assert summary(r)["planes"] == 22
    a, b = images(single)["raw", 0], images(dist)["raw", 0]
    assert np.isnan(a[:2]).all() and np.isnan(b[:2]).all()  # no window: no prediction
    np.testing.assert_array_equal(a[2:], b[2:])
    assert not np.isnan(b[2:]).any()


def test_an_ndtiff_dataset_is_reprocessed_as_predict_does(
    tmp_path: Path, cli: Callable[..., CliResult], cluster: Cluster
) -> None:
    """Micro-Manager's NDTiff (read through a dask array, computed on the worker)."""
    r = cli("run", "--source", "pycromanager:demo", "--channels", "DAPI:5,FITC:10",
            "--z-planes", "2", "--time-points", "2", "--mm-save-dir", str(tmp_path / "mm"),
            "--out", str(tmp_path / "live.ome.zarr"))  # fmt: skip
    assert r.code == 0, r.stderr
    single, dist = tmp_path / "single.ome.zarr", tmp_path / "dist.ome.zarr"
    args = ("predict", "--model", "denoise:DAPI,FITC", "--input", str(tmp_path / "mm"))
    r = cli(*args, "--output", str(single))
    assert r.code == 0, r.stderr
    r = cli(*args, "--output", str(dist), "--cluster", cluster.address, "--json")
    assert r.code == 0, r.stderr
    assert summary(r)["planes"] == 2 * 2 * 2
    assert_identical(single, dist)


def test_several_archives_on_one_cluster_each_beside_its_input(
    tmp_path: Path, cli: Callable[..., CliResult], cluster: Cluster
) -> None:
    rng = np.random.default_rng(5)
    tifs = []
    for k in range(2):
        tif = tmp_path / f"plate{k}.tif"
        tifffile.imwrite(tif, rng.poisson(60, (5, 40, 40)).astype(np.uint16))
        tifs.append(tif)
    missing = tmp_path / "gone.tif"
    r = cli("predict", "--model", "denoise", "--input", str(tifs[0]), "--input", str(missing),
            "--input", str(tifs[1]), "--cluster", cluster.address, "--json")  # fmt: skip
    assert r.code == 1 and "1 of 3 archives failed" in r.stderr, r.stderr  # the others ran
    s = summary(r)
    assert [a["output"] for a in s["archives"]] == [
        str(tmp_path / "plate0_denoise.ome.zarr"), str(tmp_path / "plate1_denoise.ome.zarr"),
    ]  # fmt: skip
    assert s["failed"] == [str(missing)]
    for tif in tifs:
        single = tmp_path / f"{tif.stem}_single.ome.zarr"
        r = cli("predict", "--model", "denoise", "--input", str(tif), "--output", str(single))
        assert r.code == 0, r.stderr
        assert_identical(single, tmp_path / f"{tif.stem}_denoise.ome.zarr")
    r = cli("predict", "--model", "denoise", "--input", str(tifs[0]), "--input", str(tifs[1]),
            "--output", str(tmp_path / "one.ome.zarr"), "--cluster", cluster.address)  # fmt: skip
    assert r.code == 2 and "leave out --output" in r.stderr
    r = cli("predict", "--model", "denoise", "--input", str(tifs[0]), "--input", str(tifs[1]))
    assert r.code == 2 and "need --cluster" in r.stderr
