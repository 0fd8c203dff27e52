"""pycromanager as a frame source: the main path for Micro-Manager users.

The plan becomes pycromanager events run by ``pycromanager.Acquisition``; its
``image_process_fn`` only copies each frame (with its axes and metadata) into
the ring buffer and returns ``None`` — or the frame, when Micro-Manager should
save its own copy too (``save_dir``, NDTiff).

Targets:

``pycromanager``
    A running Micro-Manager GUI with its ZMQ server on (port 4827, Java backend).
``pycromanager:demo``
    Headless Python backend on the DemoCamera of the ``mm-test-adapters``
    wheel (no Java, no download).
``pycromanager:CONFIG.cfg`` with ``mm_dir``
    Headless Python backend on a real installation.
``pycromanager:sim``
    The simulated microscope's ``UniMMCore`` behind pycromanager's engine,
    through a snake_case adapter: the same code path as a real microscope.

pycromanager keeps one headless core per process; a source owns it for the
length of its run and shuts it down after.
"""

from __future__ import annotations

import gc
import socket
import threading
import types
from typing import TYPE_CHECKING, Any

from scopestream.acquisition.base import SourceError
from scopestream.acquisition.mmcore import (
    MM_EXTRA_HINT,
    check_config,
    check_travel,
    demo_config,
    finite_or_none,
    pixel_dtype,
)
from scopestream.streaming.frame import make_meta

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import numpy as np

    from scopestream.acquisition.plan import AcquisitionPlan
    from scopestream.acquisition.sim import SimulatedSource
    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo
    from scopestream.streaming.seams import FrameCallback, SpaceWaiter

JAVA_PORT = 4827
_HEADLESS_LOCK = threading.Lock()


def _require_pycromanager() -> Any:
    try:
        import pycromanager
    except ImportError as e:
        raise SourceError(f"pycromanager is not installed; {MM_EXTRA_HINT}") from e
    return pycromanager


def _forget_engine() -> None:
    """pycromanager keeps its Python engine as a class singleton that outlives
    ``stop_headless()``; a second headless start would reuse the dead one (and the
    unloaded core). Forget it so the next start builds a fresh engine."""
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    if hasattr(Engine, "singleton"):
        del Engine.singleton


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def frame_meta_from_pycromanager(
    metadata: Mapping[str, Any], channel_names: Sequence[str], *, source: str
) -> FrameMeta:
    """`FrameMeta` of one pycromanager image (the ``metadata`` its image_process_fn gets).

    Axes ``time``/``channel``/``z``/``position`` give the indices; stage
    positions are ``XPosition_um_Intended`` etc. (else the read-back
    ``XPositionUm``); ``ElapsedTime-ms`` and ``ImageNumber`` are the engine's. A
    channel not in ``channel_names`` raises `SourceError` naming it.
    """
    axes = metadata.get("Axes", {}) or {}
    ch = axes.get("channel")
    names = list(channel_names)
    if ch is None and len(names) == 1:
        c = 0
    elif ch in names:
        c = names.index(ch)
    else:
        raise SourceError(
            f"a frame of channel {ch!r} arrived; the run records channels {names}"
        )

    def pos(axis: str) -> float | None:
        intended = metadata.get(f"{axis}Position_um_Intended")
        read = metadata.get(f"{axis}PositionUm")
        return finite_or_none(intended if intended is not None else read)

    number = finite_or_none(metadata.get("ImageNumber"))
    return make_meta(
        t=int(axes.get("time", 0)),
        c=c,
        z=int(axes.get("z", 0)),
        p=int(axes.get("position", 0)),
        exposure_ms=finite_or_none(metadata.get("Exposure")) or 0.0,
        stage_x_um=pos("X"),
        stage_y_um=pos("Y"),
        stage_z_um=pos("Z"),
        engine_time_ms=finite_or_none(metadata.get("ElapsedTime-ms")),
        image_number=int(number) if number is not None else -1,
        source=source,
    )


