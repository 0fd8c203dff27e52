"""What the engines say of each frame becomes its `FrameMeta`; unknown channels are refused."""

from __future__ import annotations

import math

import pytest
import useq

from scopestream.acquisition.base import SourceError
from scopestream.acquisition.mmcore import frame_meta_from_mda
from scopestream.acquisition.pycromanager_source import frame_meta_from_pycromanager


def test_pymmcore_plus_frame_metadata_is_kept() -> None:
    event = useq.MDAEvent(
        index={"t": 3, "c": 1, "z": 2}, channel={"config": "FITC"}, exposure=7.5,
        x_pos=10.0, y_pos=-2.5, z_pos=4.0,
    )  # fmt: skip
    meta = {
        "runner_time_ms": 123.5,
        "position": {"x": 10.1, "y": -2.4, "z": 3.9},
        "camera_metadata": {"ImageNumber": "17"},
    }
    m = frame_meta_from_mda(event, meta, ["DAPI", "FITC"], source="mmcore")
    assert (m["t"], m["c"], m["z"]) == (3, 1, 2)
    assert m["exposure_ms"] == 7.5
    assert (m["stage_x_um"], m["stage_y_um"]) == (10.1, -2.4)  # what the stage read back
    assert m["stage_z_um"] == 4.0  # the event's (the focus the plan asked for)
    assert m["engine_time_ms"] == 123.5
    assert m["image_number"] == 17


def test_an_unknown_channel_is_refused_by_name_never_written_as_channel_0() -> None:
    event = useq.MDAEvent(index={"t": 0, "c": 2}, channel={"config": "Cy5"})
    with pytest.raises(SourceError, match=r"channel 'Cy5' \(index 2\).*\['DAPI', 'FITC'\]"):
        frame_meta_from_mda(event, {}, ["DAPI", "FITC"], source="mmcore")
    with pytest.raises(SourceError, match=r"channel 'Cy5' arrived.*\['DAPI', 'FITC'\]"):
        frame_meta_from_pycromanager(
            {"Axes": {"time": 0, "channel": "Cy5"}}, ["DAPI", "FITC"], source="pycromanager"
        )


def test_pycromanager_frame_metadata_is_kept() -> None:
    md = {
        "Axes": {"time": 2, "channel": "FITC", "z": 1},
        "Exposure": 12.0,
        "XPosition_um_Intended": 1.5,
        "YPositionUm": 2.5,
        "ZPosition_um_Intended": -0.5,
        "ElapsedTime-ms": 99.0,
        "ImageNumber": 5,
    }
    m = frame_meta_from_pycromanager(md, ["DAPI", "FITC"], source="pycromanager")
    assert (m["t"], m["c"], m["z"], m["p"]) == (2, 1, 1, 0)
    assert (m["stage_x_um"], m["stage_y_um"], m["stage_z_um"]) == (1.5, 2.5, -0.5)
    assert m["exposure_ms"] == 12.0 and m["engine_time_ms"] == 99.0 and m["image_number"] == 5
    bare = frame_meta_from_pycromanager({"Axes": {"time": 0}}, ["raw"], source="pm")
    assert bare["stage_x_um"] is None and bare["image_number"] == -1
    nan = frame_meta_from_pycromanager(
        {"Axes": {}, "Exposure": "nan", "ZPositionUm": float("inf")}, ["raw"], source="pm"
    )
    assert nan["exposure_ms"] == 0.0 and nan["stage_z_um"] is None
    assert not math.isnan(nan["exposure_ms"])
