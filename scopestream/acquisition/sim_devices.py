"""The simulated microscope as a real Micro-Manager core (pymmcore-plus ``UniMMCore``).

Python devices: a camera, an XY stage, a Z stage, a shutter and a light-path selector (a
state device whose labels are the microscope's channels, behind the ``Channel``
config group). They share one `ScopeState`; the camera renders what the
`SimulatedMicroscope` would show with the current light path, focus and
exposure. Anything that drives a Micro-Manager core (pymmcore-plus's MDA, or
pycromanager through `snake_case_core`) drives this one the same way.

Time: the sample's clock is the acquisition plan's time index (``t ×
time_step_s``), queued from each event before it is acquired (a hardware
sequence of many time points queues all of them; the camera takes one per
frame), so every frame, and its ground truth, is reproducible from the seed and
the frame's indices. Without events (a manual snap) the clock is the wall clock
since start.

Fault injection for tests: ``stall_every``/``stall_s`` (the camera hangs now and
then), ``die_after`` (the camera fails after N frames).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    UniMMCore,
    XYStageDevice,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from scopestream.acquisition.sample import SimulatedMicroscope

CHANNEL_GROUP = "Channel"
#: the simulated XY stage's travel (µm): ±130 mm × ±90 mm around where it starts
SIM_XY_TRAVEL_UM = (-130_000.0, 130_000.0, -90_000.0, 90_000.0)
#: positions a triggered simulated XY stage holds in one sequence (``sim_triggered_stage``)
SIM_XY_SEQUENCE_MAX = 10_000
#: the simulated focus drive's travel (µm)
SIM_Z_TRAVEL_UM = (-5_000.0, 5_000.0)


class CameraDied(RuntimeError):
    """Fault injection: the simulated camera stopped working."""


@dataclass
class ScopeState:
    """What the simulated hardware is doing right now (shared by its devices)."""

    microscope: SimulatedMicroscope
    z_um: float = 0.0
    #: where the XY stage is: the camera sees the part of the sample under it
    x_um: float = 0.0
    y_um: float = 0.0
    light_path: int = 0
    shutter_open: bool = False
    #: the camera's exposure drives the light source (TTL), as on most modern scopes
    camera_triggers_light: bool = True
    time_step_s: float = 0.1
    t_index: int | None = None
    pending_t: deque[int] = field(default_factory=deque)
    frames: int = 0
    stall_every: int = 0
    stall_s: float = 0.0
    die_after: int | None = None
    #: why the camera stopped, if it did (fault injection)
    failure: str | None = None
    t0: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: how far the stages go from where they start (µm): x low/high, y low/high; z
    #: (a stage with room for any standard plate whose A1 is where it starts)
    xy_travel_um: tuple[float, float, float, float] = SIM_XY_TRAVEL_UM
    z_travel_um: tuple[float, float] = SIM_Z_TRAVEL_UM
    #: longest sequence of positions the XY stage takes (0: it is moved by software
    #: before each frame; > 0: a triggered stage, as with ASI's ring buffer: the MDA
    #: loads the fields' positions and each camera frame advances it to the next)
    xy_sequence_max: int = 0
    xy_sequence: tuple[tuple[float, float], ...] = ()
    xy_sequence_next: int | None = None
    #: called before each frame is rendered: a simulated camera may wait for the pipeline
    #: (a real one never does); set by `SimulatedSource.start`
    pace: Callable[[], None] | None = None

    @property
    def channel_names(self) -> list[str]:
        """Light paths, in state order."""
        return list(self.microscope.channels)

    def schedule(self, event: Any) -> None:
        """Queue the time indices an MDA event (or hardware sequence) is about to acquire."""
        subs = getattr(event, "events", None) or (event,)
        with self.lock:
            self.pending_t.extend(int(e.index.get("t", 0)) for e in subs)

    def schedule_t(self, t: int) -> None:
        """Queue one time index (pycromanager's pre-hardware hook, one event at a time)."""
        with self.lock:
            self.pending_t.append(int(t))

    def sim_time_s(self) -> float:
        """The sample's clock for the frame being acquired (call with ``lock`` held)."""
        if self.pending_t:
            self.t_index = self.pending_t.popleft()
        if self.t_index is not None:
            return self.t_index * self.time_step_s
        return time.monotonic() - self.t0


class SimCamera(SimpleCameraDevice):
    """Camera of the simulated microscope (renders the sample with photon noise)."""

    def __init__(self, state: ScopeState) -> None:
        super().__init__()
        self._state = state
        self._exposure_ms = 10.0

    def sensor_shape(self) -> tuple[int, int]:
        """Frame size of the sensor."""
        return self._state.microscope.shape

    def dtype(self) -> Any:
        """Pixel type."""
        return np.uint16

    def get_exposure(self) -> float:
        """Exposure in ms."""
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        """Set the exposure in ms."""
        if exposure <= 0:
            raise ValueError(f"exposure must be positive, got {exposure} ms")
        self._exposure_ms = float(exposure)

    def start_sequence(
        self, n: int | None, get_buffer: Callable[[Sequence[int], Any], np.ndarray]
    ) -> Iterator[Mapping[str, Any]]:
        """Stream frames; a camera failure ends the sequence and is recorded, as a driver would."""
        try:
            yield from super().start_sequence(n, get_buffer)
        except CameraDied as e:
            self._state.failure = str(e)

    def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
        """Render one frame into ``buffer``."""
        st = self._state
        if st.pace is not None:
            st.pace()
        with st.lock:
            st.frames += 1
            n = st.frames
            if st.die_after is not None and n > st.die_after:
                st.failure = f"simulated camera failure after {st.die_after} frames"
                raise CameraDied(st.failure)
            if st.stall_every and n % st.stall_every == 0:
                time.sleep(st.stall_s)
            channel = st.channel_names[st.light_path]
            lit = st.camera_triggers_light or st.shutter_open
            t_s = st.sim_time_s()
            z = st.z_um
            if st.xy_sequence_next is not None and st.xy_sequence:  # triggered: next position
                st.x_um, st.y_um = st.xy_sequence[st.xy_sequence_next % len(st.xy_sequence)]
                st.xy_sequence_next += 1
            xy = (st.x_um, st.y_um)
        scope = st.microscope
        exposure = self._exposure_ms if lit else 1e-6  # dark: offset and read noise only
        scope.snap(t_s, channel, z, exposure, out=buffer, stage_xy_um=xy)
        return {"sim_time_s": t_s, "sim_channel": channel, "sim_z_um": z}


class SimZStage(StageDevice):
    """Focus drive."""

    def __init__(self, state: ScopeState) -> None:
        super().__init__()
        self._state = state

    def set_position_um(self, val: float) -> None:
        """Move to ``val`` µm."""
        self._state.z_um = float(val)

    def get_position_um(self) -> float:
        """Current position (µm)."""
        return self._state.z_um

    def home(self) -> None:
        """Go to 0."""
        self._state.z_um = 0.0

    def stop(self) -> None:
        """Nothing moves for long here."""

    def set_origin(self) -> None:
        """Make the current position 0."""
        self._state.z_um = 0.0


class SimXYStage(XYStageDevice):
    """Stage: moving it shows another part of the sample (a plate's wells, a grid's fields)."""

    def __init__(self, state: ScopeState) -> None:
        super().__init__()
        self._state = state

    def set_position_um(self, x: float, y: float) -> None:
        """Move to (``x``, ``y``) µm."""
        self._state.x_um, self._state.y_um = float(x), float(y)

    def get_position_um(self) -> tuple[float, float]:
        """Current position (µm)."""
        return self._state.x_um, self._state.y_um

    def set_origin_x(self) -> None:
        """Make the current x 0."""
        self._state.x_um = 0.0

    def set_origin_y(self) -> None:
        """Make the current y 0."""
        self._state.y_um = 0.0

    def stop(self) -> None:
        """Nothing moves for long here."""

    def home(self) -> None:
        """Go to (0, 0)."""
        self._state.x_um = self._state.y_um = 0.0

    def get_sequence_max_length(self) -> int:
        """Positions a loaded sequence may hold (0: not sequenceable, the default)."""
        return self._state.xy_sequence_max

    def send_sequence(self, sequence: tuple[tuple[float, float], ...]) -> None:
        """Load the positions the camera's triggers step through."""
        with self._state.lock:
            self._state.xy_sequence = tuple((float(x), float(y)) for x, y in sequence)

    def start_sequence(self) -> None:
        """Arm: each following camera frame moves the stage to the sequence's next position."""
        with self._state.lock:
            self._state.xy_sequence_next = 0

    def stop_sequence(self) -> None:
        """Disarm: the stage stays where the last trigger left it."""
        with self._state.lock:
            self._state.xy_sequence_next = None


class SimShutter(ShutterDevice):
    """Illumination shutter (used when the camera does not trigger the light)."""

    def __init__(self, state: ScopeState) -> None:
        super().__init__()
        self._state = state

    def get_open(self) -> bool:
        """Whether it is open."""
        return self._state.shutter_open

    def set_open(self, open: bool) -> None:
        """Open or close."""
        self._state.shutter_open = bool(open)


class SimLightPath(StateDevice):
    """Selects the channel (brightfield lamp, fluorescence cubes)."""

    def __init__(self, state: ScopeState) -> None:
        super().__init__(dict(enumerate(state.channel_names)))
        self._state = state

    def get_state(self) -> int:
        """Current light path index."""
        return self._state.light_path

    def set_state(self, position: int) -> None:
        """Switch light path."""
        self._state.light_path = int(position)


class SimCore(UniMMCore):  # type: ignore[misc]
    """The simulator's core: its devices never move for long (a stage "moves" at once).

    ``UniMMCore`` waits for Python devices in parallel, on a thread pool made for
    each wait: with the stage moving between fields at every frame, that cost more
    than the frame itself (a 16-field run at 512² went at a third of one field's
    frames/s). Here they are asked one after the other, which for devices that are
    never busy is the same wait without the threads.
    """

    #: the devices' shared state (set by `build_sim_core`)
    scope_state: ScopeState | None = None

    def getXYStageLimits(self, xyStageLabel: str = "") -> tuple[float, float, float, float]:
        """The XY stage's travel (µm): x low, x high, y low, y high.

        Micro-Manager's core has no such call yet (its device API does:
        ``XYStage::GetLimitsUm``, mmCoreAndDevices#979); named as proposed there.
        """
        if self.scope_state is None:
            raise RuntimeError("no simulated stage")
        return self.scope_state.xy_travel_um

    def getStageLimits(self, stageLabel: str = "") -> tuple[float, float]:
        """The focus drive's travel (µm): low, high (``Stage::GetLimits``)."""
        if self.scope_state is None:
            raise RuntimeError("no simulated stage")
        return self.scope_state.z_travel_um

    def waitForDeviceType(self, devType: int) -> None:
        """Wait for every device of the type (Python devices one by one)."""
        super(UniMMCore, self).waitForDeviceType(devType)
        self._pydevices.wait_for_device_type(devType, self.getTimeoutMs(), parallel=False)


def build_sim_core(state: ScopeState) -> UniMMCore:
    """A ``UniMMCore`` with the simulated devices loaded and a ``Channel`` group."""
    from scopestream.acquisition.mmcore import psygnal_events

    with psygnal_events():
        core = SimCore()
    core.scope_state = state
    try:
        core.loadPyDevice("Camera", SimCamera(state))
        core.loadPyDevice("Z", SimZStage(state))
        core.loadPyDevice("XY", SimXYStage(state))
        core.loadPyDevice("Shutter", SimShutter(state))
        core.loadPyDevice("LightPath", SimLightPath(state))
        core.initializeAllDevices()
        core.setCameraDevice("Camera")
        core.setFocusDevice("Z")
        core.setXYStageDevice("XY")
        core.setShutterDevice("Shutter")
        for name in state.channel_names:
            core.defineConfig(CHANNEL_GROUP, name, "LightPath", "Label", name)
        core.setChannelGroup(CHANNEL_GROUP)
        # one objective: a pixel-size config keyed on an always-present core property
        core.definePixelSizeConfig("sim", "Core", "Initialize", "1")
        core.setPixelSizeUm("sim", state.microscope.optics.pixel_size_um)
        core.setPixelSizeConfig("sim")
    except Exception:
        teardown_core(core)
        raise
    return core


def teardown_core(core: Any) -> None:
    """Stop and unload everything (a core left alive at exit can crash the interpreter)."""
    try:
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    except Exception:
        pass
    with contextlib.suppress(Exception):
        core.unloadAllDevices()


def _camel_to_snake(name: str) -> str:
    s1 = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z0-9])([A-Z])", r"\1_\2", s1).lower()


class SnakeCaseCore:
    """pycromanager's Python backend speaks snake_case to its core: translate to ``core``.

    Methods are looked up on ``core``'s own (camelCase) API, so Python devices of a
    ``UniMMCore`` are honoured.
    """

    def __init__(self, core: Any) -> None:
        self._core = core
        self._names = {_camel_to_snake(n): n for n in dir(type(core)) if not n.startswith("_")}

    def __getattr__(self, name: str) -> Any:
        target = self._names.get(name, name)
        return getattr(self._core, target)