class PycromanagerSource:
    """Runs an `AcquisitionPlan` through ``pycromanager.Acquisition``.

    Parameters
    ----------
    target
        ``None`` (running Micro-Manager GUI), ``"demo"``, ``"sim"`` or a config path.
    plan
        What to acquire.
    mm_dir
        Micro-Manager folder with the device adapters (for a config path).
    sim
        The simulated microscope to drive (for ``"sim"``).
    save_dir
        Let Micro-Manager save its own copy (NDTiff) there as well.
    pre_hardware_hook, post_hardware_hook
        User hooks, passed to pycromanager unchanged (they get and return the event).
    """

    kind = "pycromanager"
    #: every frame is a fresh array nobody writes to afterwards: the ring adopts it
    hands_over_frames = True

    def __init__(
        self,
        target: str | None,
        plan: AcquisitionPlan,
        *,
        mm_dir: str | None = None,
        port: int = JAVA_PORT,
        sim: SimulatedSource | None = None,
        save_dir: str | None = None,
        pre_hardware_hook: Callable[[dict[str, Any]], Any] | None = None,
        post_hardware_hook: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self._pm = _require_pycromanager()
        self.target = target
        self.plan = plan
        self.port = port
        self.save_dir = save_dir
        self._sim = sim
        self._user_pre = pre_hardware_hook
        self._user_post = post_hardware_hook
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._acq: Any = None
        self._owns_headless = False
        self.received = 0
        self._stopped = False
        self._engine: Any = None
        self.core = self._connect(mm_dir)
        try:
            self._check_plan()
            shape = (int(self.core.get_image_height()), int(self.core.get_image_width()))
            px = float(self.core.get_pixel_size_um() or 1.0)
            dtype = pixel_dtype(self.core.get_bytes_per_pixel())
            origin = (0.0, 0.0)
            if self.core.get_xy_stage_device():
                origin = (float(self.core.get_x_position()), float(self.core.get_y_position()))
            self.info: StreamInfo = plan.stream_info(shape, dtype, px, origin_um=origin)
            check_travel(self.core, plan, self.info.positions)
            self._z0 = float(self.core.get_position()) if self.core.get_focus_device() else 0.0
        except Exception:
            self._shutdown()
            raise

    # -- connection ------------------------------------------------------------
    def _connect(self, mm_dir: str | None) -> Any:
        pm = self._pm
        if self.target is None:
            if not _port_open(self.port):
                raise SourceError(
                    f"Micro-Manager is not reachable on port {self.port}: start Micro-Manager and "
                    "enable Tools > Options > 'Run server on port 4827', or use pycromanager:demo"
                )
            try:
                return pm.Core(port=self.port)
            except Exception as e:
                raise SourceError(
                    f"connecting to Micro-Manager on port {self.port} failed: {e}"
                ) from e
        if not _HEADLESS_LOCK.acquire(blocking=False):
            raise SourceError("a headless Micro-Manager core is already running in this process")
        self._owns_headless = True
        _forget_engine()
        try:
            if self.target == "sim":
                return self._attach_sim()
            if self.target == "demo":
                mm_dir, cfg = demo_config()
            else:
                mm_dir, cfg = check_config(self.target, mm_dir)
            try:
                pm.start_headless(mm_dir, cfg, python_backend=True)
            except Exception as e:
                raise SourceError(f"starting Micro-Manager headless with {cfg} failed: {e}") from e
            return pm.Core()
        except BaseException:
            self._owns_headless = False
            _HEADLESS_LOCK.release()
            raise

    def _attach_sim(self) -> Any:
        """Put the simulator's UniMMCore where pycromanager's Python backend looks for its core."""
        import mmpycorex.launcher as launcher
        from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

        from scopestream.acquisition.sim_devices import SnakeCaseCore

        if self._sim is None:
            raise SourceError("pycromanager:sim needs a simulated microscope")
        core = SnakeCaseCore(self._sim.core)
        core.get_tagged_image = types.MethodType(launcher.get_tagged_image, core)  # type: ignore[attr-defined]
        core.pop_next_tagged_image = types.MethodType(launcher.pop_next_tagged_image, core)  # type: ignore[attr-defined]
        core.TaggedImage = launcher.TaggedImage  # type: ignore[attr-defined]
        launcher._PYMMCORES.append(core)
        self._engine = Engine(core)
        return core

    def _check_plan(self) -> None:
        plan = self.plan
        moves = plan.plate is not None or plan.grid is not None or any(
            p.x_um is not None or p.y_um is not None or p.grid is not None for p in plan.positions
        )
        if moves and not self.core.get_xy_stage_device():
            raise SourceError(
                f"the plan visits {plan.n_positions} field(s) at stage x/y positions, but the "
                "configuration has no XY stage"
            )
        if not self.plan.channels:
            return
        group = self.plan.channel_group
        presets = set(self.core.get_available_configs(group))
        if not presets:
            raise SourceError(f"the plan uses config group {group!r}, which is not defined here")
        missing = [c.preset for c in self.plan.channels if c.preset not in presets]
        if missing:
            raise SourceError(
                f"channel presets {missing} are not in group {group!r}; "
                f"available: {sorted(presets)}"
            )

    def _shutdown(self) -> None:
        if not self._owns_headless:
            return
        import mmpycorex.launcher as launcher

        try:
            if self.target == "sim":
                if self._engine is not None:
                    self._engine.shutdown()
                if self._sim is not None:
                    self._sim.wait()  # never started by itself: unloads and drops its core
            else:
                self._pm.stop_headless()
        finally:
            # no unloaded core may outlive this (it can abort the interpreter at exit)
            launcher._PYMMCORES.clear()
            self.core = None
            self._engine = None
            gc.collect()  # the snake_case adapter's bound methods form a cycle with it
            _forget_engine()
            self._owns_headless = False
            _HEADLESS_LOCK.release()

    # -- FrameSource -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Engine, target and plan."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "engine": "pycromanager",
            "target": self.target or f"Micro-Manager on port {self.port}",
            "backend": "java" if self.target is None else "python",
            "plan": self.plan.to_json(),
            "stream": self.info.to_json(),
            "mm_saves_copy": self.save_dir,
        }
        if self._sim is not None:
            d["sim"] = {
                k: v
                for k, v in self._sim.describe().items()
                if k not in ("kind", "plan", "stream")
            }
        return d

    def counters(self) -> dict[str, int]:
        """Frames received."""
        return {"received": self.received}

    @property
    def error(self) -> BaseException | None:
        """Why the acquisition ended early, if it did."""
        return self._error

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Start the pycromanager acquisition on its own thread."""
        names = list(self.plan.channel_names)
        keep = self.save_dir is not None

        def image_process_fn(image: np.ndarray, metadata: dict[str, Any]) -> Any:
            try:
                meta = frame_meta_from_pycromanager(metadata, names, source=self.kind)
            except SourceError as e:  # never written at another channel's place
                self._error = self._error or e
                self.stop()
                return None
            sink(image, meta)
            self.received += 1
            return (image, metadata) if keep else None

        def pre_hook(event: dict[str, Any] | list[dict[str, Any]]) -> Any:
            # a list when pycromanager runs several events as one hardware sequence
            try:
                if self._sim is not None:
                    for ev in event if isinstance(event, list) else [event]:
                        self._sim.scope.schedule_t(int(ev.get("axes", {}).get("time", 0)))
                return self._user_pre(event) if self._user_pre else event  # type: ignore[arg-type]
            except BaseException as e:  # pycromanager would print it and carry on
                self._error = self._error or e
                self.stop()
                raise

        events = self.plan.to_pycromanager_events(self._z0, self.info.positions)

        def run() -> None:
            try:
                self._acq = self._pm.Acquisition(
                    directory=self.save_dir,
                    name="scopestream",
                    image_process_fn=image_process_fn,
                    pre_hardware_hook_fn=pre_hook,
                    post_hardware_hook_fn=self._user_post,
                    show_display=False,
                )
                self._acq.acquire(events)
                self._acq.mark_finished()
                self._acq.await_completion()
                expected = self.plan.n_frames
                if self._error is None and not self._stopped and self.received < expected:
                    self._error = SourceError(
                        f"pycromanager finished after {self.received} of {expected} frames"
                    )
            except BaseException as e:
                self._error = self._error or e
            finally:
                try:
                    self._shutdown()
                finally:
                    self._done.set()

        self._thread = threading.Thread(target=run, name="source-pycromanager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort the acquisition (frames already taken are kept)."""
        self._stopped = True
        if self._acq is not None:
            try:
                self._acq.abort()
            except Exception as e:  # an abort that fails is reported, not hidden
                self._error = self._error or e

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the acquisition to finish and the core to be released."""
        if self._thread is None:
            self._shutdown()
            return True
        return self._done.wait(timeout)
