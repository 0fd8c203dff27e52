"""`RegistryWatcher`: newer versions of a running model, loaded and swapped in the background.

Versions are told apart by their package sha256, never by number alone: the
watcher swaps when the newest version of the model in the registry is a
different package from the one running (a retrained ``denoise`` v1 in the user
registry over the bundled ``denoise`` v1 is a new model).

A new version that cannot take over is *refused*, and the running model goes
on: one that fails to load, verify or compile, or one that would change what
the run records (`swap_incompatibility`: spatial mode, window, input channels,
outputs). A refused package is not tried again; publish a new version. A
failure to read the registry (an ``OSError`` on a network share, say) is an
*error*: counted, reported, and the next poll tries again. Both are counted
(`RegistryWatcher.counters`), the last few reasons kept
(`RegistryWatcher.describe`), and passed to the ``on_error`` / ``on_refused``
callbacks.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from scopestream.inference.package import PackageError, load_package, package_sha256

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.inference.engine import InferenceEngine
    from scopestream.inference.manifest import Manifest
    from scopestream.inference.package import Registry
    from scopestream.inference.predictor import Predictor

MAX_REASONS = 20
"""Reasons (errors, refusals) a watcher keeps; older ones are only counted."""

PollResult = Literal["unchanged", "swapped", "refused", "error"]


class SwapRefused(ValueError):
    """A model that cannot take over from the running one mid-run."""


def swap_incompatibility(old: Manifest, new: Manifest) -> str | None:
    """Why ``new`` cannot take over from ``old`` mid-run, or None if it can.

    A swap happens between two frames of one output image, so the new model
    must take the same input (spatial mode, window, input channels) and write
    the same channels (outputs). Weights, normalization, halo and tiling may
    change.

    Parameters
    ----------
    old
        Manifest of the running model.
    new
        Manifest of the candidate.

    Returns
    -------
    str or None
        A sentence naming every difference, or None.
    """
    diffs = [
        f"{what} {a!r} -> {b!r}"
        for what, a, b in (
            ("spatial mode", old.spatial, new.spatial),
            ("window", old.window, new.window),
            ("input channels", list(old.inputs), list(new.inputs)),
            ("outputs", list(old.outputs), list(new.outputs)),
        )
        if a != b
    ]
    if not diffs:
        return None
    return (
        f"{new.name} v{new.version} cannot replace {old.name} v{old.version} mid-run: "
        f"it changes the {', '.join(diffs)}"
    )


def _reason(e: BaseException) -> str:
    # our own errors say what happened; anything else needs its type (a bare
    # MemoryError or KeyError has an empty or cryptic message)
    if isinstance(e, (PackageError, SwapRefused)):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class RegistryWatcher:
    """Polls the registry; loads, compiles and swaps in newer versions in the background.

    Parameters
    ----------
    registry
        Where new versions appear.
    name
        The model's registry name.
    engine
        The engine running the model (`InferenceEngine.swap` hands it over).
    make_predictor
        Loads and compiles a package into a ready `Predictor` (off the hot path).
    interval_s
        Seconds between polls.
    on_swap
        Called with the new package's identity once it is handed to the engine.
    on_error
        Called with the reason when the registry cannot be read (tried again at
        the next poll).
    on_refused
        Called with a version's identity (``model``, ``version``, ``sha256``,
        ``path``, and ``task`` once loaded) and the reason it was refused.

    Notes
    -----
    Callbacks run on the watcher's thread. An exception in one is counted as
    an error and kept with the others; it never stops the watcher.
    """

    def __init__(
        self,
        registry: Registry,
        name: str,
        engine: InferenceEngine,
        make_predictor: Callable[[Any], Predictor],
        *,
        interval_s: float = 2.0,
        on_swap: Callable[[dict[str, Any]], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_refused: Callable[[dict[str, Any], str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self.engine = engine
        self.make_predictor = make_predictor
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.on_error = on_error
        self.on_refused = on_refused
        running = engine.predictor.package
        self._running: dict[str, Any] = dict(running.identity)
        self._refused_sha: set[str] = set()
        self._counts = {"polls": 0, "swaps": 0, "refused": 0, "errors": 0}
        self._errors: deque[str] = deque(maxlen=MAX_REASONS)
        self._refusals: deque[dict[str, Any]] = deque(maxlen=MAX_REASONS)
        self._lock = threading.Lock()  # counters and reasons are read from other threads
        self._poll_lock = threading.Lock()  # one poll at a time (thread or caller)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    # -- reporting -------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """``polls``, ``swaps``, ``refused`` and ``errors`` so far (JSON-able)."""
        with self._lock:
            return dict(self._counts)

    @property
    def errors(self) -> list[str]:
        """The last `MAX_REASONS` error reasons, oldest first."""
        with self._lock:
            return list(self._errors)

    def describe(self) -> dict[str, Any]:
        """What runs, the counters and the last reasons, for summaries and attributes.

        Returns
        -------
        dict
            ``model``, ``running`` (identity of the version last handed to the
            engine), ``counters``, ``errors`` (last reasons, oldest first),
            ``refused`` (last refused identities, each with its ``reason``),
            ``polling`` (whether the thread is alive). JSON-able.
        """
        with self._lock:
            return {
                "model": self.name,
                "running": dict(self._running),
                "counters": dict(self._counts),
                "errors": list(self._errors),
                "refused": [dict(r) for r in self._refusals],
                "polling": self._thread.is_alive(),
            }

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()  # never raises: every failure is counted and reported

    # -- one poll --------------------------------------------------------------------
    def poll(self) -> PollResult:
        """Check the registry once and swap in, or refuse, a new newest version.

        Returns
        -------
        str
            ``unchanged`` (the newest version is the running package, or was
            refused before), ``swapped``, ``refused`` or ``error``.
        """
        with self._poll_lock:
            with self._lock:
                self._counts["polls"] += 1
            try:
                return self._poll()
            except Exception as e:  # a bug here must not end the watching silently
                self._error(f"{self.name}: {_reason(e)}")
                return "error"

    def _poll(self) -> PollResult:
        try:
            head = self.registry.latest(self.name)
            if head is None:
                return "unchanged"
            version, path = head
            sha = package_sha256(path)
        except (OSError, PackageError) as e:  # a share that hiccups; retried next poll
            self._error(f"{self.name}: cannot read the registry: {_reason(e)}")
            return "error"
        if sha == self._running["sha256"] or sha in self._refused_sha:
            return "unchanged"
        identity: dict[str, Any] = {
            "model": self.name,
            "version": version,
            "sha256": sha,
            "path": str(path),
        }
        try:
            pkg = load_package(path)
        except OSError as e:
            self._error(f"{self.name}@{version}: cannot read {path}: {_reason(e)}")
            return "error"
        except Exception as e:  # corrupt, edited or invalid: never retried
            return self._refuse(identity, f"does not load: {_reason(e)}")
        identity = dict(pkg.identity)
        # before compiling: a TensorRT build takes minutes, and would be wasted
        reason = swap_incompatibility(self.engine.predictor.manifest, pkg.manifest)
        if reason is not None:
            return self._refuse(identity, reason)
        try:
            predictor = self.make_predictor(pkg)  # loads and compiles, off the hot path
            self.engine.swap(predictor)  # checks again against what runs now
        except Exception as e:  # a bad new version must not stop the running one
            return self._refuse(identity, _reason(e))
        with self._lock:
            self._running = identity
            self._counts["swaps"] += 1
        self._notify(self.on_swap, identity)
        return "swapped"

    def _error(self, reason: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            self._errors.append(reason)
        self._notify(self.on_error, reason)

    def _refuse(self, identity: dict[str, Any], reason: str) -> PollResult:
        with self._lock:
            self._refused_sha.add(identity["sha256"])
            self._counts["refused"] += 1
            self._refusals.append({**identity, "reason": reason})
        self._notify(self.on_refused, identity, reason)
        return "refused"

    def _notify(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as e:
            # recorded, not passed to on_error: that could be the callback failing
            with self._lock:
                self._counts["errors"] += 1
                self._errors.append(f"{self.name}: a watcher callback failed: {_reason(e)}")
