from __future__ import annotations

import pytest
import useq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec, PlanError
from scopestream.config import ConfigError, RunConfig, build_plan, validate_config

PLAN = AcquisitionPlan(
    time_points=2,
    interval_s=1.5,
    z_offsets_um=AcquisitionPlan.z_range(3, 0.5),
    channels=(
        ChannelSpec(name="brightfield", exposure_ms=5),
        ChannelSpec(name="nuclei", exposure_ms=20),
    ),
)


def test_z_range_is_centred_on_focus() -> None:
    assert AcquisitionPlan.z_range(3, 0.5) == (-0.5, 0.0, 0.5)
    assert AcquisitionPlan.z_range(4, 1.0) == (-1.5, -0.5, 0.5, 1.5)


def test_mda_sequence_and_pycromanager_events_acquire_the_same_frames_in_order() -> None:
    seq = PLAN.to_mda_sequence()
    mda = [
        (e.index.get("t", 0), e.index.get("c", 0), e.index.get("z", 0), e.exposure, e.z_pos)
        for e in seq
    ]
    names = PLAN.channel_names
    pm = [
        (
            e["axes"]["time"],
            names.index(e["axes"]["channel"]),
            e["axes"]["z"],
            e["exposure"],
            e["z"],
        )
        for e in PLAN.to_pycromanager_events()
    ]
    assert mda == pm
    assert len(mda) == PLAN.n_frames == 12
    assert [e.min_start_time for e in seq][::6] == [0.0, 1.5]
    assert [e["min_start_time"] for e in PLAN.to_pycromanager_events()][::6] == [0.0, 1.5]


def test_stream_info_follows_the_plan() -> None:
    info = PLAN.stream_info((64, 80), "uint16", 0.325)
    assert (info.n_t, info.n_c, info.n_z) == (2, 2, 3)
    assert info.channel_names == ("brightfield", "nuclei")
    assert info.z_step_um == 0.5
    assert info.interval_s == 1.5


def test_paired_channels_share_a_preset_with_different_exposures() -> None:
    plan = AcquisitionPlan(
        time_points=1,  # the one plan type's default is None: "as many as frames need"
        channels=(
            ChannelSpec(name="nuclei_low", exposure_ms=2, config="nuclei"),
            ChannelSpec(name="nuclei_high", exposure_ms=50, config="nuclei"),
        ),
        pairs={"denoise": {"input": "nuclei_low", "target": "nuclei_high"}},
    )
    events = list(plan.to_mda_sequence())
    assert [(e.channel.config, e.exposure) for e in events] == [("nuclei", 2.0), ("nuclei", 50.0)]
    js = plan.to_json()
    assert js["pairs"]["denoise"]["target"] == "nuclei_high"
    assert [c["exposure_ms"] for c in js["channels"]] == [2, 50]


def test_from_useq_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seq = useq.MDASequence(
        time_plan={"interval": 2, "loops": 3},
        z_plan={"range": 2, "step": 1},
        channels=[{"config": "DAPI", "exposure": 10}, {"config": "FITC", "exposure": 30}],
        axis_order="tpcz",
    )
    path = tmp_path / "seq.yaml"
    path.write_text(seq.yaml())
    plan = build_plan(RunConfig(mda=str(path)))
    assert plan.time_points == 3
    assert plan.interval_s == 2
    assert plan.z_offsets_um == (-1.0, 0.0, 1.0)
    assert plan.channel_names == ("DAPI", "FITC")
    assert [c.exposure_ms for c in plan.channels] == [10, 30]


def test_unsupported_plans_are_refused_with_a_reason() -> None:
    # several positions are a plan's fields (tests/acquisition/test_positions.py); a
    # sequence that visits positions in another order than t, p, c, z is not
    multi = useq.MDASequence(
        stage_positions=[(0, 0, 0), (10, 10, 0)], time_plan=T3, axis_order="ptcz"
    )
    with pytest.raises(PlanError, match="t, p, c, z order"):
        AcquisitionPlan.from_mda_sequence(multi)
    # the plan is a pydantic model: what it refuses on construction is a ValidationError
    with pytest.raises(ValidationError, match="unique"):
        AcquisitionPlan(channels=(ChannelSpec(name="a"), ChannelSpec(name="a")))
    with pytest.raises(ValidationError, match="exposure_ms\n  Input should be greater than 0"):
        AcquisitionPlan(channels=(ChannelSpec(name="a", exposure_ms=0),))


