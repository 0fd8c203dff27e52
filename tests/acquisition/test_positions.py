"""Positions, grids and well plates: one plan, expanded once, run the same by every engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import useq
from pydantic import ValidationError

from scopestream.acquisition.base import SourceError
from scopestream.acquisition.factory import make_source
from scopestream.acquisition.mmcore import MMCoreSource, stage_travel
from scopestream.acquisition.plan import AcquisitionPlan, PlanError
from scopestream.acquisition.positions import StageTravel, outside_travel, well_index, well_name
from scopestream.acquisition.sim import SimulatedSource
from scopestream.config import ConfigError, RunConfig, build_plan
from scopestream.streaming.layout import Position

if TYPE_CHECKING:
    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.seams import FrameSource

PLATE = {"plate": "96-well", "wells": "A1,A2,B1,B2", "fields": {"rows": 1, "columns": 2}}


def collect(src: FrameSource, timeout: float = 60) -> list[tuple[np.ndarray, FrameMeta]]:
    got: list[tuple[np.ndarray, FrameMeta]] = []
    src.start(lambda d, m: got.append((d.copy(), m)))
    assert src.wait(timeout), "source did not finish"
    assert src.error is None
    return got


def _events(seq: Any) -> list[tuple[Any, ...]]:
    # positions and grid fields are one axis (p) in a plan: compare what is acquired
    # where, in which order; the field indices are checked on their own
    return [
        (
            tuple(sorted((str(k), v) for k, v in e.index.items() if k not in ("p", "g"))),
            None if e.x_pos is None else round(e.x_pos, 6),
            None if e.y_pos is None else round(e.y_pos, 6),
            e.z_pos,
            e.channel.config if e.channel else None,
            e.exposure,
        )
        for e in seq
    ]


def test_well_names_and_indices_round_trip() -> None:
    for r, c in [(0, 0), (1, 2), (7, 11), (25, 0), (26, 47), (31, 47)]:
        assert well_index(well_name(r, c)) == (r, c)
    assert well_name(1, 2) == "B3" and well_name(26, 0) == "AA1"
    with pytest.raises(ValueError, match="not a well name"):
        well_index("3B")


def test_a_plate_plan_expands_to_the_plates_fields_in_p_order() -> None:
    plan = AcquisitionPlan.model_validate({"time_points": 3, "z_planes": 3, "plate": PLATE})
    assert plan.n_positions == 8
    assert plan.n_frames == 3 * 8 * 1 * 3
    fields = plan.fields((64, 64), 0.5)  # a 32 µm field of view
    assert [f.name for f in fields] == [
        f"{w}_{k:04d}" for w in ("A1", "A2", "B1", "B2") for k in range(2)
    ]
    assert [f.well for f in fields] == ["A1", "A1", "A2", "A2", "B1", "B1", "B2", "B2"]
    # useq-schema's 96-well geometry: 9 mm pitch; two fields one field of view apart
    a1, a1b, a2, b1 = fields[0], fields[1], fields[2], fields[4]
    assert a1b.x_um is not None and a1.x_um is not None and a2.x_um is not None
    assert a1b.x_um - a1.x_um == pytest.approx(32.0)
    assert a2.x_um - a1.x_um == pytest.approx(9000.0)
    assert b1.y_um is not None and a1.y_um is not None
    assert abs(b1.y_um - a1.y_um) == pytest.approx(9000.0)


def test_a_grid_is_centred_on_the_stage_and_overlaps_as_asked() -> None:
    plan = AcquisitionPlan.model_validate(
        {"time_points": 1, "grid": {"rows": 2, "columns": 2, "overlap": 10}}
    )
    fields = plan.fields((100, 100), 1.0, origin_um=(1000.0, 2000.0))
    xs = sorted({f.x_um for f in fields if f.x_um is not None})
    ys = sorted({f.y_um for f in fields if f.y_um is not None})
    assert xs == [pytest.approx(955.0), pytest.approx(1045.0)]  # 90 µm apart: 10 % overlap
    assert ys == [pytest.approx(1955.0), pytest.approx(2045.0)]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"positions": [{"name": "a"}, {"name": "a"}]}, "position names must be unique"),
        ({"plate": {"plate": "97-well", "wells": "A1"}}, "unknown plate '97-well'"),
        ({"plate": {"wells": "I1"}}, "not on a 96-well plate"),
        ({"plate": {"wells": "A1,a1"}}, "listed twice"),
        ({"plate": {"wells": ""}}, "at least 1"),
        ({"plate": PLATE, "positions": [{"x_um": 1}]}, "leave positions and grid out"),
        ({"grid": {"rows": 200, "columns": 200}}, "at most 10,000"),
    ],
)
def test_bad_position_plans_are_refused_with_a_reason(plan: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AcquisitionPlan.model_validate(plan)


def test_a_grid_plan_too_big_for_the_run_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="time points × positions"):
        RunConfig.model_validate(
            {"plan": {"time_points": 10_000_000, "grid": {"rows": 10, "columns": 10}}}
        )


def test_mda_positions_grids_and_plates_read_as_the_same_frames() -> None:
    fov = {"fov_width": 40.0, "fov_height": 30.0}
    sequences = [
        useq.MDASequence(
            stage_positions=[
                {"x": 10, "y": 20, "z": 3, "name": "left"},
                {"x": 500, "y": -20, "name": "right",
                 "sequence": {"grid_plan": {"rows": 2, "columns": 1, **fov}}},
            ],
            time_plan={"interval": 0, "loops": 2},
            channels=[{"config": "DAPI", "exposure": 5}],
        ),
        useq.MDASequence(
            stage_positions=[{"x": 0, "y": 0}],
            grid_plan={"rows": 2, "columns": 3, "overlap": 20, **fov},
            z_plan={"range": 2, "step": 1},
            time_plan={"interval": 0, "loops": 1},
            channels=[{"config": "DAPI", "exposure": 5}, {"config": "FITC", "exposure": 8}],
        ),
        useq.MDASequence(
            stage_positions=useq.WellPlatePlan(
                plate="24-well",
                a1_center_xy=(100.0, 200.0),
                selected_wells=([0, 1, 1], [0, 0, 3]),
                well_points_plan=useq.GridRowsColumns(rows=1, columns=2, **fov),
            ),
            time_plan={"interval": 0, "loops": 2},
            channels=[{"config": "DAPI", "exposure": 5}],
        ),
    ]
    for seq in sequences:
        plan = AcquisitionPlan.from_mda_sequence(seq)
        fields = plan.fields((30, 40), 1.0)  # the camera's own fov differs: the sequence's wins
        again = plan.to_mda_sequence(fields)
        assert _events(again) == _events(seq)
        visited = list(dict.fromkeys((e.index.get("p", 0), e.index.get("g", 0)) for e in seq))
        assert plan.n_positions == len(fields) == len(visited)
        flat = [visited.index((e.index.get("p", 0), e.index.get("g", 0))) for e in seq]
        assert [e.index.get("p", 0) for e in again] == flat


def test_what_a_plan_cannot_keep_is_refused() -> None:
    refused = [
        (useq.MDASequence(grid_plan={"top": 0, "left": 0, "bottom": 10, "right": 10}),
         "GridFromEdges grid is not supported"),
        (useq.MDASequence(stage_positions=[{"x": 0, "sequence": {"channels": ["DAPI"]}}]),
         "only a grid_plan per position"),
        (useq.MDASequence(
            stage_positions=useq.WellPlatePlan(
                plate="96-well", a1_center_xy=(0, 0), selected_wells=([0], [0]),
                well_points_plan=useq.RandomPoints(num_points=3),
            )), "RandomPoints is not supported"),
        (useq.MDASequence(
            stage_positions=[{"x": 0}, {"x": 5}], time_plan={"interval": 0, "loops": 2},
            axis_order="ptcz"), "t, p, c, z order"),
    ]
    for seq, message in refused:
        with pytest.raises(PlanError, match=message):
            AcquisitionPlan.from_mda_sequence(seq)


def test_a_config_plate_plan_builds_and_sizes_with_its_positions(tmp_path: Any) -> None:
    cfg = RunConfig.model_validate({"frames": 20, "plan": {"channels": "nuclei", "plate": PLATE}})
    plan = build_plan(cfg)
    assert plan.n_positions == 8 and plan.time_points == 3  # 20 frames need 3 time points
    big = tmp_path / "big.yaml"
    big.write_text(
        "stage_positions:\n  - {x: 0, y: 0, sequence: {grid_plan: {rows: 200, columns: 200}}}\n"
    )
    with pytest.raises(ConfigError, match="40,000 positions"):
        build_plan(RunConfig.model_validate({"mda": str(big)}))


def test_the_simulator_shows_another_field_at_each_position_and_knows_its_truth() -> None:
    plan = AcquisitionPlan.model_validate(
        {"time_points": 2, "channels": "nuclei", "plate": {**PLATE, "wells": "A1,B2"}}
    )
    src = SimulatedSource((64, 64), plan, seed=2)
    assert src.info.n_p == 4 and src.info.expected_frames == 8
    got = collect(src)
    fields = src.info.positions
    assert [(m["t"], m["p"]) for _, m in got] == [(t, p) for t in range(2) for p in range(4)]
    for _, m in got:  # stage x/y in the per-frame metadata are where the plan sent it
        f = fields[m["p"]]
        assert m["stage_x_um"] == pytest.approx(f.x_um)
        assert m["stage_y_um"] == pytest.approx(f.y_um)
    cam = src.microscope.camera
    for data, meta in got:  # every frame is the truth of its own field plus camera noise
        truth = src.ground_truth(meta)
        photons = (truth - cam.offset_adu) / cam.gain_adu_per_e
        sigma = cam.gain_adu_per_e * np.sqrt(photons + cam.read_noise_e**2)
        z = (data - truth) / sigma
        assert abs(float(z.mean())) < 0.1 and 0.85 < float(z.var()) < 1.15
    # the fields differ: no field's truth explains another field's frame
    t0 = [src.ground_truth(m) for _, m in got[:4]]
    for i in range(4):
        for j in range(4):
            if i != j:
                assert not np.allclose(t0[i], t0[j], rtol=0.01)


@pytest.mark.parametrize("engine", ["mmcore:demo", "pycromanager:demo"])
def test_micro_managers_engines_visit_every_position_in_order(engine: str) -> None:
    plan = AcquisitionPlan.model_validate(
        {
            "time_points": 2,
            "channels": "DAPI:5",
            "positions": [
                {"name": "a", "x_um": 100.0, "y_um": 50.0},
                {"name": "b", "x_um": -200.0, "y_um": 300.0, "grid": {"rows": 1, "columns": 2}},
            ],
        }
    )
    src = make_source(engine, plan=plan)
    assert src.info.position_names == ("a", "b_0000", "b_0001")
    got = collect(src)
    assert [(m["t"], m["p"]) for _, m in got] == [(t, p) for t in range(2) for p in range(3)]
    for _, m in got:
        f = src.info.positions[m["p"]]
        assert m["stage_x_um"] == pytest.approx(f.x_um, abs=0.1)
        assert m["stage_y_um"] == pytest.approx(f.y_um, abs=0.1)


def test_fields_outside_the_stage_travel_are_named_with_the_axis_and_range() -> None:
    travel = StageTravel(x=(0.0, 1000.0), y=(0.0, 500.0), z=(-10.0, 10.0))
    fields = [
        Position("in", 10.0, 10.0, 0.0),
        Position("far-x", 1500.0, 10.0, 0.0),
        Position("deep", 10.0, 10.0, 9.0),  # its stack reaches 11 µm
        Position("stays", None, None, None),  # x/y stay where the stage is: not checked
    ]
    bad = outside_travel(fields, travel, z_offsets=(-2.0, 0.0, 2.0), z_now_um=-9.0)
    assert bad == [
        "far-x: x 1500 µm (range 0…1000)",
        "deep: z 11 µm (range -10…10)",
        "stays: z -11 µm (range -10…10)",  # its stack is around the focus at -9
    ]
    assert outside_travel(fields, StageTravel()) == []  # nothing known: nothing refused


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"positions": [{"name": "ok", "x_um": 0}, {"name": "far", "x_um": 200_000}]},
         "1 of the plan's 2 field\\(s\\) lie outside the stage's travel: far: x 200000 µm"),
        ({"positions": [{"name": "top", "z_um": 4999}], "z_planes": 3, "z_step_um": 2},
         "top: z 5001 µm \\(range -5000…5000\\)"),
        ({"grid": {"rows": 2, "columns": 1}, "positions": [{"name": "edge", "y_um": -89_999}]},
         "1 of the plan's 2 .*: edge_000[01]: y -90"),  # the grid's lower row
    ],
)
def test_a_plan_beyond_the_simulated_stage_is_refused_before_it_starts(
    plan: dict[str, Any], message: str
) -> None:
    # the simulator's stages report their travel through the core, as a real core would
    with pytest.raises(SourceError, match=message):
        SimulatedSource((64, 64), AcquisitionPlan.model_validate({"time_points": 1, **plan}))
    with pytest.raises(SourceError, match="outside the stage's travel"):
        make_source("pycromanager:sim", shape=(64, 64),
                    plan=AcquisitionPlan.model_validate({"time_points": 1, **plan}))


def test_a_whole_plate_fits_the_simulated_stage() -> None:
    plan = AcquisitionPlan.model_validate(
        {"time_points": 1, "plate": {"plate": "384-well", "wells": "A1,P24"}}
    )
    src = SimulatedSource((32, 32), plan)
    assert len(collect(src)) == 2


def test_the_focus_range_of_a_micro_manager_z_adapter_is_its_position_limits() -> None:
    """Micro-Manager Z adapters declare their range as limits of the ``Position`` property."""
    from pymmcore_plus.experimental.unicore import StageDevice, UniMMCore

    from scopestream.acquisition.sim_devices import SnakeCaseCore

    class Piezo(StageDevice):
        def __init__(self) -> None:
            super().__init__()
            self._z = 50.0
            self.register_property(
                "Position", default_value=50.0, limits=(0.0, 100.0),
                getter=lambda d: d._z, setter=lambda d, v: d.set_position_um(v),
            )

        def set_position_um(self, val: float) -> None:
            self._z = float(val)

        def get_position_um(self) -> float:
            return self._z

        def home(self) -> None:
            self._z = 0.0

        def stop(self) -> None:
            pass

        def set_origin(self) -> None:
            self._z = 0.0

    core = UniMMCore()
    try:
        core.loadSystemConfiguration()  # the DemoCamera (its Z stage unloaded below)
        core.loadPyDevice("Piezo", Piezo())
        core.initializeDevice("Piezo")
        core.setFocusDevice("Piezo")
        assert stage_travel(core) == StageTravel(z=(0.0, 100.0))
        assert stage_travel(SnakeCaseCore(core)) == StageTravel(z=(0.0, 100.0))  # pycromanager
        deep = AcquisitionPlan.model_validate(
            {"time_points": 1, "z_planes": 11, "z_step_um": 12}  # 50 ± 60 µm
        )
        with pytest.raises(SourceError, match=r"the current position: z -10 µm .*z 110 µm"):
            MMCoreSource(core, deep)
        MMCoreSource(core, deep.model_copy(update={"z_step_um": 4.0}))  # 50 ± 20: fine
    finally:
        core.unloadAllDevices()


def test_a_triggered_stage_runs_the_fields_as_one_burst_with_the_same_frames() -> None:
    """pymmcore-plus sequences a triggered XY stage: each frame must still show its field."""
    plan = AcquisitionPlan.model_validate(
        {"time_points": 3, "interval_s": 0,
         "positions": [{"name": f"f{i}", "x_um": 700.0 * i, "y_um": -300.0 * i}
                       for i in range(4)]}
    )  # fmt: skip
    runs = {}
    for max_len in (0, 10_000):
        src = SimulatedSource((48, 48), plan, seed=3, xy_sequence_max=max_len)
        events: list[Any] = []
        src.core.mda.events.eventStarted.connect(events.append)
        runs[max_len] = (collect(src), events)
    (moved, moved_events), (burst, burst_events) = runs[0], runs[10_000]
    assert len(moved) == len(burst) == 12
    assert len(moved_events) == 12 and len(burst_events) == 1  # one hardware sequence
    for (a, ma), (b, mb) in zip(moved, burst, strict=True):
        assert (ma["t"], ma["p"]) == (mb["t"], mb["p"])
        assert (mb["stage_x_um"], mb["stage_y_um"]) == (700.0 * mb["p"], -300.0 * mb["p"])
        assert (ma["stage_x_um"], ma["stage_y_um"]) == (mb["stage_x_um"], mb["stage_y_um"])
        assert np.array_equal(a, b)  # the triggered stage was where the frame says
    assert not np.array_equal(burst[0][0], burst[1][0])  # and the fields differ
