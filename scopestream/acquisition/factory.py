"""Build a `FrameSource` from a source spec (``sim``, ``mmcore:demo``, ``pycromanager:…``, …)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scopestream.acquisition.base import SourceError

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from scopestream.acquisition.base import FrameSource
    from scopestream.acquisition.plan import AcquisitionPlan

SOURCE_FORMS = (
    "sim, mmcore:demo, mmcore:CONFIG.cfg, pycromanager (running Micro-Manager), "
    "pycromanager:demo, pycromanager:sim, pycromanager:CONFIG.cfg, replay:PATH, tcp://HOST:PORT"
)


def make_source(
    spec: str,
    *,
    shape: tuple[int, int] = (512, 512),
    frames: int | None = None,
    fps: float | None = None,
    seed: int = 0,
    plan: AcquisitionPlan | None = None,
    mm_dir: str | None = None,
    mm_save_dir: str | None = None,
    hooks: dict[str, Callable[..., Any]] | None = None,
    sim_nuclei: np.ndarray | None = None,
    sim_time_step_s: float | None = None,
    sim_triggered_stage: bool = False,
    remote: dict[str, Any] | None = None,
) -> FrameSource:
    """The source a spec names; raises `SourceError` with the valid forms otherwise.

    ``plan`` is what Micro-Manager-driven sources (``sim``, ``mmcore``,
    ``pycromanager``) acquire (resolved for ``frames`` and ``fps`` if its time
    points are open); without one, a time-lapse of ``frames`` frames.
    """
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind in ("sim", "mmcore", "pycromanager") and plan is None:
        from scopestream.acquisition.plan import AcquisitionPlan
        from scopestream.acquisition.sim import default_sim_plan

        plan = (
            default_sim_plan(frames, fps)
            if kind == "sim" or arg == "sim"
            else AcquisitionPlan().resolved(frames=frames, fps=fps)
        )
    if plan is not None and plan.time_points is None:  # a config's plan, not yet resolved
        plan = plan.resolved(frames=frames, fps=fps)
    if (kind == "sim" or (kind == "pycromanager" and arg == "sim")) and plan and not plan.channels:
        from scopestream.acquisition.sim import DEFAULT_SIM_CHANNEL

        # The sim needs a light path. Not validated again: one channel added to a
        # plan with none cannot break its (channel-free) pairs or bounds.
        plan = plan.model_copy(update={"channels": (DEFAULT_SIM_CHANNEL,)})
    match kind:
        case "sim":
            from scopestream.acquisition.sim import SimulatedSource
            from scopestream.acquisition.sim_devices import SIM_XY_SEQUENCE_MAX

            if arg:
                raise SourceError(f"'sim' takes no argument, got {spec!r}")
            assert plan is not None
            return SimulatedSource(
                shape,
                plan,
                seed=seed,
                nuclei_volume=sim_nuclei,
                time_step_s=sim_time_step_s or 0.1,
                clock_from_plan=sim_time_step_s is None,
                xy_sequence_max=SIM_XY_SEQUENCE_MAX if sim_triggered_stage else 0,
            )
        case "mmcore":
            from scopestream.acquisition.mmcore import (
                MMCoreSource,
                check_config,
                demo_config,
                load_core,
            )

            if not arg:
                raise SourceError(
                    "mmcore needs a target: mmcore:demo or mmcore:CONFIG.cfg --mm-dir DIR"
                )
            assert plan is not None
            d, cfg = demo_config() if arg == "demo" else check_config(arg, mm_dir)
            core = load_core(d, cfg)
            try:
                return MMCoreSource(
                    core, plan, label=f"mmcore:{arg}", teardown=lambda c: c.unloadAllDevices()
                )
            except Exception:
                core.unloadAllDevices()
                raise
        case "pycromanager":
            from scopestream.acquisition.pycromanager_source import PycromanagerSource

            assert plan is not None
            sim = None
            if arg == "sim":
                from scopestream.acquisition.sim import SimulatedSource

                sim = SimulatedSource(shape, plan, seed=seed, nuclei_volume=sim_nuclei)
            hooks = hooks or {}
            return PycromanagerSource(
                arg or None,
                plan,
                mm_dir=mm_dir,
                sim=sim,
                save_dir=mm_save_dir,
                pre_hardware_hook=hooks.get("pre_hardware"),
                post_hardware_hook=hooks.get("post_hardware"),
            )
        case "replay":
            from scopestream.acquisition.replay import ReplaySource

            if not arg:
                raise SourceError("replay needs a path: --source replay:RUN.ome.zarr")
            return ReplaySource(arg, fps=fps)
        case "tcp":
            from scopestream.acquisition.remote import RemoteSource

            return RemoteSource(spec, **(remote or {}))
        case _:
            raise SourceError(f"unknown source {spec!r}; use one of: {SOURCE_FORMS}")
