"""``sim``: the simulated microscope, run as a real Micro-Manager core.

`SimulatedSource` is an `MMCoreSource` on a ``UniMMCore`` whose camera, Z
stage, shutter and light path are Python devices rendering a
`SimulatedMicroscope` (see `scopestream.acquisition.sample`). It runs the same
`AcquisitionPlan` through the same pymmcore-plus MDA engine as a real
microscope, and knows the noise-free ground truth of every frame it produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scopestream.acquisition.mmcore import MMCoreSource, require_pymmcore_plus
from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.acquisition.sample import SimulatedMicroscope

if TYPE_CHECKING:
    import numpy as np

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.seams import FrameCallback, SpaceWaiter

#: what ``--source sim`` acquires without a plan: a low-light nuclei time-lapse
DEFAULT_SIM_CHANNEL = ChannelSpec(name="nuclei", exposure_ms=10.0)


def default_sim_plan(frames: int | None, fps: float | None = None) -> AcquisitionPlan:
    """A single-channel time-lapse of ``frames`` frames (100 if not given)."""
    return AcquisitionPlan(channels=(DEFAULT_SIM_CHANNEL,)).resolved(frames=frames, fps=fps)


class SimulatedSource(MMCoreSource):
    """The simulated microscope driven by pymmcore-plus.

    Parameters
    ----------
    shape
        Camera frame size.
    plan
        What to acquire (defaults to `default_sim_plan`).
    seed
        Seed of the sample and the noise: the same seed and plan give the same frames.
    time_step_s
        Simulated time between time points when the plan has no interval (or
        always, with ``clock_from_plan=False``: then the sample may live faster
        than the acquisition, e.g. an hour of cell motion recorded in seconds).
    stall_every, stall_s, die_after
        Fault injection (see `ScopeState`).
    xy_sequence_max
        > 0: the XY stage is triggered (takes a sequence of that many positions and
        steps through it with the camera's frames), so pymmcore-plus runs many fields
        as one hardware burst; 0 (default): it is moved before each frame.
    """

    kind = "sim"

    def __init__(
        self,
        shape: tuple[int, int] = (512, 512),
        plan: AcquisitionPlan | None = None,
        *,
        seed: int = 0,
        time_step_s: float = 0.1,
        stall_every: int = 0,
        stall_s: float = 0.0,
        die_after: int | None = None,
        nuclei_volume: np.ndarray | None = None,
        microscope: SimulatedMicroscope | None = None,
        clock_from_plan: bool = True,
        xy_sequence_max: int = 0,
    ) -> None:
        require_pymmcore_plus()
        from scopestream.acquisition.sim_devices import ScopeState, build_sim_core, teardown_core

        plan = plan or default_sim_plan(None)
        self.microscope = microscope or SimulatedMicroscope(
            shape, seed=seed, nuclei_volume=nuclei_volume
        )
        self.scope = ScopeState(
            self.microscope,
            time_step_s=(plan.interval_s if clock_from_plan else 0.0) or time_step_s,
            stall_every=stall_every,
            stall_s=stall_s,
            die_after=die_after,
            xy_sequence_max=xy_sequence_max,
        )
        core = build_sim_core(self.scope)
        self.seed = seed
        super().__init__(
            core,
            plan,
            label="sim",
            extra={
                "seed": seed,
                "time_step_s": self.scope.time_step_s,
                "xy_sequence_max": xy_sequence_max,
                "camera": vars(self.microscope.camera),
                "optics": vars(self.microscope.optics),
                "sample": vars(self.microscope.sample),
            },
            on_event=self._on_mda_event,
            teardown=teardown_core,
        )

    def start(self, sink: FrameCallback, wait_for_space: SpaceWaiter | None = None) -> None:
        """Start the MDA; the simulated camera waits for ring-buffer space before each frame.

        A real camera cannot wait, and one that outruns the recording still fails
        the run loudly; the simulator can, so "as fast as possible" means as fast
        as the lossless recording takes frames, never a buffer overrun.
        """
        if wait_for_space is not None:

            def in_flight() -> int:  # rendered, not yet handed to the ring
                return self.scope.frames - self.received

            def pace() -> None:
                while not wait_for_space(0.1, ahead=in_flight):
                    if self._cancelled:
                        return

            self.scope.pace = pace
        super().start(sink, wait_for_space)

    def _on_mda_event(self, event: Any) -> None:
        self.scope.schedule(event)

    def failure_reason(self) -> str | None:
        """The simulated camera's failure, if fault injection made it fail."""
        return self.scope.failure

    def ground_truth(self, meta: FrameMeta) -> np.ndarray:
        """Noise-free expected frame (ADU, float32) of a frame this source produced."""
        channel = self.plan.channels[meta["c"]].preset  # the light path, not the run's name
        z = meta["stage_z_um"] or 0.0
        xy = (meta.get("stage_x_um") or 0.0, meta.get("stage_y_um") or 0.0)
        return self.microscope.ground_truth(
            meta["t"] * self.scope.time_step_s, channel, z, meta["exposure_ms"], stage_xy_um=xy
        )


class TruthSink:
    """A frame sink that writes the simulator's noise-free truth of every frame it is given.

    It gets frames on its own thread like any sink (policy ``all``: every frame,
    never holding the raw recording back) and writes ``truth`` (float32, ADU)
    through ``writer`` at the same (t, c, z): what evaluation compares to.
    """

    def __init__(self, source: SimulatedSource, writer: Any) -> None:
        self.source = source
        self.writer = writer
        self.frames_written = 0

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Write the truth of the frame described by ``meta``."""
        self.writer.write(self.source.ground_truth(meta), meta)
        self.frames_written += 1

    def close(
        self, status: str = "complete", error: str | None = None, summary: Any = None
    ) -> None:
        """Close the truth image."""
        self.writer.close(status)
