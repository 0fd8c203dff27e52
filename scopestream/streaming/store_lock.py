"""A writer lock on a run store, so that no run deletes or writes a store another run is writing.

The lock is a small file inside the store, ``RUN.ome.zarr/.scopestream.lock``, on which the
writer holds an exclusive `fcntl.flock` for as long as it writes. The file holds JSON (pid,
host, start time, boot id) for error messages only: whether a writer is *live* is decided by
the flock alone, never by the pid. The kernel drops a flock when the last descriptor of its
open file description closes, so a writer that crashes (even ``kill -9``) or a machine that
reboots leaves a *stale* lock file that nobody holds. A pid check cannot tell these apart:
after a reboot, or simply later, the recorded pid may belong to an unrelated live process.

The lock file is never deleted on release. Unlinking a lock file races with a process that
has opened it but not yet locked it (that process would then lock a file nobody else can
find), and a stale file is harmless: it says "nobody is writing", and with the store's
``status`` attribute still ``acquiring`` it says "the writer died" (see `is_locked`).

Limits
------
flock is advisory: it protects against other scopestream runs, not against ``rm -rf``. On
Linux NFS clients flock is emulated with whole-file POSIX locks, which are per *process*
(two descriptors of one process do not conflict, and closing either drops the lock); this
module therefore also remembers which stores the current process holds and never opens a
second descriptor on a lock it holds itself.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

LOCK_NAME = ".scopestream.lock"
"""Name of the lock file inside a run store directory."""

_GRACE_S = 0.2
# `is_locked` probes take the flock for microseconds; a writer that starts during a probe
# would otherwise be refused although nobody writes. A real writer holds the lock for the
# whole run, so retrying this long only ever rides over probes.
_RETRY_S = 0.005

# Locks this process holds, by (st_dev, st_ino) of the lock file. Guarded by _held_guard.
_held: dict[tuple[int, int], StoreLock] = {}
_held_guard = threading.Lock()


class StoreLocked(FileExistsError, RuntimeError):
    """Another live writer holds the run store.

    A `FileExistsError` too, so that callers that already turn "the output exists, refusing"
    into a clean error (the cli's ``run``) report this one the same way without a traceback.

    Attributes
    ----------
    path
        The run store directory.
    holder
        The holder's lock file contents (``pid``, ``host``, ``started``, ...); may be empty
        when the holder has just taken the lock and not written it yet.
    """

    def __init__(self, path: Path, holder: dict[str, Any], action: str = "write it") -> None:
        self.path = path
        self.holder = holder
        self.action = action
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            who = f"this process (pid {os.getpid()})"
        else:
            who = f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
        started = f", started {holder['started']}" if holder.get("started") else ""
        super().__init__(
            f"{path} is being written by {who}{started}; refusing to {action}. "
            "Wait for that run to finish or stop it, or choose another --out"
        )

    def __reduce__(self) -> tuple[type[StoreLocked], tuple[Path, dict[str, Any], str]]:
        # OSError pickles its args (the message); rebuild from the fields instead, so the
        # error survives multiprocessing.
        return (type(self), (self.path, self.holder, self.action))


def _boot_id() -> str | None:
    # Tells a reboot apart in the lock file's info (informational; the flock decides).
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _read_info(fd: int) -> dict[str, Any]:
    """The JSON in an open lock file; {} when empty or half-written (a writer just started)."""
    try:
        data = os.pread(fd, 65536, 0)
        info = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _try_flock(fd: int, op: int, grace_s: float) -> bool:
    """Take ``op`` (LOCK_EX or LOCK_SH) without blocking, retrying for ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(_RETRY_S)
        else:
            return True


def _held_by_us(lock_path: Path) -> StoreLock | None:
    try:
        key = _key(os.stat(lock_path))
    except FileNotFoundError:
        return None
    with _held_guard:
        return _held.get(key)


class StoreLock:
    """An exclusive writer lock on a run store; get one with `acquire`.

    Keeps the lock file open (and flocked) until `release`, or until the process ends.
    Usable as a context manager, which releases on exit.

    Attributes
    ----------
    path
        The run store directory.
    lock_path
        ``path / LOCK_NAME``.
    info
        What this writer wrote into the lock file (pid, host, started, boot_id).
    """

    def __init__(self, path: Path, fd: int, key: tuple[int, int], info: dict[str, Any]) -> None:
        # Private: use `acquire`, which registers the lock.
        self.path = path
        self.lock_path = path / LOCK_NAME
        self.info = info
        self._fd: int | None = fd
        self._key = key

    @classmethod
    def acquire(
        cls, path: str | os.PathLike[str], *, create: bool = False, grace_s: float = _GRACE_S
    ) -> StoreLock:
        """Take the writer lock of the run store at ``path``.

        Parameters
        ----------
        path
            The run store directory (``RUN.ome.zarr``). The lock file is created in it if
            missing; a stale one (left by a crashed writer) is simply taken over.
        create
            Create the store directory if it does not exist (its parent must exist). Lets a
            writer hold the lock before it writes anything into the store.
        grace_s
            How long to retry a refused lock, to ride over `is_locked` probes (which hold it
            for microseconds); a live writer keeps it far longer.

        Returns
        -------
        StoreLock
            The held lock.

        Raises
        ------
        StoreLocked
            Another live writer holds the store, or this process already does (a second
            writer in one process is refused too).
        FileNotFoundError
            The store directory does not exist and ``create`` is false.
        OSError
            The lock file cannot be created or written (read-only store, full disk, ...).
        """
        root = Path(path)
        lock_path = root / LOCK_NAME
        if create:
            root.mkdir(exist_ok=True)
        # Checked before opening: on NFS (POSIX-lock emulation) a second descriptor would not
        # conflict with our own lock, and closing it would silently drop that lock.
        mine = _held_by_us(lock_path)
        if mine is not None:
            raise StoreLocked(root, dict(mine.info))
        while True:
            # O_CLOEXEC (os.open's default) so that programs we exec do not inherit the lock;
            # forked children drop their copy in _forget_in_child.
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if not _try_flock(fd, fcntl.LOCK_EX, grace_s):
                    raise StoreLocked(root, _read_info(fd))
                st = os.fstat(fd)
                try:
                    current = os.stat(lock_path)
                except FileNotFoundError:
                    current = None
                if current is None or _key(current) != _key(st):
                    # Someone deleted or replaced the file between our open and flock (an
                    # --overwrite deleting a stale store): our lock guards nothing; retry.
                    os.close(fd)
                    continue
                info: dict[str, Any] = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "boot_id": _boot_id(),
                }
                _write_info(fd, info)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            lock = cls(root, fd, _key(st), info)
            with _held_guard:
                _held[lock._key] = lock
            return lock

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock (not yet released)."""
        return self._fd is not None

    def release(self, *, mark: bool = True) -> None:
        """Drop the lock (idempotent). The lock file stays; see the module docstring.

        Parameters
        ----------
        mark
            Record ``released`` (a timestamp) in the lock file, so that a stale file tells a
            writer that finished from one that died (best effort: a full disk skips it).
        """
        fd = self._fd
        if fd is None:
            return
        self._fd = None
        with _held_guard:
            if _held.get(self._key) is self:
                del _held[self._key]
        if mark:
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            with contextlib.suppress(OSError):
                _write_info(fd, {**self.info, "released": now})
        # Closing the only descriptor of this open file description drops the flock.
        os.close(fd)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"StoreLock({str(self.path)!r}, {state})"


def _write_info(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info).encode("utf-8")
    # Rewrite in place (we hold the lock, so no other writer interleaves); not fsynced:
    # the contents are only for messages, and a torn file after power loss reads as {}.
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _forget_in_child() -> None:
    # A forked child shares the parent's open file description, so its copy of the fd would
    # keep the store locked after the writer died. Close the copies: the lock is the writer's.
    with _held_guard:
        locks = list(_held.values())
        _held.clear()
    for lock in locks:
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


os.register_at_fork(after_in_child=_forget_in_child)


def is_locked(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Whether a live writer holds the run store at ``path``, and who.

    Briefly takes a shared flock on the lock file and releases it; if that is refused, an
    exclusive lock is held by a live writer. Survives pid reuse and reboots: a lock file
    whose writer died is not held, whatever its pid now belongs to.

    Parameters
    ----------
    path
        The run store directory.

    Returns
    -------
    dict or None
        The holder's lock file contents (``pid``, ``host``, ``started``, ``boot_id``; ``{}``
        if it has not written them yet) while a live writer holds the store; None when
        nobody does: no lock file (a store from before locking, or no store), or a stale one.

    Raises
    ------
    OSError
        The lock file exists but cannot be opened (no read permission): unknown, so no
        answer rather than a wrong "free".
    """
    lock_path = Path(path) / LOCK_NAME
    mine = _held_by_us(lock_path)
    if mine is not None:
        return dict(mine.info)
    try:
        # Read-only, so that stores on read-only media can be inspected; flock needs no
        # write access.
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_SH, 0.0):
            return None
        return _read_info(fd)
    finally:
        # Closing drops our shared lock too.
        os.close(fd)


