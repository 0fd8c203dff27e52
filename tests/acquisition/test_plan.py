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