def test_frames_cap_the_plan() -> None:
    assert PLAN.limited_to(7).time_points == 2
    assert PLAN.limited_to(5).time_points == 1
    cfg = RunConfig(frames=50, plan={"channels": "brightfield:5,nuclei:20", "z_planes": 5})
    plan = build_plan(cfg)
    assert plan.time_points == 5  # 5 × (2 channels × 5 planes) ≥ 50
    assert [(c.name, c.exposure_ms) for c in plan.channels] == [("brightfield", 5), ("nuclei", 20)]


def test_plan_config_checks_pairs_and_typos() -> None:
    with pytest.raises(ConfigError, match="does not have"):
        validate_config(
            {"plan": {"channels": ["a"], "pairs": {"denoise": {"input": "a", "target": "b"}}}}
        )
    with pytest.raises(ConfigError, match="z_plane: unknown setting"):
        validate_config({"plan": {"z_plane": 3}})


# -- useq features the plan holds, and those it refuses ---------------------------
def test_the_same_preset_twice_without_exposures_gets_unique_names() -> None:
    seq = useq.MDASequence(channels=[{"config": "DAPI"}, {"config": "DAPI"}, "FITC"])
    plan = AcquisitionPlan.from_mda_sequence(seq)
    assert plan.channel_names == ("DAPI@10ms#1", "DAPI@10ms#2", "FITC")
    assert [c.preset for c in plan.channels] == ["DAPI", "DAPI", "FITC"]
    assert [c.exposure_ms for c in plan.channels] == [10.0, 10.0, 10.0]


def test_a_pair_with_one_exposure_left_out_keeps_both_channels() -> None:
    seq = useq.MDASequence(channels=[{"config": "DAPI"}, {"config": "DAPI", "exposure": 50}])
    plan = AcquisitionPlan.from_mda_sequence(seq)
    assert plan.channel_names == ("DAPI@10ms", "DAPI@50ms")


def test_per_channel_settings_without_effect_on_this_plan_are_accepted() -> None:
    seq = useq.MDASequence(
        channels=[{"config": "DAPI", "do_stack": False, "acquire_every": 3}],
        stage_positions=[{"name": "here"}],
    )
    plan = AcquisitionPlan.from_mda_sequence(seq)  # one plane, one time point: no effect
    assert plan.channel_names == ("DAPI",)
    assert plan.n_frames == 1


Z3 = {"range": 2, "step": 1}
T3 = {"interval": 1, "loops": 3}


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [
        ({"z_plan": Z3, "channels": [{"config": "A", "do_stack": False}, "B"]}, "do_stack"),
        (
            {"time_plan": T3, "channels": ["A", {"config": "B", "acquire_every": 2}]},
            "acquire_every",
        ),
        ({"channels": [{"config": "A", "z_offset": 1.5}]}, "z_offset 1.5"),
        ({"channels": [{"config": "A", "camera": "Cam2"}]}, "camera"),
        ({"channels": [{"config": "A", "group": "G1"}, {"config": "B"}]}, "different groups"),
        (
            {"autofocus_plan": {"autofocus_device_name": "Z", "axes": ("t",)}, "time_plan": T3},
            "autofocus_plan",
        ),
        ({"keep_shutter_open_across": ("z",), "z_plan": Z3}, "keep_shutter_open_across"),
        ({"stage_positions": [{"sequence": {"z_plan": Z3}}]}, "only a grid_plan per position"),
        ({"stage_positions": [{"x": 1.0, "properties": [("Dev", "Prop", "1")]}]}, "properties"),
        ({"grid_plan": {"top": 0, "left": 0, "bottom": 5, "right": 5}}, "GridFromEdges"),
        (
            {"time_plan": {"phases": [{"interval": 1, "loops": 2}, {"interval": 5, "loops": 2}]}},
            "multi-phase",
        ),
    ],
)
def test_useq_features_the_recorder_cannot_reproduce_are_refused_by_name(
    kwargs: dict[str, object], feature: str
) -> None:
    with pytest.raises(PlanError, match=feature):
        AcquisitionPlan.from_mda_sequence(useq.MDASequence(**kwargs))


def test_a_useq_file_with_a_refused_feature_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seq = useq.MDASequence(
        z_plan={"range": 2, "step": 1},
        channels=[{"config": "DAPI", "do_stack": False}, {"config": "FITC"}],
    )
    path = tmp_path / "seq.yaml"
    path.write_text(seq.yaml())
    with pytest.raises(ConfigError, match="invalid plan: channel 'DAPI': do_stack"):
        build_plan(RunConfig(mda=str(path)))


