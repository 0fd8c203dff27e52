"""pymmcore-plus as a frame source: a plan run by the MDA engine, frames from ``frameReady``.

Works with any ``CMMCorePlus``: the DemoCamera from the ``mm-test-adapters``
wheel (``mmcore:demo``), a real system configuration (``mmcore:CONFIG.cfg``),
or the simulated microscope (``sim``, a ``UniMMCore`` with Python devices).

The ``frameReady`` callback only copies the frame into the ring buffer. Frames
the engine failed to acquire (pymmcore-plus logs "Failed to snap image" and
carries on) are counted, and the run fails with the camera's reason instead
of ending quietly short.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scopestream.acquisition.base import SourceError
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import Position

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import numpy as np

    from scopestream.acquisition.plan import AcquisitionPlan
    from scopestream.acquisition.positions import StageTravel
    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo
    from scopestream.streaming.seams import FrameCallback, SpaceWaiter

MM_EXTRA_HINT = "install the Micro-Manager extra: pip install 'scopestream[mm]'"


def require_pymmcore_plus() -> Any:
    """Import pymmcore-plus or explain how to get it."""
    try:
        import pymmcore_plus
    except ImportError as e:
        raise SourceError(f"pymmcore-plus is not installed; {MM_EXTRA_HINT}") from e
    return pymmcore_plus


def demo_config() -> tuple[str, str]:
    """(device adapter directory, MMConfig_demo.cfg) from the ``mm-test-adapters`` wheel."""
    try:
        import mm_test_adapters
    except ImportError as e:
        raise SourceError(f"the DemoCamera adapters are not installed; {MM_EXTRA_HINT}") from e
    mm_dir = mm_test_adapters.device_adapter_path()
    return mm_dir, os.path.join(mm_dir, "MMConfig_demo.cfg")


def check_config(config: str, mm_dir: str | None) -> tuple[str, str]:
    """Validate a system configuration and adapter directory, with a clear error."""
    cfg = Path(config)
    if not cfg.is_file():
        raise SourceError(f"Micro-Manager config file {cfg} does not exist")
    if mm_dir is None:
        raise SourceError(
            f"--mm-dir is needed with {cfg.name}: "
            "the Micro-Manager folder with the device adapters"
        )
    d = Path(mm_dir)
    if not d.is_dir() or not any(
        p.name.startswith("libmmgr_dal_") or p.name.startswith("mmgr_dal_") for p in d.iterdir()
    ):
        raise SourceError(
            f"{d} holds no Micro-Manager device adapters (mmgr_dal_*); check --mm-dir"
        )
    return str(d), str(cfg)


@contextlib.contextmanager
def psygnal_events() -> Iterator[None]:
    """Cores made inside deliver events on their own threads, never through Qt.

    pymmcore-plus picks Qt signals when a Qt application exists (the live
    viewer): frames would then wait for the GUI's event loop and run on its
    thread. Acquisition must not depend on the GUI, so the choice is pinned.
    """
    key = "PYMM_SIGNALS_BACKEND"
    old = os.environ.get(key)
    os.environ[key] = "psygnal"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_core(mm_dir: str, config: str) -> Any:
    """A ``CMMCorePlus`` with ``config`` loaded from adapters in ``mm_dir``."""
    pmp = require_pymmcore_plus()
    with psygnal_events():
        core = pmp.CMMCorePlus()
    core.setDeviceAdapterSearchPaths([mm_dir])
    try:
        core.loadSystemConfiguration(config)
    except Exception as e:
        raise SourceError(f"loading {config} failed: {e}") from e
    return core


def finite_or_none(v: Any) -> float | None:
    """A finite float, or None (absent, NaN, or not a number)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def frame_meta_from_mda(
    event: Any, meta: Mapping[str, Any], channel_names: Sequence[str], *, source: str
) -> FrameMeta:
    """`FrameMeta` of one pymmcore-plus frame (``frameReady(img, event, meta)``).

    Stage x/y/z are the positions pymmcore-plus read for the frame
    (``meta["position"]``), else the event's intended ones; the engine's time is
    ``runner_time_ms``; the image number is the camera's ``ImageNumber``. A frame
    whose channel is not one of ``channel_names`` raises `SourceError` naming it.
    """
    idx = event.index
    c = int(idx.get("c", 0))
    if not 0 <= c < len(channel_names):
        ch = getattr(getattr(event, "channel", None), "config", None)
        raise SourceError(
            f"a frame of channel {ch!r} (index {c}) arrived; the run records channels "
            f"{list(channel_names)}"
        )
    pos = meta.get("position") or {}
    cam = meta.get("camera_metadata") or {}
    number = finite_or_none(cam.get("ImageNumber"))
    exposure = event.exposure if event.exposure is not None else meta.get("exposure_ms", 0.0)
    return make_meta(
        t=int(idx.get("t", 0)),
        c=c,
        z=int(idx.get("z", 0)),
        p=int(idx.get("p", 0)),
        exposure_ms=float(exposure or 0.0),
        stage_x_um=finite_or_none(pos.get("x", event.x_pos)),
        stage_y_um=finite_or_none(pos.get("y", event.y_pos)),
        stage_z_um=finite_or_none(event.z_pos if event.z_pos is not None else pos.get("z")),
        engine_time_ms=finite_or_none(meta.get("runner_time_ms")),
        image_number=int(number) if number is not None else -1,
        source=source,
    )


