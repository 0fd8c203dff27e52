"""Where a plan images: stage positions, grids of fields and well plates.

A plan names its fields in one of three ways (see `AcquisitionPlan`):

- ``positions``: stage positions, each with a name and x/y/z (any of them may be
  left out: that axis stays where it is), optionally with its own ``grid``;
- ``grid``: a grid of fields (rows × columns, ``overlap`` in percent of a field)
  around each position, or around wherever the stage is when there are none;
- ``plate``: wells of a standard plate (useq-schema's plate definitions:
  ``96-well``, ``384-well``, …) with ``fields`` per well (a grid).

`expand_fields` turns that into the flat list of fields the run visits, in the
order of the frames' ``p`` index; every engine and the simulator run that list,
so both acquire the same fields in the same order. Grid steps need the camera's
field of view, so fields are expanded when the camera is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scopestream.streaming.layout import Position

if TYPE_CHECKING:
    from collections.abc import Sequence

MAX_POSITIONS = 10_000
"""Fields of one plan: a 1536-well plate with six fields per well."""

_WELL = re.compile(r"^([A-Za-z]{1,2})(\d{1,3})$")


class PlanGrid(BaseModel):
    """A grid of fields: ``rows`` × ``columns``, ``overlap`` percent of a field apart."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rows: int = Field(1, ge=1, le=MAX_POSITIONS)
    columns: int = Field(1, ge=1, le=MAX_POSITIONS)
    overlap: float = Field(0.0, ge=0, lt=100, description="percent of a field shared")
    mode: str = Field("row_wise_snake", description="useq-schema's order of the fields")
    fov_um: tuple[float, float] | None = Field(
        None, description="field (width, height) to step by; default: the camera's"
    )

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        import useq

        modes = [m.value for m in useq.OrderMode]
        if v not in modes:
            raise ValueError(f"grid mode {v!r}; one of {', '.join(modes)}")
        return v

    @model_validator(mode="after")
    def _bounded(self) -> PlanGrid:
        if self.rows * self.columns > MAX_POSITIONS:
            raise ValueError(
                f"a grid of {self.rows} × {self.columns} fields; at most {MAX_POSITIONS:,}"
            )
        return self

    @property
    def n_fields(self) -> int:
        """Fields in the grid."""
        return self.rows * self.columns

    def offsets_um(self, fov_um: tuple[float, float]) -> list[tuple[float, float]]:
        """(dx, dy) of each field from the grid's centre, row by row (useq's order)."""
        import useq

        w, h = self.fov_um or fov_um
        g = useq.GridRowsColumns(
            rows=self.rows,
            columns=self.columns,
            overlap=self.overlap,
            mode=self.mode,
            fov_width=w,
            fov_height=h,
        )
        return [(float(p.x or 0.0), float(p.y or 0.0)) for p in g.iter_grid_positions()]


class PlanPosition(BaseModel):
    """A stage position of a plan (µm, absolute); a ``None`` axis stays where it is."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, min_length=1)
    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    grid: PlanGrid | None = Field(None, description="fields around this position")


class PlanPlate(BaseModel):
    """Wells of a plate, ``fields`` (a grid) in each, the plate's A1 centre at ``a1_center_um``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    plate: str = Field("96-well", description="a useq-schema plate name, e.g. 96-well, 384-well")
    wells: tuple[str, ...] = Field(..., min_length=1, max_length=MAX_POSITIONS)
    a1_center_um: tuple[float, float] = (0.0, 0.0)
    fields: PlanGrid = PlanGrid()
    z_um: float | None = Field(None, description="focus at every field; default: keep it")

    @field_validator("wells", mode="before")
    @classmethod
    def _wells(cls, v: object) -> object:
        if isinstance(v, str):
            return [w.strip() for w in v.split(",") if w.strip()]
        return v

    @model_validator(mode="after")
    def _known(self) -> PlanPlate:
        rows, cols = plate_shape(self.plate)
        seen: set[str] = set()
        for w in self.wells:
            r, c = well_index(w)
            if r >= rows or c >= cols:
                raise ValueError(
                    f"well {w!r} is not on a {self.plate} plate ({rows} rows × {cols} columns)"
                )
            if w.upper() in seen:
                raise ValueError(f"well {w!r} is listed twice")
            seen.add(w.upper())
        if len(self.wells) * self.fields.n_fields > MAX_POSITIONS:
            raise ValueError(
                f"{len(self.wells)} wells × {self.fields.n_fields} fields; "
                f"at most {MAX_POSITIONS:,} fields"
            )
        return self


def plate_shape(name: str) -> tuple[int, int]:
    """(rows, columns) of a useq-schema plate definition; a clear error for unknown ones."""
    import useq

    try:
        plate = useq.WellPlate.from_str(name)
    except Exception:
        known = ", ".join(sorted(useq.registered_well_plate_keys()))
        raise ValueError(f"unknown plate {name!r}; known plates: {known}") from None
    return int(plate.rows), int(plate.columns)


def well_index(name: str) -> tuple[int, int]:
    """(row, column), 0-based, of a well name such as ``B3`` or ``AA12``."""
    m = _WELL.match(name.strip())
    if not m:
        raise ValueError(f"{name!r} is not a well name (a row letter and a column: B3)")
    letters, number = m.group(1).upper(), int(m.group(2))
    row = 0
    for ch in letters:
        row = row * 26 + (ord(ch) - ord("A") + 1)
    if number < 1:
        raise ValueError(f"{name!r}: columns count from 1")
    return row - 1, number - 1


