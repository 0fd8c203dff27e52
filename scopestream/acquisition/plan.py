"""An acquisition plan (time × channel × z), and its forms for each engine.

One `AcquisitionPlan` becomes a useq-schema ``MDASequence`` for pymmcore-plus
(`to_mda_sequence`) or a list of pycromanager events (`to_pycromanager_events`),
so both engines acquire the same frames in the same order: for each time
point, for each channel, a z-stack (``tcz``).

Channels have a *name* (what the run calls them, unique) and a Micro-Manager
*config* preset (defaults to the name). Two channels may share a preset with
different exposures: that is a denoising pair (low and high exposure of the
same field), recorded as two channels with their exposures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scopestream.streaming.layout import StreamInfo

if TYPE_CHECKING:
    from collections.abc import Sequence


class PlanError(ValueError):
    """A plan that cannot be run as asked."""


@dataclass(frozen=True)
class ChannelSpec:
    """One channel of a plan."""

    name: str
    exposure_ms: float = 10.0
    config: str | None = None

    @property
    def preset(self) -> str:
        """The Micro-Manager config preset that selects this channel."""
        return self.config or self.name


@dataclass(frozen=True)
class AcquisitionPlan:
    """Time points × channels × z-offsets, acquired in ``tcz`` order.

    ``z_offsets_um`` are relative to the focus when the run starts. With no
    channels, the camera's current setting is used as one channel named ``raw``.
    ``pairs`` tells the trainer which channels belong together (saved with the run).
    """

    time_points: int = 1
    interval_s: float = 0.0
    z_offsets_um: tuple[float, ...] = (0.0,)
    channels: tuple[ChannelSpec, ...] = ()
    channel_group: str = "Channel"
    pairs: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.time_points < 1:
            raise PlanError(f"time_points must be at least 1, got {self.time_points}")
        if self.interval_s < 0:
            raise PlanError(f"interval_s must be >= 0, got {self.interval_s}")
        if not self.z_offsets_um:
            raise PlanError("a plan needs at least one z position")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise PlanError(f"channel names must be unique, got {names}")
        for c in self.channels:
            if c.exposure_ms <= 0:
                raise PlanError(f"channel {c.name!r}: exposure must be positive")

    @classmethod
    def timelapse(cls, frames: int, interval_s: float = 0.0, **kw: Any) -> AcquisitionPlan:
        """A plain time series of ``frames`` frames."""
        return cls(time_points=frames, interval_s=interval_s, **kw)

    @classmethod
    def z_range(cls, n_planes: int, step_um: float) -> tuple[float, ...]:
        """Offsets of ``n_planes`` planes ``step_um`` apart, centred on the focus."""
        if n_planes < 1 or step_um <= 0:
            raise PlanError("a z range needs at least one plane and a positive step")
        mid = (n_planes - 1) / 2
        return tuple(round((i - mid) * step_um, 6) for i in range(n_planes))

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Names of the run's channels."""
        return tuple(c.name for c in self.channels) or ("raw",)

    @property
    def n_frames(self) -> int:
        """Frames the whole plan acquires."""
        return self.time_points * len(self.channel_names) * len(self.z_offsets_um)

    def limited_to(self, frames: int | None) -> AcquisitionPlan:
        """The same plan with just enough time points for ``frames`` frames."""
        if frames is None:
            return self
        per_t = len(self.channel_names) * len(self.z_offsets_um)
        t = max(1, math.ceil(frames / per_t))
        return AcquisitionPlan(
            time_points=min(t, self.time_points) if self.time_points else t,
            interval_s=self.interval_s,
            z_offsets_um=self.z_offsets_um,
            channels=self.channels,
            channel_group=self.channel_group,
            pairs=self.pairs,
        )

    def stream_info(
        self, frame_shape: tuple[int, int], dtype: str, pixel_size_um: float
    ) -> StreamInfo:
        """The stream this plan produces on a camera of ``frame_shape``."""
        zs = self.z_offsets_um
        step = abs(zs[1] - zs[0]) if len(zs) > 1 else 1.0
        return StreamInfo(
            frame_shape=frame_shape,
            dtype=dtype,
            n_t=self.time_points,
            channel_names=self.channel_names,
            n_z=len(zs),
            pixel_size_um=pixel_size_um,
            z_step_um=step,
            interval_s=self.interval_s,  # 0: none planned; the recording measures it
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able form saved with the run (the trainer reads ``channels`` and ``pairs``)."""
        return {
            "time_points": self.time_points,
            "interval_s": self.interval_s,
            "z_offsets_um": list(self.z_offsets_um),
            "channels": [
                {"name": c.name, "config": c.preset, "exposure_ms": c.exposure_ms}
                for c in self.channels
            ],
            "channel_group": self.channel_group,
            "pairs": self.pairs,
        }

    # -- engines ---------------------------------------------------------------
    def to_mda_sequence(self) -> Any:
        """The plan as a useq ``MDASequence`` (pymmcore-plus), ``tpcz`` order."""
        import useq

        kw: dict[str, Any] = {"axis_order": "tpcz"}
        kw["time_plan"] = {"interval": self.interval_s, "loops": self.time_points}
        if self.z_offsets_um != (0.0,):
            kw["z_plan"] = {"relative": list(self.z_offsets_um)}
        if self.channels:
            kw["channels"] = [
                {"config": c.preset, "group": self.channel_group, "exposure": c.exposure_ms}
                for c in self.channels
            ]
        return useq.MDASequence(**kw)

    def to_pycromanager_events(self, z_origin_um: float = 0.0) -> list[dict[str, Any]]:
        """The plan as pycromanager acquisition events, same order as the MDA sequence."""
        events: list[dict[str, Any]] = []
        for t in range(self.time_points):
            for c in self.channels or (None,):
                for zi, dz in enumerate(self.z_offsets_um):
                    axes: dict[str, Any] = {"time": t}
                    ev: dict[str, Any] = {"axes": axes}
                    if c is not None:
                        axes["channel"] = c.name
                        ev["config_group"] = [self.channel_group, c.preset]
                        ev["exposure"] = c.exposure_ms
                    if self.z_offsets_um != (0.0,):
                        axes["z"] = zi
                        ev["z"] = z_origin_um + dz
                    if self.interval_s > 0:
                        ev["min_start_time"] = t * self.interval_s
                    events.append(ev)
        return events

    @classmethod
    def from_mda_sequence(cls, seq: Any) -> AcquisitionPlan:
        """Read a useq ``MDASequence`` (e.g. from a YAML file) as a plan.

        What the plan can hold is kept: time points and interval, a relative z plan,
        channels with their exposures. A channel without an exposure gets the default
        10 ms. Anything that would make the run differ from the sequence as written
        is refused with a `PlanError` naming it, rather than dropped: several or
        placed stage positions, grids, autofocus, ``keep_shutter_open_across``,
        per-channel ``z_offset`` / ``camera``, ``do_stack: false`` with a z-stack,
        ``acquire_every`` with a time series, channels in different groups,
        multi-phase time plans, and axis orders other than ``tcz``.

        Raises
        ------
        PlanError
            The sequence uses a feature the recorder cannot reproduce.
        """
        if len(seq.stage_positions) > 1:
            raise PlanError(
                "plans with several stage positions or grids are not supported by the recorder yet"
            )
        _refuse_placement(seq)
        sizes = mda_sizes(seq)
        if seq.autofocus_plan is not None:
            raise PlanError(
                "autofocus_plan is not supported: the recorder cannot run autofocus; "
                "remove it (focus before the run)"
            )
        if seq.keep_shutter_open_across:
            raise PlanError(
                f"keep_shutter_open_across {tuple(seq.keep_shutter_open_across)} is not "
                "supported: the plan cannot pass it on to either engine"
            )
        order = "".join(a for a in seq.axis_order if sizes.get(a, 0) > 1)
        if order not in ("", "t", "c", "z", "tc", "tz", "cz", "tcz"):
            raise PlanError(
                f"axis order {''.join(seq.axis_order)!r}: scopestream records in t, c, z order"
            )
        zs: Sequence[float] = (0.0,)
        if seq.z_plan is not None:
            if not getattr(seq.z_plan, "is_relative", True):
                raise PlanError("use a relative z plan (offsets around the focus)")
            zs = [float(z) for z in seq.z_plan]
        loops = max(1, sizes.get("t", 1))
        _refuse_channel_features(seq.channels, n_z=len(zs), n_t=loops)
        interval = 0.0
        if seq.time_plan is not None:
            if hasattr(seq.time_plan, "phases"):
                # One interval per plan: phases with different intervals would be
                # recorded at the wrong times.
                raise PlanError("multi-phase time plans are not supported: use one interval")
            try:
                step = getattr(seq.time_plan, "interval", None)
            except ZeroDivisionError:  # a duration over one loop: no interval to keep
                step = None
            interval = float(step.total_seconds()) if step is not None else 0.0
        group = seq.channels[0].group if seq.channels else "Channel"
        return cls(
            time_points=loops,
            interval_s=interval,
            z_offsets_um=tuple(zs),
            channels=_channel_specs(seq.channels),
            channel_group=group,
        )


def mda_sizes(seq: Any) -> dict[str, int]:
    """Time points, positions, channels and z-planes of a useq ``MDASequence``.

    Computed from the plans, unlike ``MDASequence.sizes``, which lists every axis:
    a mistyped ``loops: 1000000000`` would take minutes and gigabytes to count.
    Grids are not counted (`AcquisitionPlan.from_mda_sequence` refuses them).
    """
    t = 0
    if seq.time_plan is not None:
        t = int(seq.time_plan.num_timepoints())
    z = 0 if seq.z_plan is None else int(seq.z_plan.num_positions())
    return {"t": t, "p": len(seq.stage_positions), "c": len(seq.channels), "z": z}


# useq's default for a channel without an exposure is "the camera's current one";
# a plan needs a number, so it gets the same default as `ChannelSpec`.
_DEFAULT_EXPOSURE_MS = ChannelSpec.exposure_ms


def _refuse_placement(seq: Any) -> None:
    """Refuse a single stage position that moves the stage, or a grid: the run stays put."""
    if seq.grid_plan is not None:
        raise PlanError("grid_plan is not supported by the recorder yet (it moves the stage)")
    for pos in seq.stage_positions:
        coords = {a: getattr(pos, a) for a in ("x", "y", "z") if getattr(pos, a) is not None}
        if coords:
            where = ", ".join(f"{a}={v:g}" for a, v in coords.items())
            raise PlanError(
                f"stage position coordinates ({where}) are not supported: the run acquires "
                "where the stage and focus are; remove stage_positions"
            )
        if pos.sequence is not None:
            raise PlanError("a stage position with its own sequence is not supported")
        if pos.properties:
            raise PlanError("a stage position with device properties is not supported")


def _refuse_channel_features(channels: Sequence[Any], *, n_z: int, n_t: int) -> None:
    """Refuse per-channel settings that would leave holes or shifts in a t×c×z recording."""
    groups = {ch.group for ch in channels}
    if len(groups) > 1:
        raise PlanError(f"channels in different groups {sorted(groups)}: use one channel group")
    for ch in channels:
        if not ch.do_stack and n_z > 1:
            raise PlanError(
                f"channel {ch.config!r}: do_stack: false is not supported with a z-stack "
                "(every channel is recorded at every plane)"
            )
        if ch.acquire_every > 1 and n_t > 1:
            raise PlanError(
                f"channel {ch.config!r}: acquire_every: {ch.acquire_every} is not supported "
                "(every channel is recorded at every time point)"
            )
        if ch.z_offset:
            raise PlanError(
                f"channel {ch.config!r}: z_offset {ch.z_offset:g} is not supported "
                "(every channel is recorded at the same planes)"
            )
        if getattr(ch, "camera", None) is not None:
            raise PlanError(f"channel {ch.config!r}: camera {ch.camera!r} is not supported")


def _channel_specs(channels: Sequence[Any]) -> tuple[ChannelSpec, ...]:
    """Name useq channels uniquely: the preset, then preset@exposure, then a running number."""
    exposures = [float(ch.exposure or _DEFAULT_EXPOSURE_MS) for ch in channels]
    names = [
        ch.config
        if sum(c.config == ch.config for c in channels) == 1
        else f"{ch.config}@{exp:g}ms"
        for ch, exp in zip(channels, exposures, strict=True)
    ]
    # The same preset and exposure twice (e.g. both without an exposure) is still
    # two channels the user asked for; number them rather than fail on the name.
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if counts[n] > 1:
            seen[n] = seen.get(n, 0) + 1
            names[i] = f"{n}#{seen[n]}"
    return tuple(
        ChannelSpec(name=n, exposure_ms=exp, config=ch.config)
        for n, ch, exp in zip(names, channels, exposures, strict=True)
    )