def pixel_dtype(bytes_per_pixel: Any) -> str:
    """The numpy dtype of a Micro-Manager camera's pixels (both engines use this probe)."""
    nbytes = int(bytes_per_pixel)
    if nbytes == 1:
        return "uint8"
    if nbytes == 2:
        return "uint16"
    if nbytes == 4:
        return "uint32"
    raise SourceError(f"camera pixel type of {nbytes} bytes is not supported")


def check_plan(core: Any, plan: AcquisitionPlan) -> None:
    """Fail before starting if the camera/config cannot run the plan."""
    if plan.channels:
        group = plan.channel_group
        if not core.isGroupDefined(group):
            raise SourceError(
                f"the plan uses config group {group!r}, which this configuration does not define"
            )
        presets = set(core.getAvailableConfigs(group))
        missing = [c.preset for c in plan.channels if c.preset not in presets]
        if missing:
            raise SourceError(
                f"channel presets {missing} are not in group {group!r}; "
                f"available: {sorted(presets)}"
            )
    if plan.z_offsets != (0.0,) and not core.getFocusDevice():
        raise SourceError("the plan has a z-stack but the configuration has no focus device")
    moves = plan.plate is not None or plan.grid is not None or any(
        p.x_um is not None or p.y_um is not None or p.grid is not None for p in plan.positions
    )
    if moves and not core.getXYStageDevice():
        raise SourceError(
            f"the plan visits {plan.n_positions} field(s) at stage x/y positions, but the "
            "configuration has no XY stage"
        )
    if any(p.z_um is not None for p in plan.positions) and not core.getFocusDevice():
        raise SourceError("the plan's positions set z, but the configuration has no focus device")


def _core_api(core: Any, camel: str) -> Callable[..., Any] | None:
    """``core``'s method ``camel`` (pymmcore-plus) or its snake_case twin (pycromanager)."""
    snake = "".join(f"_{ch.lower()}" if ch.isupper() else ch for ch in camel)
    snake = snake.replace("x_y_", "xy_")
    for name in (camel, snake):
        try:
            f: Callable[..., Any] | None = getattr(core, name, None)
        except Exception:  # a remote core may fail on unknown names
            f = None
        if callable(f):
            return f
    return None