def test_duration_over_one_loop_has_no_interval() -> None:
    seq = useq.MDASequence(time_plan={"duration": 10, "loops": 1})
    plan = AcquisitionPlan.from_mda_sequence(seq)
    assert (plan.time_points, plan.interval_s) == (1, 0.0)


# -- one plan type: what a config writes is what the sources run ------------------
def test_the_config_plan_is_the_acquisition_plan() -> None:
    cfg = validate_config({"plan": {"channels": "low=nuclei:2,high=nuclei:50ms", "z_planes": 3}})
    assert isinstance(cfg.plan, AcquisitionPlan)
    assert [(c.name, c.preset, c.exposure_ms) for c in cfg.plan.channels] == [
        ("low", "nuclei", 2.0),
        ("high", "nuclei", 50.0),
    ]
    assert ChannelSpec.model_validate("brightfield:5") == ChannelSpec(
        name="brightfield", exposure_ms=5
    )
    assert cfg.plan.z_offsets == AcquisitionPlan.z_range(3, 1.0)
    assert build_plan(cfg).channels == cfg.plan.channels


def test_explicit_z_offsets_count_the_planes_and_must_agree_with_them() -> None:
    plan = AcquisitionPlan(time_points=1, z_offsets_um=(-2.0, 0.0, 0.5, 1.0))
    assert plan.z_planes == 4
    assert plan.z_offsets == (-2.0, 0.0, 0.5, 1.0)  # uneven, as an MDASequence may hold
    assert [e.z_pos for e in plan.to_mda_sequence()] == [-2.0, 0.0, 0.5, 1.0]
    assert [e["z"] for e in plan.to_pycromanager_events(10.0)] == [8.0, 10.0, 10.5, 11.0]
    assert plan.to_json()["z_offsets_um"] == [-2.0, 0.0, 0.5, 1.0]
    assert AcquisitionPlan(z_planes=2, z_offsets_um=(0.0, 1.0)).z_planes == 2
    with pytest.raises(ValidationError, match="z_planes 3 does not match the 2 z_offsets_um"):
        AcquisitionPlan(z_planes=3, z_offsets_um=(0.0, 1.0))
    with pytest.raises(ValidationError, match="finite"):
        AcquisitionPlan(z_offsets_um=(0.0, float("nan")))


