"""The run configuration: flags merged over the file, and bad input refused clearly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import useq

from scopestream.config import (
    MAX_CHANNELS,
    MAX_FRAME_SIDE,
    MAX_FRAMES,
    MAX_TIME_POINTS,
    MAX_Z_PLANES,
    ConfigError,
    RunConfig,
    build_plan,
    dump_config,
    load_config,
    merge,
    parse_shape,
    validate_config,
)

if TYPE_CHECKING:
    from pathlib import Path

FILE_PLAN = {
    "time_points": 4,
    "interval_s": 2.0,
    "channels": ["brightfield:5", "nuclei:20"],
    "pairs": {"stain": {"input": "brightfield", "targets": ["nuclei"]}},
}


def _load(tmp_path: Path, text: str | bytes) -> RunConfig:
    path = tmp_path / "run.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return load_config(path)


# -- flags over the file ------------------------------------------------------------
def test_a_plan_flag_changes_one_field_and_keeps_the_rest_of_the_file_plan() -> None:
    base = validate_config({"shape": "64x96", "plan": FILE_PLAN})
    cfg = merge(base, {"plan": {"z_planes": 5}, "frames": None, "seed": 3})
    assert cfg.plan.z_planes == 5
    assert [c.name for c in cfg.plan.channels] == ["brightfield", "nuclei"]
    assert cfg.plan.pairs == FILE_PLAN["pairs"]
    assert cfg.plan.time_points == 4
    assert cfg.plan.interval_s == 2.0
    assert (cfg.shape, cfg.seed, cfg.frames) == ((64, 96), 3, None)


def test_flags_replace_sequences_whole_and_none_leaves_a_field_alone() -> None:
    base = validate_config({"models": ["a", "b"], "plan": {"channels": "x:1,y:2", "z_planes": 3}})
    cfg = merge(base, {"models": ["c"], "plan": {"channels": "z:4", "time_points": None}})
    assert cfg.models == ("c",)
    assert [(c.name, c.exposure_ms) for c in cfg.plan.channels] == [("z", 4.0)]
    assert cfg.plan.z_planes == 3
    assert cfg.plan.time_points is None


def test_z_flags_replace_the_explicit_z_offsets_of_the_file() -> None:
    base = validate_config({"plan": {**FILE_PLAN, "z_offsets_um": [-1.0, 0.0, 2.5]}})
    assert (base.plan.z_planes, base.plan.z_offsets) == (3, (-1.0, 0.0, 2.5))
    cfg = merge(base, {"plan": {"z_planes": 5}})
    assert (cfg.plan.z_planes, cfg.plan.z_offsets_um) == (5, None)
    assert cfg.plan.z_offsets == (-2.0, -1.0, 0.0, 1.0, 2.0)
    cfg = merge(base, {"plan": {"z_step_um": 0.5}})
    assert cfg.plan.z_offsets == (-0.5, 0.0, 0.5)  # the file's 3 planes, the flag's step
    assert cfg.plan.channels == base.plan.channels
    # and explicit offsets over a file's planes × step count their own planes
    cfg = merge(validate_config({"plan": {"z_planes": 7}}), {"plan": {"z_offsets_um": [0, 1]}})
    assert (cfg.plan.z_planes, cfg.plan.z_offsets) == (2, (0.0, 1.0))
    # a flag that leaves z alone keeps the offsets
    assert merge(base, {"plan": {"time_points": 2}}).plan.z_offsets == (-1.0, 0.0, 2.5)


def test_explicit_z_offsets_round_trip_through_the_saved_config(tmp_path: Path) -> None:
    cfg = validate_config({"plan": {"z_offsets_um": [-1.0, 0.0, 2.5], "channels": "a:3"}})
    assert _load(tmp_path, dump_config(cfg)) == cfg
    # a plan without them saves the form it always had
    assert "z_offsets_um" not in dump_config(validate_config({"plan": {"z_planes": 3}}))


def test_flags_that_break_the_file_plan_are_an_error() -> None:
    base = validate_config({"plan": FILE_PLAN})
    with pytest.raises(ConfigError, match="does not have"):
        merge(base, {"plan": {"channels": "other:5"}})


# -- files that are not YAML we can use --------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe\x00frames: 3\n", "UTF-16"),
        (b"source: sim\nframes: 3\nout: caf\xe9.ome.zarr\n", "not UTF-8"),
    ],
)
def test_a_file_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, data: bytes, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, data)


def test_utf8_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    assert _load(tmp_path, "\ufeffframes: 3\n".encode()).frames == 3


@pytest.mark.parametrize("text", ["shape: 0x512\n", "shape: 0x200\n", "shape: 0o1000\n"])
def test_unquoted_hex_or_octal_shape_is_not_read_as_a_number(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="shape"):
        _load(tmp_path, text)


@pytest.mark.parametrize("text", ["frames: 0x10\n", "frames: 0b101\n", "frames: 1:30\n"])
def test_yaml11_integer_forms_are_not_silently_numbers(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="frames"):
        _load(tmp_path, text)


def test_plain_numbers_and_a_square_shape_still_load(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "shape: 512\nframes: 1e3\nfps: 2.5\noverwrite: true\nseed: -3\n")
    assert (cfg.shape, cfg.frames, cfg.fps, cfg.overwrite, cfg.seed) == (
        (512, 512),
        1000,
        2.5,
        True,
        -3,
    )
    # a channel named by digits is a name and exposure, not YAML 1.1's 405*60+20
    cfg = _load(tmp_path, "plan:\n  channels: [405:20]\n")
    assert [(c.name, c.exposure_ms) for c in cfg.plan.channels] == [("405", 20.0)]


def _alias_bomb(levels: int) -> str:
    rows = ['  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 10)
        rows.append(f"  a{i}: &a{i} [{refs}]")
    return (
        "plan:\n  channels: [low:2, high:50]\n  pairs:\n    denoise:\n"
        "      input: low\n      target: high\n      _anchors:\n"
        + "\n".join("    " + r for r in rows)
        + "\n"
    )


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    bomb = _alias_bomb(6)  # 10**6 "lol"s from a few hundred bytes
    assert len(bomb) < 600
    with pytest.raises(ConfigError, match="aliases"):
        _load(tmp_path, bomb)


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="refers to itself"):
        _load(tmp_path, "models: &m [*m]\n")


def test_small_aliases_are_fine(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "models: &m [a]\nplan:\n  channels: [x:1]\n")
    assert cfg.models == ("a",)


def test_pairs_hold_only_channel_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['_anchors'\]"):
        validate_config(
            {
                "plan": {
                    "channels": ["a", "b"],
                    "pairs": {"denoise": {"input": "a", "target": "b", "_anchors": [1]}},
                }
            }
        )
    with pytest.raises(ConfigError, match="targets must be a list"):
        validate_config({"plan": {"channels": ["a"], "pairs": {"s": {"targets": "a"}}}})


# -- numbers that are not finite, sizes no microscope reaches -----------------------
@pytest.mark.parametrize(
    "text",
    [
        "fps: .inf\n",
        "fps: .nan\n",
        "plan:\n  z_step_um: .inf\n",
        "plan:\n  interval_s: .inf\n",
        "plan:\n  channels: [nuclei:inf]\n",
        "plan:\n  channels: [{name: nuclei, exposure_ms: .inf}]\n",
        "plan:\n  z_step_um: .nan\n",
        "buffer_mb: .inf\n",
        "sim_time_step_s: .inf\n",
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, text)


def test_an_unallocatable_frame_is_refused_with_the_memory_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"18\.6 GiB"):
        validate_config({"shape": "100000x100000"})
    with pytest.raises(ValueError, match="at most 16384"):
        parse_shape((MAX_FRAME_SIDE + 1, 64))
    assert validate_config({"shape": MAX_FRAME_SIDE}).shape == (MAX_FRAME_SIDE,) * 2


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("frames", MAX_FRAMES),
        ("plan.z_planes", MAX_Z_PLANES),
        ("plan.time_points", MAX_TIME_POINTS),
    ],
)
def test_counts_have_upper_bounds(field: str, limit: int) -> None:
    def cfg(n: int) -> dict[str, object]:
        top, _, sub = field.partition(".")
        return {top: {sub: n}} if sub else {top: n}

    assert validate_config(cfg(limit))
    with pytest.raises(ConfigError, match=f"less than or equal to {limit}"):
        validate_config(cfg(limit + 1))


def test_frames_from_a_float_in_yaml_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="frames: Input should be less than or equal"):
        _load(tmp_path, "frames: 1e11\n")


def test_channels_are_bounded() -> None:
    names = [f"c{i}" for i in range(MAX_CHANNELS + 1)]
    assert validate_config({"plan": {"channels": names[:-1]}})
    with pytest.raises(ConfigError, match=r"plan\.channels"):
        validate_config({"plan": {"channels": names}})


def test_the_frames_of_the_whole_plan_are_bounded() -> None:
    huge = {"time_points": MAX_TIME_POINTS, "z_planes": 100}
    with pytest.raises(ConfigError, match="acquires 1,000,000,000 frames"):
        validate_config({"plan": huge})
    # a run stopped early records only its frames
    assert validate_config({"plan": huge, "frames": 10}).frames == 10


def test_a_huge_mda_sequence_is_refused_before_it_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "seq.yaml"
    path.write_text(useq.MDASequence(z_plan={"range": 1e6, "step": 1}).yaml())
    with pytest.raises(ConfigError, match="1,000,001 z-planes"):
        build_plan(RunConfig(mda=str(path)))
    path.write_text(useq.MDASequence(time_plan={"interval": 0, "loops": 10**9}).yaml())
    with pytest.raises(ConfigError, match="time points"):
        build_plan(RunConfig(mda=str(path)))
    # frames cap a long time series to what the run records
    assert build_plan(RunConfig(mda=str(path), frames=10)).time_points == 10