def well_name(row: int, column: int) -> str:
    """``B3`` for row 1, column 2 (0-based); rows past Z are AA, AB, … (1536-well plates)."""
    letters = ""
    r = row + 1
    while r:
        r, rem = divmod(r - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"{letters}{column + 1}"


def count_fields(
    positions: Sequence[PlanPosition], grid: PlanGrid | None, plate: PlanPlate | None
) -> int:
    """Fields a plan visits (1 when it stays where the stage is), without the camera."""
    if plate is not None:
        return len(plate.wells) * plate.fields.n_fields
    if not positions:
        return grid.n_fields if grid is not None else 1
    total = 0
    for p in positions:
        g = p.grid or grid
        total += g.n_fields if g is not None else 1
    return total


def expand_fields(
    positions: Sequence[PlanPosition],
    grid: PlanGrid | None,
    plate: PlanPlate | None,
    *,
    fov_um: tuple[float, float],
    origin_um: tuple[float, float] = (0.0, 0.0),
) -> tuple[Position, ...]:
    """Every field the plan visits, in ``p`` order; empty when it stays where the stage is.

    ``fov_um`` is the camera's field of view (width, height); ``origin_um`` where
    the stage is when the run starts (the centre of a grid without positions).

    Raises
    ------
    ValueError
        Two fields would have the same name.
    """
    out: list[Position] = []
    if plate is not None:
        out = _plate_fields(plate, fov_um)
    elif positions:
        for i, pos in enumerate(positions):
            name = pos.name or f"P{i}"
            g = pos.grid or grid
            if g is None or g.n_fields == 1:
                out.append(Position(name, pos.x_um, pos.y_um, pos.z_um))
                continue
            cx = pos.x_um if pos.x_um is not None else origin_um[0]
            cy = pos.y_um if pos.y_um is not None else origin_um[1]
            for k, (dx, dy) in enumerate(g.offsets_um(fov_um)):
                out.append(Position(f"{name}_{k:04d}", cx + dx, cy + dy, pos.z_um, field=k))
    elif grid is not None and grid.n_fields > 1:
        for k, (dx, dy) in enumerate(grid.offsets_um(fov_um)):
            out.append(Position(f"{k:04d}", origin_um[0] + dx, origin_um[1] + dy, field=k))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"position names must be unique; repeated: {', '.join(dup[:5])}")
    return tuple(out)


@dataclass(frozen=True)
class StageTravel:
    """How far the stages go (µm, ``(low, high)`` per axis), where the core reports it.

    None on an axis: its travel is not known (Micro-Manager's core reports the focus
    drive's range only as limits of its ``Position`` property, and no XY range yet),
    so nothing is checked there.
    """

    x: tuple[float, float] | None = None
    y: tuple[float, float] | None = None
    z: tuple[float, float] | None = None

    @property
    def known(self) -> bool:
        """Whether any axis has a known range."""
        return any(r is not None for r in (self.x, self.y, self.z))


def outside_travel(
    fields: Sequence[Position],
    travel: StageTravel,
    *,
    z_offsets: Sequence[float] = (0.0,),
    z_now_um: float = 0.0,
) -> list[str]:
    """Each field the stages cannot reach, as ``"name: z 9000 µm (range −5000…5000)"``.

    A field's z-stack is checked from its lowest to its highest plane: ``z_offsets``
    are relative to the field's ``z_um``, or to ``z_now_um`` (the focus when the run
    starts) when the field leaves z alone. Empty: every field is reachable (or no
    range is known).
    """
    if not travel.known:
        return []
    lo_off, hi_off = min(z_offsets, default=0.0), max(z_offsets, default=0.0)
    out = []
    for f in fields:
        z0 = f.z_um if f.z_um is not None else z_now_um
        checks: list[tuple[str, float | None, tuple[float, float] | None]] = [
            ("x", f.x_um, travel.x),
            ("y", f.y_um, travel.y),
            ("z", z0 + lo_off, travel.z),
            ("z", z0 + hi_off, travel.z),
        ]
        bad = []
        for axis, v, rng in checks:
            if v is None or rng is None or rng[0] <= v <= rng[1]:
                continue
            what = f"{axis} {v:g} µm (range {rng[0]:g}…{rng[1]:g})"
            if what not in bad:
                bad.append(what)
        if bad:
            out.append(f"{f.name}: {', '.join(bad)}")
    return out


def _plate_fields(plate: PlanPlate, fov_um: tuple[float, float]) -> list[Position]:
    """The plate's fields through useq's ``WellPlatePlan`` (its geometry and names)."""
    import useq

    idx = [well_index(w) for w in plate.wells]
    w, h = plate.fields.fov_um or fov_um
    points: Any = useq.RelativePosition()  # one field a well, at its centre: named "A1"
    if plate.fields.n_fields > 1:
        points = useq.GridRowsColumns(
            rows=plate.fields.rows,
            columns=plate.fields.columns,
            overlap=plate.fields.overlap,
            mode=plate.fields.mode,
            fov_width=w,
            fov_height=h,
        )
    plan = useq.WellPlatePlan(
        plate=plate.plate,
        a1_center_xy=plate.a1_center_um,
        selected_wells=([r for r, _ in idx], [c for _, c in idx]),
        well_points_plan=points,
    )
    n_per_well = plate.fields.n_fields
    out = []
    for k, pos in enumerate(plan):
        if pos.plate_row is not None and pos.plate_col is not None:
            well = well_name(int(pos.plate_row), int(pos.plate_col))
        else:
            well = plate.wells[k // n_per_well].upper()
        out.append(
            Position(
                pos.name or f"{well}_{k % n_per_well:04d}",
                float(pos.x) if pos.x is not None else None,
                float(pos.y) if pos.y is not None else None,
                plate.z_um,
                well=well,
                field=k % n_per_well,
            )
        )
    return out