def read_lock_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock file's contents whether or not it is held; None without a lock file.

    With `is_locked` returning None, this tells what the last writer was: ``released`` in it
    means it finished; without, it died (crash, kill, power loss) while holding the store.
    """
    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return _read_info(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _legacy_writer(path: Path) -> dict[str, Any] | None:
    """The writer recorded in an unlocked store's attributes, if it may still be writing.

    Stores written before locking (or by a writer that takes the lock only after creating
    the store) have no lock file; for them only the recorded pid is left. Its answer errs
    towards "alive" (pid reuse, a reboot), which here only means refusing to delete.
    """
    try:
        meta = json.loads((path / "zarr.json").read_text())
        attrs = meta.get("attributes", {}).get("scopestream", {})
        writer = attrs.get("writer", {})
        pid = int(writer.get("pid", -1))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if (
        attrs.get("status") == "acquiring"
        and writer.get("host") == socket.gethostname()
        and _pid_alive(pid)
    ):
        return {"pid": pid, "host": writer.get("host"), "started": attrs.get("started")}
    return None


def _store_like(path: Path) -> bool:
    """A zarr store, or a directory holding nothing but (maybe) our lock file."""
    if (path / "zarr.json").exists():
        return True
    return all(p.name == LOCK_NAME for p in path.iterdir())


def prepare_output_path(path: Path, overwrite: bool) -> None:
    """Make ``path`` ready for a new run store; with ``overwrite``, delete an old one.

    Refuses to clobber an existing path unless ``overwrite``; never deletes a non-zarr
    directory, a file, a store a live writer holds, or anything through a symbolic link.

    Parameters
    ----------
    path
        The ``RUN.ome.zarr`` directory to create (not created here).
    overwrite
        Delete an existing run store at ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false, or it is not a zarr store, or it is a
        symbolic link.
    StoreLocked
        (a `FileExistsError`) a live writer holds the store; names its pid and host.
    SinkError
        The parent is not a directory, cannot be created, or is not writable.
    """
    # Imported here: zarr_sink imports this module, and SinkError is part of the contract.
    from scopestream.streaming.zarr_sink import SinkError

    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; choose another --out or pass --overwrite to replace it"
            )
        if path.is_symlink():
            # rmtree refuses symlinks with a bare OSError, and deleting the target's contents
            # through a link is not what "replace this output" means.
            raise FileExistsError(
                f"{path} is a symbolic link (to {os.readlink(path)}); refusing to delete "
                "through it even with --overwrite. Pass the store's real path, or remove the link"
            )
        if not (path.is_dir() and _store_like(path)):
            raise FileExistsError(
                f"{path} exists and is not a zarr store; "
                "refusing to delete it even with --overwrite"
            )
        _delete_store(path)
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise SinkError(f"cannot create {path}: {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SinkError(f"cannot create {path}: {e}") from e
    if not os.access(parent, os.W_OK):
        raise SinkError(f"cannot create {path}: {parent} is not writable")


def _delete_store(path: Path) -> None:
    """Delete a run store nobody writes, holding its lock meanwhile."""
    had_lock_file = (path / LOCK_NAME).exists()
    action = "delete it even with --overwrite"
    try:
        # Holding the lock while deleting keeps a writer from starting on the store meanwhile.
        lock = StoreLock.acquire(path)
    except StoreLocked as e:
        raise StoreLocked(path, e.holder, action) from None
    try:
        if not had_lock_file:
            holder = _legacy_writer(path)
            if holder is not None:
                raise StoreLocked(path, holder, action + " (its writer's pid is alive)")
        shutil.rmtree(path)
    finally:
        # The file is gone (or about to be); nothing to mark.
        lock.release(mark=False)


def cleanup_empty(path: str | os.PathLike[str], lock: StoreLock | None = None) -> bool:
    """Remove a store directory we created if nothing was written into it; release ``lock``.

    For a run that failed while creating its store (e.g. a full disk): its exit status says
    "nothing written", so nothing should be left behind. The tree counts as empty when it
    holds only directories, the lock file, and zero-byte files (temporary files a failed
    write left). Call it only on a directory this process created.

    Parameters
    ----------
    path
        The run store directory.
    lock
        This writer's lock on it, released after the directory is removed (and in any case).

    Returns
    -------
    bool
        Whether the directory was removed. Not removed: it does not exist, is a symlink,
        holds data, or another live writer holds it.
    """
    root = Path(path)
    try:
        if root.is_symlink() or not root.is_dir():
            return False
        ours = lock is not None and lock.held and lock.path == root
        if not ours and is_locked(root) is not None:
            return False
        walk_errors: list[OSError] = []
        for dirpath, dirs, files in os.walk(root, onerror=walk_errors.append):
            for name in [*dirs, *files]:
                p = Path(dirpath, name)
                if p.is_symlink():
                    return False
            for name in files:
                p = Path(dirpath, name)
                if p == root / LOCK_NAME:
                    continue
                if not p.is_file() or p.stat().st_size > 0:
                    return False
        if walk_errors:
            # An unreadable subdirectory may hold data: keep the tree.
            return False
        # Removed while still holding the lock, so no writer takes the store meanwhile.
        shutil.rmtree(root)
        return True
    finally:
        if lock is not None:
            lock.release(mark=False)
