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
            interval_s=self.interval_s or 1.0,
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
        """Read a useq ``MDASequence`` (e.g. from a YAML file) as a plan."""
        sizes = seq.sizes
        if sizes.get("p", 0) > 1 or sizes.get("g", 0) > 1:
            raise PlanError(
                "plans with several stage positions or grids are not supported by the recorder yet"
            )
        order = "".join(a for a in str(seq.axis_order) if sizes.get(a, 0) > 1)
        if order not in ("", "t", "c", "z", "tc", "tz", "cz", "tcz"):
            raise PlanError(f"axis order {seq.axis_order!r}: scopestream records in t, c, z order")
        zs: Sequence[float] = (0.0,)
        if seq.z_plan is not None:
            zs = [float(z) for z in seq.z_plan]
            if not getattr(seq.z_plan, "is_relative", True):
                raise PlanError("use a relative z plan (offsets around the focus)")
        channels = tuple(
            ChannelSpec(
                name=ch.config
                if sum(c.config == ch.config for c in seq.channels) == 1
                else f"{ch.config}@{ch.exposure:g}ms",
                exposure_ms=float(ch.exposure or 10.0),
                config=ch.config,
            )
            for ch in seq.channels
        )
        interval = 0.0
        loops = max(1, sizes.get("t", 1))
        if seq.time_plan is not None:
            step = getattr(seq.time_plan, "interval", None)
            interval = float(step.total_seconds()) if step is not None else 0.0
        group = seq.channels[0].group if seq.channels else "Channel"
        return cls(
            time_points=loops,
            interval_s=interval,
            z_offsets_um=tuple(zs),
            channels=channels,
            channel_group=group,
        )