def stage_travel(core: Any) -> StageTravel:
    """How far this core's stages go, as far as it says (`StageTravel`; None: not said).

    The focus drive: the core's ``getStageLimits`` when it has one, else the limits
    of the focus device's ``Position`` property (how Micro-Manager's Z adapters
    declare their range). The XY stage: the core's ``getXYStageLimits`` when it has
    one (the simulator's does; Micro-Manager's core does not expose XY travel yet,
    mmCoreAndDevices#979). A range a device fails to report is treated as unknown.
    """
    from scopestream.acquisition.positions import StageTravel

    def ask(camel: str, *args: Any) -> Any:
        f = _core_api(core, camel)
        if f is None:
            return None
        try:
            return f(*args)
        except Exception as e:  # unsupported by this adapter: the range is unknown
            log.debug("%s%r: %s", camel, args, e)
            return None

    x = y = z = None
    xy = ask("getXYStageDevice")
    if xy:
        r = ask("getXYStageLimits", xy)
        if r is not None and len(r) == 4:
            x, y = (float(r[0]), float(r[1])), (float(r[2]), float(r[3]))
    focus = ask("getFocusDevice")
    if focus:
        r = ask("getStageLimits", focus)
        if r is not None and len(r) == 2:
            z = (float(r[0]), float(r[1]))
        elif ask("hasProperty", focus, "Position") and ask("hasPropertyLimits", focus, "Position"):
            lo, hi = ask("getPropertyLowerLimit", focus, "Position"), ask(
                "getPropertyUpperLimit", focus, "Position"
            )
            if lo is not None and hi is not None and float(lo) < float(hi):
                z = (float(lo), float(hi))
    return StageTravel(x, y, z)


def check_travel(core: Any, plan: AcquisitionPlan, fields: Sequence[Position]) -> None:
    """Refuse a plan whose fields (or z-stacks) lie outside the stages' travel, if known."""
    from scopestream.acquisition.positions import outside_travel

    travel = stage_travel(core)
    if not travel.known:
        return
    z_now = 0.0
    if travel.z is not None:
        try:
            z_now = float(_core_api(core, "getPosition")())  # type: ignore[misc]
        except Exception as e:
            raise SourceError(f"cannot read the focus position: {e}") from e
    here = fields or (Position("the current position"),)
    bad = outside_travel(here, travel, z_offsets=plan.z_offsets, z_now_um=z_now)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise SourceError(
            f"{len(bad)} of the plan's {len(here)} field(s) lie outside the stage's travel: "
            + "; ".join(bad[:5])
            + more
        )


def xy_origin(core: Any) -> tuple[float, float]:
    """Where the XY stage is now (µm; (0, 0) without one): the centre of a plan's grid."""
    if not core.getXYStageDevice():
        return (0.0, 0.0)
    try:
        return (float(core.getXPosition()), float(core.getYPosition()))
    except Exception as e:
        raise SourceError(f"cannot read the XY stage position: {e}") from e


class _SnapFailures(logging.Handler):
    """Catches pymmcore-plus's 'Failed to snap image' warnings: the camera stopped delivering."""

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._on_failure = on_failure

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        low = msg.lower()
        if "failed to snap" in low or "unexpected number of images" in low:
            self.messages.append(msg)
            if len(self.messages) == 1:
                self._on_failure(msg)