def test_resolving_fills_what_the_config_left_open() -> None:
    two = AcquisitionPlan(channels="a:1,b:2", z_planes=3)  # 6 frames per time point
    assert two.resolved().time_points == 100
    assert two.resolved(frames=50).time_points == 9
    assert two.resolved(fps=4).interval_s == 0.25
    fixed = two.model_copy(update={"time_points": 4, "interval_s": 2.0})
    assert (fixed.resolved(frames=7, fps=4).time_points, fixed.resolved(fps=4).interval_s) == (
        2,
        2.0,
    )
    assert fixed.resolved(frames=1000).time_points == 4  # frames stop a plan, never extend it
    assert two.resolved(frames=10**8).time_points == -(-(10**8) // 6)  # frames bound these


def test_an_open_plan_streams_open_ended_and_cannot_be_run_before_it_is_resolved() -> None:
    plan = AcquisitionPlan(channels="nuclei:5")
    assert plan.stream_info((8, 8), "uint16", 1.0).n_t is None
    assert plan.to_json()["time_points"] is None
    for run in (lambda: plan.n_frames, plan.to_mda_sequence, plan.to_pycromanager_events):
        with pytest.raises(PlanError, match="resolve"):
            run()


def test_the_json_saved_with_a_run_keeps_its_form() -> None:
    js = PLAN.to_json()
    assert list(js) == [
        "time_points",
        "interval_s",
        "z_offsets_um",
        "channels",
        "channel_group",
        "pairs",
    ]
    assert js["channels"][0] == {"name": "brightfield", "config": "brightfield", "exposure_ms": 5}
    assert js["z_offsets_um"] == [-0.5, 0.0, 0.5]


def test_a_sequence_refused_as_a_plan_says_why_in_a_plan_error() -> None:
    with pytest.raises(PlanError, match="name"):  # a preset the plan cannot name a channel by
        AcquisitionPlan.from_mda_sequence(useq.MDASequence(channels=[{"config": ""}]))


# -- round trips: config → plan → MDASequence → plan, and MDASequence → plan → MDASequence
def _frames(seq: useq.MDASequence) -> list[tuple[object, ...]]:
    """What each event acquires, in order (a missing start time is "now", as useq runs it)."""
    return [
        (
            e.index.get("t", 0),
            e.index.get("c", 0),
            e.index.get("z", 0),
            e.channel.config if e.channel else None,
            e.channel.group if e.channel else None,
            e.exposure,
            e.z_pos,
            e.min_start_time or 0.0,
        )
        for e in seq
    ]


_exposures = st.sampled_from([1.0, 2.5, 5.0, 10.0, 50.0, 0.125])
_intervals = st.sampled_from([0.0, 0.5, 1.5, 2.0]) | st.floats(0.001, 100.0)
_channels = st.lists(
    st.tuples(st.sampled_from(["DAPI", "FITC", "nuclei"]), _exposures), max_size=4
).map(
    lambda cs: [
        {"name": f"c{i}", "config": preset, "exposure_ms": exp}
        for i, (preset, exp) in enumerate(cs)
    ]
)
_z = st.one_of(
    st.fixed_dictionaries(
        {"z_planes": st.integers(1, 5), "z_step_um": st.sampled_from([0.1, 0.5, 1.0, 2.5])}
    ),
    st.lists(st.floats(-50, 50).map(lambda z: round(z, 3)), min_size=1, max_size=5).map(
        lambda zs: {"z_offsets_um": zs}
    ),
)
config_plans = st.builds(
    lambda t, interval, channels, z, frames, fps: build_plan(
        validate_config(
            {
                "frames": frames,
                "fps": fps,
                "plan": {"time_points": t, "interval_s": interval, "channels": channels, **z},
            }
        )
    ),
    st.none() | st.integers(1, 4),
    _intervals,
    _channels,
    _z,
    st.none() | st.integers(1, 40),
    st.none() | st.sampled_from([0.0, 3.0, 30.0]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=config_plans)
def test_a_plan_round_trips_through_its_mda_sequence(plan: AcquisitionPlan) -> None:
    seq = plan.to_mda_sequence()
    again = AcquisitionPlan.from_mda_sequence(seq)
    assert _frames(again.to_mda_sequence()) == _frames(seq)
    assert again.n_frames == plan.n_frames == len(_frames(seq))
    assert again.z_offsets == plan.z_offsets
    assert [(c.preset, c.exposure_ms) for c in again.channels] == [
        (c.preset, c.exposure_ms) for c in plan.channels
    ]
    assert again.interval_s == pytest.approx(plan.interval_s, abs=1e-6)  # useq keeps µs
    # the pycromanager events acquire what the sequence does
    names = plan.channel_names
    pm = [
        (e["axes"]["time"], names.index(e["axes"]["channel"]) if plan.channels else 0)
        for e in plan.to_pycromanager_events()
    ]
    assert pm == [(f[0], f[1]) for f in _frames(seq)]


mda_sequences = st.builds(
    lambda time_plan, z_plan, channels: useq.MDASequence(
        axis_order="tpcz",
        **({"time_plan": time_plan} if time_plan else {}),
        **({"z_plan": z_plan} if z_plan else {}),
        channels=channels,
    ),
    st.none()
    | st.fixed_dictionaries({"interval": _intervals, "loops": st.integers(1, 4)})
    | st.fixed_dictionaries({"duration": st.floats(1, 60), "loops": st.integers(2, 4)}),
    st.none()
    | st.fixed_dictionaries(
        {"range": st.sampled_from([1.0, 2.0, 4.5]), "step": st.sampled_from([0.5, 1.0])}
    )
    | st.lists(st.floats(-20, 20).map(lambda z: round(z, 3)), min_size=2, max_size=4).map(
        lambda zs: {"relative": zs}
    ),
    st.lists(
        st.fixed_dictionaries(
            {"config": st.sampled_from(["DAPI", "FITC"]), "exposure": _exposures}
        ),
        max_size=3,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=mda_sequences)
def test_an_mda_sequence_read_as_a_plan_acquires_the_same_frames(seq: useq.MDASequence) -> None:
    # a sequence of no axes lists no events; as a plan it is one frame of the camera
    assume(seq.time_plan or seq.z_plan or seq.channels)
    plan = AcquisitionPlan.from_mda_sequence(seq)
    assert _frames(plan.to_mda_sequence()) == _frames(seq)
    assert plan.n_frames == len(_frames(seq))
    # and the plan is a valid config plan as it stands
    assert AcquisitionPlan.model_validate(plan.model_dump(mode="json")) == plan
