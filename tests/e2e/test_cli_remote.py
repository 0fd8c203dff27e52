"""`publish` and `run --source tcp://…` as users type them: keys, refusals, a killed publisher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import zarr

from scopestream.streaming.saved_run import SavedRun, inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult

def raw_array(store: Path) -> np.ndarray:
    """The run's raw pixels (t, c, z, y, x)."""
    arr = zarr.open_group(str(SavedRun(store).raw.path), mode="r")["0"]
    assert isinstance(arr, zarr.Array)
    return np.asarray(arr[...])


def wait_for_frames(store: Path, n: int, timeout_s: float = 120) -> None:
    """Until a live run's store holds ``n`` complete raw frames."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if inspect_run(store).frames_complete >= n:
                return
        except (OSError, KeyError, ValueError):
            pass  # not created yet
        time.sleep(0.1)
    raise AssertionError(f"{store} never held {n} frames")


# a publisher that sends 30 frames, three of its numbers never reaching the wire (as
# frames lost on the way would), prints its own count, then hangs until killed
STALLED_PUBLISHER = """
import sys, time
import numpy as np
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import FramePublisher
pub = FramePublisher(sys.argv[1], stream=StreamInfo(frame_shape=(32, 40)).to_json())
for t in range(30):
    if t in (5, 11, 20):
        pub.sent += 1
    assert pub.send(np.full((32, 40), t, np.uint16), make_meta(t=t), timeout_ms=60_000)
print(pub.sent, flush=True)
time.sleep(600)
"""


def test_killed_publisher_fails_the_run_with_what_arrived_and_what_was_lost(
    tmp_path: Path, free_port: int
) -> None:
    address = f"tcp://127.0.0.1:{free_port}"
    env = {**os.environ, "NO_COLOR": "1"}
    pub = subprocess.Popen(
        [sys.executable, "-c", STALLED_PUBLISHER, address], stdout=subprocess.PIPE, text=True
    )
    dst = tmp_path / "dst.ome.zarr"
    rx = subprocess.Popen(
        [sys.executable, "-m", "scopestream", "run", "--source", address, "--heartbeat", "2",
         "--out", str(dst), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert pub.stdout is not None
        sent = int(pub.stdout.readline())  # every frame is queued: the publisher hangs now
        # frames still queued inside a killed process are gone without a trace (nobody can
        # count them): kill it once the receiver has recorded what it sent
        wait_for_frames(dst, 30)
        os.kill(pub.pid, signal.SIGKILL)
        out, err = rx.communicate(timeout=120)
    finally:
        for proc in (pub, rx):
            proc.kill()
            proc.communicate()  # closes its pipes
    assert rx.returncode == 1, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["status"] == "failed"
    assert "lost the publisher" in s["error"]
    assert sent == 33
    assert s["frames_written"] == 30
    assert s["frames_lost"] == sent - s["frames_written"] == 3
    assert s["source_counters"]["lost"] == 3
    got = raw_array(dst)[:, 0, 0, 0, 0]
    assert sorted(set(got.tolist())) == list(range(30))  # what arrived is all recorded


def test_off_loopback_without_keys_is_refused(cli: Callable[..., CliResult]) -> None:
    r = cli("publish", "--bind", "tcp://0.0.0.0:5557", "--frames", "1")
    assert r.code == 2
    assert "--curve-secret" in r.stderr and "--insecure" in r.stderr
    assert "scopestream keys" in r.stderr
    r = cli("run", "--source", "tcp://192.0.2.1:5557", "--frames", "1")
    assert r.code == 2
    assert "--curve-server-key" in r.stderr


def test_encrypted_stream_with_keys_delivers_identical_pixels(
    cli: Callable[..., CliResult], tmp_path: Path, free_port: int
) -> None:
    for name in ("scope", "gpu"):
        r = cli("keys", "--out", str(tmp_path / "keys" / name))
        assert r.code == 0, r.stderr
        assert len(r.stdout.strip()) == 40  # the public key, to copy into a message
    keys = tmp_path / "keys"
    src = tmp_path / "src.ome.zarr"
    assert cli("run", "--frames", "12", "--shape", "48x64", "--out", str(src)).code == 0
    pub = subprocess.Popen(
        [sys.executable, "-m", "scopestream", "publish", "--source", f"replay:{src}",
         "--fps", "0", "--bind", f"tcp://0.0.0.0:{free_port}",
         "--curve-secret", str(keys / "scope.key_secret"), "--allow", str(keys / "gpu.key"),
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        dst = tmp_path / "dst.ome.zarr"
        r = cli(
            "run", "--source", f"tcp://127.0.0.1:{free_port}",
            "--curve-server-key", str(keys / "scope.key"),
            "--curve-secret", str(keys / "gpu.key_secret"),
            "--out", str(dst), "--json", timeout=120,
        )  # fmt: skip
        assert r.code == 0, r.stderr
        _, perr = pub.communicate(timeout=60)
        assert pub.returncode == 0, perr
    finally:
        pub.kill()
        pub.communicate()
    assert r.json["frames_written"] == 12
    assert r.json["frames_lost"] == 0
    np.testing.assert_array_equal(raw_array(src), raw_array(dst))


def test_a_fanned_out_stream_is_whole_across_its_receivers(
    cli: Callable[..., CliResult], tmp_path: Path, free_port: int
) -> None:
    """``publish --receivers 2``: each receiver records its share; ``inspect A B`` tells
    which frames each holds and that together they hold all, none twice."""
    address = f"tcp://127.0.0.1:{free_port}"
    stores = [tmp_path / f"rx{k}.ome.zarr" for k in range(2)]
    cmd = [sys.executable, "-m", "scopestream", "run", "--source", address, "--json", "--out"]
    rxs = [
        subprocess.Popen(
            [*cmd, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for out in stores
    ]
    try:
        r = cli("publish", "--bind", address, "--frames", "40", "--fps", "40", "--shape",
                "32x32", "--receivers", "2", "--json", timeout=120)  # fmt: skip
        assert r.code == 0, r.stderr
        for rx in rxs:
            _, rerr = rx.communicate(timeout=120)
            assert rx.returncode == 0, rerr
    finally:
        for rx in rxs:
            rx.kill()
            rx.communicate()
    shares = [inspect_run(s).frames_complete for s in stores]
    assert sum(shares) == 40 and min(shares) > 0, shares
    r = cli("inspect", str(stores[0]), str(stores[1]), "--json")
    assert r.code == 0, r.stderr
    joined = json.loads(r.stdout)
    assert joined["frames_union"] == 40 and joined["frames_held_twice"] == 0
    assert joined["frames_sent"] == 40 and joined["complete"] is True
    assert [s["frames"] for s in joined["stores"]] == shares
    r = cli("inspect", str(stores[0]), str(stores[1]))
    assert "together they hold every frame" in r.stdout
    # a store of another stream is not joined to them
    other = tmp_path / "other.ome.zarr"
    assert cli("run", "--frames", "3", "--shape", "32x32", "--out", str(other)).code == 0
    r = cli("inspect", str(stores[0]), str(other))
    assert r.code == 2 and "not of one stream" in r.stderr
