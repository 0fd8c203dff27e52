"""The acquisition plan (time × channel × z): what a config names and every engine runs.

`AcquisitionPlan` is the one form of a plan. A run config's ``plan`` is one (YAML
and flags fill it), `AcquisitionPlan.resolved` settles what the config left open
(time points from ``frames``, the interval from ``fps``), and the sources run it:
as a useq-schema ``MDASequence`` for pymmcore-plus (`to_mda_sequence`) or a list
of pycromanager events (`to_pycromanager_events`), so both engines acquire the
same frames in the same order: for each time point, for each channel, a z-stack
(``tcz``). `from_mda_sequence` reads a user's ``MDASequence`` as a plan.

Channels have a *name* (what the run calls them, unique) and a Micro-Manager
*config* preset (defaults to the name). Two channels may share a preset with
different exposures: that is a denoising pair (low and high exposure of the
same field), recorded as two channels with their exposures.

useq is imported only by the methods that need it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from scopestream.acquisition.positions import (
    MAX_POSITIONS,
    PlanGrid,
    PlanPlate,
    PlanPosition,
    count_fields,
    expand_fields,
    well_name,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scopestream.streaming.layout import Position, StreamInfo

# Upper bounds no real microscope reaches (see `scopestream.config` for the others).
MAX_TIME_POINTS = 10_000_000
"""Time points of a plan: one a second for 115 days."""
MAX_Z_PLANES = 10_000
"""Planes of one z-stack: 1 mm at 0.1 µm, beyond light-sheet stacks."""
MAX_CHANNELS = 64
"""Channels of a plan: spectral imaging uses a few dozen at most."""
DEFAULT_TIME_POINTS = 100
"""Time points of a plan that names neither its time points nor the run's frames."""
DEFAULT_EXPOSURE_MS = 10.0
"""Exposure of a channel that names none (also a useq channel without an exposure)."""

_PAIR_KEYS = ("input", "target", "targets")


class PlanError(ValueError):
    """A plan that cannot be run as asked."""


