"""The run store's writer lock, with real processes holding, crashing and probing it."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import BioFormats2Raw, Image

from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.store_lock import (
    LOCK_NAME,
    StoreLock,
    StoreLocked,
    cleanup_empty,
    is_locked,
    prepare_output_path,
    read_lock_info,
)
from scopestream.streaming.zarr_sink import SinkError, ZarrSink, inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

REPO = Path(__file__).resolve().parents[2]

HOLD = textwrap.dedent(
    """
    import sys
    from scopestream.streaming.store_lock import StoreLock
    lock = StoreLock.acquire(sys.argv[1], create=sys.argv[2] == "create")
    print("locked", flush=True)
    sys.stdin.readline()
    lock.release()
    print("released", flush=True)
    sys.stdin.readline()
    """
)

PROBE = textwrap.dedent(
    """
    import json, sys
    from scopestream.streaming.store_lock import is_locked
    print(json.dumps(is_locked(sys.argv[1])), flush=True)
    """
)

HAMMER = textwrap.dedent(
    """
    import sys
    from scopestream.streaming.store_lock import is_locked
    is_locked(sys.argv[1])
    print("probing", flush=True)
    while True:
        is_locked(sys.argv[1])
    """
)


def _spawn(script: str, *args: str, ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != ready:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child said {line!r}, not {ready!r}: {err}")
    return proc


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start child processes that are killed (and reaped) at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(script: str, *args: str, ready: str) -> subprocess.Popen[str]:
        proc = _spawn(script, *args, ready=ready)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def kill9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL and reap, so the kernel has closed the child's files (and dropped its flock)."""
    proc.kill()
    proc.communicate()
    assert proc.returncode == -9


def probe_from_other_process(path: Path) -> dict[str, Any] | None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] | None = json.loads(out)
    return result