class MMCoreSource:
    """Runs an `AcquisitionPlan` on a pymmcore-plus core.

    Parameters
    ----------
    core
        A ``CMMCorePlus`` (or ``UniMMCore``), configured.
    plan
        What to acquire.
    label
        How the source is named in the run's attributes.
    on_event
        Called with each MDA event before it is acquired (the simulator uses it
        to set its clock).
    teardown
        Called at the end to release the core (unload devices).
    """

    kind = "mmcore"
    #: every frame is a fresh array nobody writes to afterwards: the ring adopts it
    hands_over_frames = True

    def __init__(
        self,
        core: Any,
        plan: AcquisitionPlan,
        *,
        label: str = "mmcore",
        extra: dict[str, Any] | None = None,
        on_event: Callable[[Any], None] | None = None,
        teardown: Callable[[Any], None] | None = None,
    ) -> None:
        try:
            check_plan(core, plan)
            shape = (int(core.getImageHeight()), int(core.getImageWidth()))
            px = float(core.getPixelSizeUm() or 1.0)
            dtype = pixel_dtype(core.getBytesPerPixel())
            info = plan.stream_info(shape, dtype, px, origin_um=xy_origin(core))
            check_travel(core, plan, info.positions)
        except BaseException:
            if teardown is not None:  # a refused plan leaves no core loaded behind
                teardown(core)
            raise
        self.core: Any = core
        self._camera = str(core.getCameraDevice())
        self.plan = plan
        self.label = label
        self._extra = dict(extra or {})
        self._on_event = on_event
        self._teardown = teardown
        self.info: StreamInfo = info
        self._sequence = plan.to_mda_sequence(self.info.positions)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self.received = 0
        self._failures = _SnapFailures(self._camera_failed)

    def describe(self) -> dict[str, Any]:
        """What ran: the engine, camera and plan."""
        return {
            "kind": self.label,
            "engine": "pymmcore-plus",
            "camera": self._camera,
            "plan": self.plan.to_json(),
            "stream": self.info.to_json(),
            **self._extra,
        }

    def counters(self) -> dict[str, int]:
        """Frames received and frames the engine failed to acquire."""
        return {"received": self.received, "failed_snaps": len(self._failures.messages)}

    @property
    def error(self) -> BaseException | None:
        """Why the acquisition ended early, if it did."""
        return self._error

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Start the MDA (pymmcore-plus runs it on its own thread)."""
        names = self.plan.channel_names

        def on_frame(img: np.ndarray, event: Any, meta: Any) -> None:
            try:
                m = frame_meta_from_mda(event, meta, names, source=self.label)
            except SourceError as e:  # never written at another channel's place
                self._error = self._error or e
                self.stop()
                return
            sink(img, m)
            self.received += 1

        ev = self.core.mda.events
        ev.frameReady.connect(on_frame)
        if self._on_event is not None:
            ev.eventStarted.connect(self._on_event)
        logging.getLogger("pymmcore-plus").addHandler(self._failures)
        self._on_frame = on_frame

        def run() -> None:
            try:
                self.core.mda.run(self._sequence)
                reason = self.failure_reason() or (
                    self._failures.messages[0] if self._failures.messages else None
                )
                if reason:
                    self._error = SourceError(
                        f"the camera stopped delivering frames after {self.received} of "
                        f"{self.plan.n_frames}: {reason}"
                    )
                elif not self._cancelled and self.received < self.plan.n_frames:
                    self._error = SourceError(
                        f"the acquisition ended after {self.received} of "
                        f"{self.plan.n_frames} frames"
                    )
            except BaseException as e:
                self._error = e
            finally:
                self._cleanup()
                self._done.set()

        self._thread = threading.Thread(target=run, name=f"source-{self.label}", daemon=True)
        self._thread.start()

    def _cleanup(self) -> None:
        ev = self.core.mda.events
        ev.frameReady.disconnect(self._on_frame)
        if self._on_event is not None:
            ev.eventStarted.disconnect(self._on_event)
        logging.getLogger("pymmcore-plus").removeHandler(self._failures)
        self._release_core()

    def _release_core(self) -> None:
        """Unload the devices and drop the core: a core left alive, unloaded, at
        interpreter exit can abort the process ("exception not rethrown")."""
        if self._teardown is not None:
            self._teardown(self.core)
            self._teardown = None
            self.core = None

    def failure_reason(self) -> str | None:
        """What the hardware said when it stopped (subclasses that know more override this)."""
        return None

    def _camera_failed(self, message: str) -> None:
        if self.core is not None:
            self.core.mda.cancel()  # a dead camera ends the run; it is not retried silently

    def set_paused(self, paused: bool) -> None:
        """Pause or resume the MDA between events (pymmcore-plus's own pause)."""
        if self.core is not None:
            self.core.mda.set_paused(paused)

    def stop(self) -> None:
        """Cancel the MDA after the current frame."""
        self._cancelled = True
        if self.core is not None:
            self.core.mda.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the MDA to finish (a source never started releases its core here)."""
        if self._thread is None:
            self._release_core()
            return True
        return self._done.wait(timeout)