class ChannelSpec(BaseModel):
    """One channel of a plan.

    Shorthand: ``nuclei:20`` (name and preset nuclei, 20 ms), ``nuclei_hi=nuclei:50``
    (a channel named nuclei_hi on the preset nuclei: the high half of a pair).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1)
    exposure_ms: float = Field(DEFAULT_EXPOSURE_MS, gt=0)
    config: str | None = Field(None, description="Micro-Manager preset (default: the name)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: object) -> object:
        if isinstance(v, str):
            name, _, exp = v.partition(":")
            name, _, preset = name.partition("=")
            out: dict[str, object] = {"name": name.strip()}
            if preset.strip():
                out["config"] = preset.strip()
            if exp.strip():
                out["exposure_ms"] = float(exp.strip().removesuffix("ms"))
            return out
        return v

    @property
    def preset(self) -> str:
        """The Micro-Manager config preset that selects this channel."""
        return self.config or self.name


class AcquisitionPlan(BaseModel):
    """Time points × channels × z-offsets, acquired in ``tcz`` order.

    The z-stack is ``z_planes`` planes ``z_step_um`` apart centred on the focus, or
    the explicit ``z_offsets_um`` (relative to the focus when the run starts; read
    from an ``MDASequence``, possibly uneven); `z_offsets` gives them in either case.
    ``time_points`` None means "as many as the run's ``frames`` need" until
    `resolved`, or open-ended for an acquisition someone else runs. With no
    channels, the camera's current setting is used as one channel named ``raw``.
    ``pairs`` tells the trainer which channels belong together (saved with the run).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    time_points: int | None = Field(
        None,
        gt=0,
        le=MAX_TIME_POINTS,
        description=f"default: enough for --frames; at most {MAX_TIME_POINTS:,}",
    )
    interval_s: float = Field(0.0, ge=0, description="0: none (as fast as possible)")
    z_planes: int = Field(
        1, gt=0, le=MAX_Z_PLANES, description=f"planes per z-stack, at most {MAX_Z_PLANES:,}"
    )
    z_step_um: float = Field(1.0, gt=0)
    z_offsets_um: tuple[float, ...] | None = Field(
        None,
        min_length=1,
        max_length=MAX_Z_PLANES,
        description="explicit z positions around the focus, instead of z_planes × z_step_um",
    )
    channels: tuple[ChannelSpec, ...] = Field(
        (), max_length=MAX_CHANNELS, description=f"at most {MAX_CHANNELS} channels"
    )
    channel_group: str = "Channel"
    pairs: dict[str, Any] = Field(
        default_factory=dict,
        description="which channels the trainer pairs, e.g. {denoise: {input: low, target: high}}"
        f" (keys {', '.join(_PAIR_KEYS)})",
    )
    positions: tuple[PlanPosition, ...] = Field(
        (), max_length=MAX_POSITIONS, description="stage positions (name, x/y/z µm, grid)"
    )
    grid: PlanGrid | None = Field(None, description="a grid of fields around each position")
    plate: PlanPlate | None = Field(None, description="wells of a plate, fields per well")

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, v: object) -> object:
        if isinstance(v, str):
            return [c for c in v.split(",") if c.strip()]
        return v

    @model_validator(mode="before")
    @classmethod
    def _z_planes_from_offsets(cls, v: object) -> object:
        # Explicit offsets alone say how many planes there are.
        if isinstance(v, Mapping) and "z_planes" not in v:
            offsets = v.get("z_offsets_um")
            if isinstance(offsets, (list, tuple)) and offsets:
                return {**v, "z_planes": len(offsets)}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AcquisitionPlan:
        if self.z_offsets_um is not None and len(self.z_offsets_um) != self.z_planes:
            raise ValueError(
                f"z_planes {self.z_planes} does not match the {len(self.z_offsets_um)} "
                "z_offsets_um; give one of them"
            )
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"channel names must be unique, got {names}")
        _check_pairs(self.pairs, set(names))
        if self.plate is not None and (self.positions or self.grid is not None):
            raise ValueError(
                "a plate plan names its fields (wells × fields); leave positions and grid out"
            )
        named = [p.name for p in self.positions if p.name is not None]
        if len(set(named)) != len(named):
            dup = sorted({n for n in named if named.count(n) > 1})
            raise ValueError(f"position names must be unique; repeated: {', '.join(dup[:5])}")
        if self.n_positions > MAX_POSITIONS:
            raise ValueError(
                f"the plan visits {self.n_positions:,} fields; at most {MAX_POSITIONS:,}"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_offsets(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Saved configs (and their golden files) keep the form they had before
        # explicit offsets existed; an absent key reads back as None.
        data: dict[str, Any] = handler(self)
        if data.get("z_offsets_um", 0) is None:
            del data["z_offsets_um"]
        for key in ("positions", "grid", "plate"):  # likewise for where it images
            if key in data and not data[key]:
                del data[key]
        return data

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
    def z_offsets(self) -> tuple[float, ...]:
        """The z positions of a stack, relative to the focus (``(0.0,)``: no stack)."""
        if self.z_offsets_um is not None:
            return self.z_offsets_um
        return self.z_range(self.z_planes, self.z_step_um)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Names of the run's channels."""
        return tuple(c.name for c in self.channels) or ("raw",)

    @property
    def n_positions(self) -> int:
        """Fields the plan visits per time point (1: it stays where the stage is)."""
        return count_fields(self.positions, self.grid, self.plate)

    @property
    def n_frames(self) -> int:
        """Frames the whole plan acquires (`PlanError` while ``time_points`` is open)."""
        return self._time_points() * self.n_positions * len(self.channel_names) * self.z_planes

    def fields(
        self,
        frame_shape: tuple[int, int],
        pixel_size_um: float,
        origin_um: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[Position, ...]:
        """Every field the plan visits, in ``p`` order (empty: it stays where the stage is).

        Grid steps are the camera's field of view (``frame_shape`` × ``pixel_size_um``);
        ``origin_um`` is where the stage is when the run starts.
        """
        fov = (frame_shape[1] * pixel_size_um, frame_shape[0] * pixel_size_um)
        try:
            return expand_fields(
                self.positions, self.grid, self.plate, fov_um=fov, origin_um=origin_um
            )
        except ValueError as e:
            raise PlanError(str(e)) from None

    def resolved(self, frames: int | None = None, fps: float | None = None) -> AcquisitionPlan:
        """The plan a run acquires: every time point and the interval settled.

        Time points not given become enough for ``frames`` (else
        `DEFAULT_TIME_POINTS`); a plan without an interval gets ``1 / fps``; then
        `limited_to` ``frames``.
        """
        t = self.time_points
        if t is None:
            t = self._per_time_point_ceil(frames) if frames is not None else DEFAULT_TIME_POINTS
        interval = self.interval_s or (1.0 / fps if fps else 0.0)
        return self._derived(time_points=t, interval_s=interval).limited_to(frames)

    def limited_to(self, frames: int | None) -> AcquisitionPlan:
        """The same plan with just enough time points for ``frames`` frames."""
        if frames is None:
            return self
        t = self._per_time_point_ceil(frames)
        return self._derived(time_points=min(t, self.time_points) if self.time_points else t)

    def stream_info(
        self,
        frame_shape: tuple[int, int],
        dtype: str,
        pixel_size_um: float,
        origin_um: tuple[float, float] = (0.0, 0.0),
    ) -> StreamInfo:
        """The stream this plan produces on a camera of ``frame_shape`` (open: ``n_t`` None).

        Its ``positions`` are `fields` (``origin_um``: where the stage is at the start).
        """
        from scopestream.streaming.layout import StreamInfo

        zs = self.z_offsets
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
            positions=self.fields(frame_shape, pixel_size_um, origin_um),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able form saved with the run (the trainer reads ``channels`` and ``pairs``)."""
        return {
            "time_points": self.time_points,
            "interval_s": self.interval_s,
            "z_offsets_um": list(self.z_offsets),
            "channels": [
                {"name": c.name, "config": c.preset, "exposure_ms": c.exposure_ms}
                for c in self.channels
            ],
            "channel_group": self.channel_group,
            "pairs": self.pairs,
            **{
                k: v
                for k, v in self.model_dump(mode="json", include={"positions", "grid", "plate"})
                .items()
                if v
            },
        }

    def _time_points(self) -> int:
        if self.time_points is None:
            raise PlanError(
                "the plan's time points are open: resolve it first (plan.resolved(frames=...))"
            )
        return self.time_points

    def _per_time_point_ceil(self, frames: int) -> int:
        """Time points that hold ``frames`` frames (at least one)."""
        per_t = self.n_positions * len(self.channel_names) * self.z_planes
        return max(1, -(-frames // per_t))  # exact ceil

    def _derived(
        self, *, time_points: int | None = None, interval_s: float | None = None
    ) -> AcquisitionPlan:
        """A copy with time points or interval worked out from already validated values.

        Not validated again on purpose: time points derived from a run's ``frames``
        (bounded by ``MAX_FRAMES``) or an MDA sequence's loops (checked by
        ``scopestream.config.build_plan``) may exceed ``MAX_TIME_POINTS``, the bound
        on what a plan *writes*.
        """
        changes: dict[str, Any] = {}
        if time_points is not None:
            changes["time_points"] = time_points
        if interval_s is not None:
            changes["interval_s"] = interval_s
        return self.model_copy(update=changes)

    # -- engines ---------------------------------------------------------------
    def to_mda_sequence(self, positions: Sequence[Position] = ()) -> Any:
        """The plan as a useq ``MDASequence`` (pymmcore-plus), ``tpcz`` order.

        ``positions``: the plan's `fields` for the camera that runs it (grids and
        plates are expanded by then, so both engines visit the same fields).
        """
        import useq

        self._check_fields(positions)
        zs = self.z_offsets
        kw: dict[str, Any] = {"axis_order": "tpcz"}
        if positions:
            kw["stage_positions"] = [
                {"x": p.x_um, "y": p.y_um, "z": p.z_um, "name": p.name} for p in positions
            ]
        kw["time_plan"] = {"interval": self.interval_s, "loops": self._time_points()}
        if zs != (0.0,):
            kw["z_plan"] = {"relative": list(zs)}
        if self.channels:
            kw["channels"] = [
                {"config": c.preset, "group": self.channel_group, "exposure": c.exposure_ms}
                for c in self.channels
            ]
        return useq.MDASequence(**kw)

    def to_pycromanager_events(
        self, z_origin_um: float = 0.0, positions: Sequence[Position] = ()
    ) -> list[dict[str, Any]]:
        """The plan as pycromanager acquisition events, same order as the MDA sequence.

        ``positions`` as for `to_mda_sequence`; a field's ``z_um`` replaces the focus
        ``z_origin_um`` that its z-stack is centred on.
        """
        self._check_fields(positions)
        zs = self.z_offsets
        events: list[dict[str, Any]] = []
        for t in range(self._time_points()):
            for p, pos in enumerate(positions or (None,)):
                z0 = z_origin_um if pos is None or pos.z_um is None else pos.z_um
                for c in self.channels or (None,):
                    for zi, dz in enumerate(zs):
                        axes: dict[str, Any] = {"time": t}
                        ev: dict[str, Any] = {"axes": axes}
                        if pos is not None:
                            axes["position"] = p
                            if pos.x_um is not None:
                                ev["x"] = pos.x_um
                            if pos.y_um is not None:
                                ev["y"] = pos.y_um
                            if pos.z_um is not None and zs == (0.0,):
                                ev["z"] = pos.z_um
                        if c is not None:
                            axes["channel"] = c.name
                            ev["config_group"] = [self.channel_group, c.preset]
                            ev["exposure"] = c.exposure_ms
                        if zs != (0.0,):
                            axes["z"] = zi
                            ev["z"] = z0 + dz
                        if self.interval_s > 0:
                            ev["min_start_time"] = t * self.interval_s
                        events.append(ev)
        return events

    def _check_fields(self, positions: Sequence[Position]) -> None:
        """A plan that visits fields runs with them expanded (`fields`), never without."""
        n = self.n_positions
        expected = 0 if n == 1 and not self.positions and self.plate is None else n
        if len(positions) != expected:
            raise PlanError(
                f"the plan visits {n} field(s); pass its fields (plan.fields(...)), "
                f"not {len(positions)}"
            )

    @classmethod
    def from_mda_sequence(cls, seq: Any) -> AcquisitionPlan:
        """Read a useq ``MDASequence`` (e.g. from a YAML file) as a plan.

        What the plan can hold is kept: time points and interval, a relative z plan
        (as explicit ``z_offsets_um``), channels with their exposures; the plan's
        `to_mda_sequence` acquires the same frames in the same order. A channel
        without an exposure gets `DEFAULT_EXPOSURE_MS`; a one-plane z plan at the
        focus is no z-stack; a sequence of no axes (which lists no events) is one
        frame with the camera's current settings. Anything that would make the run differ from the
        sequence as written is refused with a `PlanError` naming it, rather than
        dropped: several or placed stage positions, grids, autofocus,
        ``keep_shutter_open_across``, per-channel ``z_offset`` / ``camera``,
        ``do_stack: false`` with a z-stack, ``acquire_every`` with a time series,
        channels in different groups, multi-phase time plans, and axis orders other
        than ``tcz``. The time points are not bounded here (``build_plan`` checks
        the sizes of a sequence it reads).

        Raises
        ------
        PlanError
            The sequence uses a feature the recorder cannot reproduce.
        """
        where = _read_positions(seq)
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
        # positions and grid fields are one axis here (p), recorded between t and c
        n_p = sizes.get("p", 0)
        order = "".join(
            "p" if a == "g" else a
            for a in seq.axis_order
            if sizes.get(a, 0) > 1 or (a in "pg" and n_p > 1)
        )
        order = re.sub(r"p+", "p", order)
        if not _in_order(order, "tpcz"):
            raise PlanError(
                f"axis order {''.join(seq.axis_order)!r}: scopestream records in t, p, c, z "
                "order (time outermost, then positions, channels, z)"
            )
        zs: tuple[float, ...] = (0.0,)
        if seq.z_plan is not None:
            if not getattr(seq.z_plan, "is_relative", True):
                raise PlanError("use a relative z plan (offsets around the focus)")
            zs = tuple(float(z) for z in seq.z_plan)
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
        try:
            plan = cls(
                interval_s=interval,
                z_offsets_um=None if zs == (0.0,) else zs,
                channels=_channel_specs(seq.channels),
                channel_group=group,
                **where,
            )
        except ValidationError as e:
            raise PlanError(_first_error(e)) from None
        return plan._derived(time_points=loops)


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
    return {"t": t, "p": _count_mda_fields(seq), "c": len(seq.channels), "z": z}


def _count_mda_fields(seq: Any) -> int:
    """Fields of a sequence's positions, grids and plate, without listing them."""
    import useq

    def grid_n(g: Any) -> int:
        if isinstance(g, useq.GridRowsColumns):
            return int(g.rows) * int(g.columns)
        return 1  # other grids are refused by `_read_positions`; count them as one

    sp = seq.stage_positions
    if isinstance(sp, useq.WellPlatePlan):
        wp = sp.well_points_plan
        per_well = grid_n(wp) if isinstance(wp, useq.GridRowsColumns) else 1
        return len(sp.selected_well_names) * per_well
    glob = grid_n(seq.grid_plan) if seq.grid_plan is not None else 1
    if not sp:
        return glob
    total = 0
    for pos in sp:
        sub = getattr(pos, "sequence", None)
        total += grid_n(sub.grid_plan) if sub is not None and sub.grid_plan is not None else glob
    return total


def _in_order(order: str, reference: str) -> bool:
    """Whether every axis of ``order`` appears once, in ``reference``'s order."""
    it = iter(reference)
    return len(set(order)) == len(order) and all(a in it for a in order)


def _read_grid(g: Any, where: str) -> PlanGrid:
    """A useq ``GridRowsColumns`` as a `PlanGrid` (other grid kinds are refused)."""
    import useq

    if not isinstance(g, useq.GridRowsColumns):
        raise PlanError(
            f"{where}: a {type(g).__name__} grid is not supported; use rows and columns "
            "(GridRowsColumns)"
        )
    ox, oy = (float(v) for v in g.overlap)
    if ox != oy:
        raise PlanError(f"{where}: overlap {ox:g} % × {oy:g} %: use one overlap for both axes")
    if str(getattr(g.relative_to, "value", g.relative_to)) != "center":
        raise PlanError(f"{where}: a grid relative to {g.relative_to!r}: use the centre")
    fov = None
    if g.fov_width is not None and g.fov_height is not None:
        fov = (float(g.fov_width), float(g.fov_height))
    elif g.fov_width is not None or g.fov_height is not None:
        raise PlanError(f"{where}: give both fov_width and fov_height, or neither")
    return PlanGrid(
        rows=int(g.rows),
        columns=int(g.columns),
        overlap=ox,
        mode=str(getattr(g.mode, "value", g.mode)),
        fov_um=fov,
    )


def _read_positions(seq: Any) -> dict[str, Any]:
    """A sequence's stage positions, grid and plate as plan fields; refuses what it cannot keep."""
    import useq

    sp = seq.stage_positions
    try:
        if isinstance(sp, useq.WellPlatePlan):
            if seq.grid_plan is not None:
                raise PlanError("a well plate plan with a grid_plan: give the fields per well")
            if sp.rotation:
                raise PlanError(f"a rotated plate ({sp.rotation}) is not supported")
            wp = sp.well_points_plan
            if isinstance(wp, useq.GridRowsColumns):
                fields = _read_grid(wp, "well_points_plan")
            elif isinstance(wp, useq.RelativePosition):
                if wp.x or wp.y:
                    raise PlanError("a well point off the well's centre is not supported")
                fields = PlanGrid()
            else:
                raise PlanError(
                    f"well_points_plan {type(wp).__name__} is not supported; use a grid "
                    "(rows, columns) of fields per well"
                )
            x0, y0 = (float(v) for v in sp.a1_center_xy)
            # useq's plate fields move the focus too (to 0.0 unless told): so does the plan
            zs = {None if q.z is None else float(q.z) for q in sp.image_positions[:1]}
            rows, cols = sp.selected_well_indices.T if len(sp.selected_well_indices) else ((), ())
            wells = tuple(well_name(int(r), int(c)) for r, c in zip(rows, cols, strict=True))
            plate = PlanPlate(
                plate=str(sp.plate.name),
                wells=wells,
                a1_center_um=(x0, y0),
                fields=fields,
                z_um=next(iter(zs), None),
            )
            return {"plate": plate}
        grid = None if seq.grid_plan is None else _read_grid(seq.grid_plan, "grid_plan")
        positions = []
        for i, pos in enumerate(sp):
            if pos.properties:
                raise PlanError(f"stage position {i}: device properties are not supported")
            own = None
            sub = pos.sequence
            if sub is not None:
                extra = [
                    k
                    for k in ("time_plan", "z_plan", "channels", "autofocus_plan")
                    if getattr(sub, k)
                ] + (["stage_positions"] if sub.stage_positions else [])
                if extra:
                    raise PlanError(
                        f"stage position {i}: a sub-sequence with {', '.join(extra)} is not "
                        "supported (only a grid_plan per position)"
                    )
                if sub.grid_plan is not None:
                    own = _read_grid(sub.grid_plan, f"stage position {i} grid_plan")
            positions.append(
                PlanPosition(name=pos.name, x_um=pos.x, y_um=pos.y, z_um=pos.z, grid=own)
            )
    except ValidationError as e:
        raise PlanError(_first_error(e)) from None
    # one position that names no place is the plain "where the stage is" run
    if len(positions) == 1 and positions[0] == PlanPosition() and grid is None:
        return {}
    return {"positions": tuple(positions), "grid": grid}


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
    exposures = [float(ch.exposure or DEFAULT_EXPOSURE_MS) for ch in channels]
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


def _check_pairs(pairs: Mapping[str, Any], names: set[str]) -> None:
    """``pairs`` maps kinds to input/target(s) that name the plan's channels, and nothing else."""
    for kind, pair in pairs.items():
        if not isinstance(pair, dict):
            raise ValueError(f"pairs.{kind} must map input/target(s) to channel names")
        # `pairs` is saved with every run: only channel names go in, so nothing
        # else (a stray sub-tree, a non-finite number) reaches the run's attributes.
        extra = sorted(str(k) for k in pair if k not in _PAIR_KEYS)
        if extra:
            raise ValueError(
                f"pairs.{kind}: unknown key(s) {extra} (allowed: {', '.join(_PAIR_KEYS)})"
            )
        targets = pair.get("targets", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"pairs.{kind}.targets must be a list of channel names")
        for key in ("input", "target"):
            if key in pair and not isinstance(pair[key], str):
                raise ValueError(f"pairs.{kind}.{key} must be a channel name")
        used = [pair.get("input"), pair.get("target"), *targets]
        unknown = [u for u in used if u is not None and u not in names]
        if unknown:
            raise ValueError(f"pairs.{kind} names channels {unknown} that the plan does not have")


def _first_error(e: ValidationError) -> str:
    """One line for the first error of a plan built from a sequence."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in (e.title, *err["loc"]))
    return f"the sequence does not make a valid plan: {where}: {err['msg']}"
