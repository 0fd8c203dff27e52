from __future__ import annotations

import pytest
import useq

from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec, PlanError
from scopestream.config import ConfigError, RunConfig, build_plan, validate_config

PLAN = AcquisitionPlan(
    time_points=2,
    interval_s=1.5,
    z_offsets_um=AcquisitionPlan.z_range(3, 0.5),
    channels=(ChannelSpec("brightfield", 5), ChannelSpec("nuclei", 20)),
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
        channels=(
            ChannelSpec("nuclei_low", 2, "nuclei"),
            ChannelSpec("nuclei_high", 50, "nuclei"),
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
    multi = useq.MDASequence(stage_positions=[(0, 0, 0), (10, 10, 0)])
    with pytest.raises(PlanError, match="several stage positions"):
        AcquisitionPlan.from_mda_sequence(multi)
    with pytest.raises(PlanError, match="unique"):
        AcquisitionPlan(channels=(ChannelSpec("a"), ChannelSpec("a")))
    with pytest.raises(PlanError, match="exposure must be positive"):
        AcquisitionPlan(channels=(ChannelSpec("a", 0),))


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
        ({"stage_positions": [(100.0, 200.0, 5.0)]}, r"stage position coordinates \(x=100"),
        ({"stage_positions": [{"z": 5.0}]}, r"coordinates \(z=5\)"),
        ({"stage_positions": [{"sequence": {"z_plan": Z3}}]}, "its own sequence"),
        ({"grid_plan": {"rows": 1, "columns": 1}}, "grid_plan"),
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