def fake_store(path: Path) -> Path:
    """A directory that counts as a zarr store, with some 'data'."""
    (path / "0").mkdir(parents=True)
    (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    (path / "0" / "chunk").write_bytes(b"pixels")
    return path


def test_live_writer_refuses_acquire_and_overwrite_until_killed(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    store = fake_store(tmp_path / "run.ome.zarr")
    child = spawn(HOLD, str(store), "open", ready="locked")

    holder = is_locked(store)
    assert holder is not None
    assert holder["pid"] == child.pid
    assert holder["host"] == socket.gethostname()
    assert holder["started"]

    with pytest.raises(StoreLocked, match=f"pid {child.pid} on ") as exc:
        StoreLock.acquire(store)
    assert exc.value.holder["pid"] == child.pid

    # Refused with the holder's pid, as a FileExistsError too (what the cli reports cleanly).
    with pytest.raises(FileExistsError, match=f"pid {child.pid}.*refusing to delete"):
        prepare_output_path(store, overwrite=True)
    assert (store / "zarr.json").exists()
    assert (store / "0" / "chunk").read_bytes() == b"pixels"
    assert is_locked(store) is not None  # our failed attempts did not disturb the holder

    kill9(child)
    # Stale: the file still names the dead writer, without "released"; nobody holds it.
    assert is_locked(store) is None
    stale = read_lock_info(store)
    assert stale is not None
    assert stale["pid"] == child.pid
    assert "released" not in stale

    with StoreLock.acquire(store) as lock:
        assert lock.info["pid"] == os.getpid()
    prepare_output_path(store, overwrite=True)
    assert not store.exists()


def test_clean_release_is_told_apart_from_a_crash(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    store = tmp_path / "run.ome.zarr"
    child = spawn(HOLD, str(store), "create", ready="locked")
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "released"
    # The child is still alive: only the flock says whether it writes.
    assert child.poll() is None
    assert is_locked(store) is None
    info = read_lock_info(store)
    assert info is not None
    assert info["pid"] == child.pid
    assert "released" in info
    StoreLock.acquire(store).release()


def test_stale_lock_naming_a_live_pid_is_not_held(tmp_path: Path) -> None:
    # After a reboot or pid reuse the recorded pid can be alive (here: this very process).
    store = fake_store(tmp_path / "run.ome.zarr")
    stale = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": "before-reboot"}
    (store / LOCK_NAME).write_text(json.dumps(stale))
    assert is_locked(store) is None
    assert probe_from_other_process(store) is None
    with StoreLock.acquire(store) as lock:
        assert lock.info["boot_id"] != "before-reboot"
        assert read_lock_info(store) == lock.info
    prepare_output_path(store, overwrite=True)
    assert not store.exists()


def test_release_and_context_manager(tmp_path: Path) -> None:
    store = tmp_path / "run.ome.zarr"
    with pytest.raises(FileNotFoundError):
        StoreLock.acquire(store)
    with StoreLock.acquire(store, create=True) as lock:
        assert lock.held
        assert lock.lock_path == store / LOCK_NAME
        mine = is_locked(store)
        assert mine is not None
        assert mine["pid"] == os.getpid()
        assert probe_from_other_process(store) == lock.info
    assert not lock.held
    assert "released" in repr(lock)
    lock.release()  # idempotent
    assert is_locked(store) is None
    assert probe_from_other_process(store) is None
    assert (store / LOCK_NAME).exists()  # kept: unlinking would race with a new writer

    lock = StoreLock.acquire(store)
    lock.release()
    assert is_locked(store) is None


def test_same_process_second_acquire_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "run.ome.zarr"
    store.mkdir()
    lock = StoreLock.acquire(store)
    try:
        with pytest.raises(StoreLocked, match=f"this process \\(pid {os.getpid()}\\)"):
            StoreLock.acquire(store, grace_s=0.0)
        # The kernel agrees: flock on a second open of the file conflicts within one process
        # (flock belongs to the open file description, not the process).
        fd = os.open(store / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        # ... and closing that second descriptor did not drop our lock.
        holder = probe_from_other_process(store)
        assert holder is not None
        assert holder["pid"] == os.getpid()
        with pytest.raises(StoreLocked, match="this process"):
            prepare_output_path(store, overwrite=True)
        assert store.exists()
    finally:
        lock.release()
    assert probe_from_other_process(store) is None


def test_probes_do_not_refuse_a_starting_writer(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    # is_locked briefly takes a shared flock; acquire rides over that instead of failing.
    store = tmp_path / "run.ome.zarr"
    store.mkdir()
    spawn(HAMMER, str(store), ready="probing")
    for _ in range(300):
        StoreLock.acquire(store).release()


def test_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    store = tmp_path / "run.ome.zarr"
    lock = StoreLock.acquire(store, create=True)
    r, w = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork in a threaded process; the child only writes and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        os.write(w, b"x")
        # Block until the parent kills us: the child is alive while the parent checks.
        os.read(os.pipe()[0], 1)
        os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"
        lock.release()
        # The live child inherited the fd, yet the store is free: it closed its copy.
        assert probe_from_other_process(store) is None
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)


def test_symlink_is_never_deleted_through(tmp_path: Path) -> None:
    target = fake_store(tmp_path / "target.ome.zarr")
    link = tmp_path / "link.ome.zarr"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_output_path(link, overwrite=False)
    with pytest.raises(FileExistsError, match=r"symbolic link.*refusing to delete"):
        prepare_output_path(link, overwrite=True)
    assert link.is_symlink()
    assert (target / "0" / "chunk").read_bytes() == b"pixels"

    dangling = tmp_path / "dangling.ome.zarr"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="symbolic link"):
        prepare_output_path(dangling, overwrite=True)
    assert dangling.is_symlink()


def test_prepare_output_path_keeps_the_old_contract(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b" / "run.ome.zarr"
    prepare_output_path(new, overwrite=False)
    assert new.parent.is_dir()
    assert not new.exists()

    store = fake_store(tmp_path / "old.ome.zarr")
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_output_path(store, overwrite=False)
    assert store.exists()

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        prepare_output_path(thesis, overwrite=True)
    assert (thesis / "chapter1.tex").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        prepare_output_path(afile, overwrite=True)
    assert afile.read_text() == "x"
    with pytest.raises(SinkError, match="is not a directory"):
        prepare_output_path(afile / "x.ome.zarr", overwrite=False)

    empty = tmp_path / "empty.ome.zarr"
    empty.mkdir()
    prepare_output_path(empty, overwrite=True)
    assert not empty.exists()
    # A store that failed before its metadata: nothing but a stale lock file.
    only_lock = tmp_path / "only_lock.ome.zarr"
    StoreLock.acquire(only_lock, create=True).release()
    prepare_output_path(only_lock, overwrite=True)
    assert not only_lock.exists()


def legacy_store(path: Path, status: str, pid: int) -> Path:
    """A store from before locking: the writer is only known from the attributes."""
    fake_store(path)
    attrs = {"status": status, "writer": {"pid": pid, "host": socket.gethostname()}}
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {"scopestream": attrs}}
    (path / "zarr.json").write_text(json.dumps(meta))
    return path


def test_unlocked_legacy_store_falls_back_to_the_writer_pid(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    other = spawn(HOLD, str(tmp_path), "open", ready="locked")  # any live process
    live = legacy_store(tmp_path / "live.ome.zarr", "acquiring", other.pid)
    with pytest.raises(StoreLocked, match=f"pid {other.pid}.*pid is alive"):
        prepare_output_path(live, overwrite=True)
    assert (live / "0" / "chunk").exists()

    done = legacy_store(tmp_path / "done.ome.zarr", "complete", other.pid)
    prepare_output_path(done, overwrite=True)
    assert not done.exists()
    kill9(other)
    crashed = legacy_store(tmp_path / "crashed.ome.zarr", "acquiring", other.pid)
    prepare_output_path(crashed, overwrite=True)
    assert not crashed.exists()


def test_cleanup_empty_removes_only_what_holds_nothing(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    store = tmp_path / "zero.ome.zarr"
    lock = StoreLock.acquire(store, create=True)
    (store / "0").mkdir()
    (store / "0" / "zarr.json.__lock").write_bytes(b"")  # a write that failed on a full disk
    assert cleanup_empty(store, lock)
    assert not store.exists()
    assert not lock.held

    kept = tmp_path / "kept.ome.zarr"
    lock = StoreLock.acquire(kept, create=True)
    (kept / "zarr.json").write_text("{}")
    assert not cleanup_empty(kept, lock)
    assert (kept / "zarr.json").exists()
    assert not lock.held

    linked = tmp_path / "linked.ome.zarr"
    linked.mkdir()
    (linked / "0").symlink_to(tmp_path / "kept.ome.zarr")
    assert not cleanup_empty(linked)
    assert linked.exists()

    theirs = tmp_path / "theirs.ome.zarr"
    child = spawn(HOLD, str(theirs), "create", ready="locked")
    assert not cleanup_empty(theirs)
    assert (theirs / LOCK_NAME).exists()
    kill9(child)
    assert cleanup_empty(theirs)
    assert not cleanup_empty(tmp_path / "missing.ome.zarr")


def test_a_real_run_store_with_its_lock_file_still_reads(tmp_path: Path) -> None:
    out = tmp_path / "run.ome.zarr"
    info = StreamInfo(frame_shape=(16, 16), n_t=3)
    sink = ZarrSink(out, info)  # the writer holds the store's lock from here to close()
    assert is_locked(out) is not None
    with pytest.raises(StoreLocked):  # a second writer in this process too
        StoreLock.acquire(out)
    for t in range(3):
        meta = make_meta(t=t)
        meta["seq"] = t
        sink.write(np.full((16, 16), t + 1, np.uint16), meta)
    sink.flush()
    # While held: readers are unaffected, an overwrite is refused.
    assert inspect_run(out).frames_complete == 3
    with pytest.raises(StoreLocked):
        prepare_output_path(out, overwrite=True)
    sink.close()
    assert is_locked(out) is None
    BioFormats2Raw.from_zarr(zarr.open_group(str(out), mode="r"))
    Image.from_zarr(zarr.open_group(str(out / "0"), mode="r"))  # the raw image, series 0
    assert np.asarray(zarr.open_array(str(out / "0" / "0"), mode="r"))[2, 0, 0, 0, 0] == 3
    assert inspect_run(out).status == "complete"
    prepare_output_path(out, overwrite=True)
    assert not out.exists()


def test_store_locked_pickles(tmp_path: Path) -> None:
    e = StoreLocked(tmp_path, {"pid": 1, "host": "h", "started": "s"}, "delete it")
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e)
    assert back.holder == e.holder
    assert isinstance(back, RuntimeError)
    assert isinstance(back, FileExistsError)
