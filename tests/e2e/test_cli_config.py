"""`scopestream run --config FILE` with flags on top, and config files it must refuse."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult

PLAN_FILE = """\
source: sim
seed: 2
plan:
  time_points: 2
  interval_s: 0
  z_planes: 1
  channels: [brightfield:5, nuclei_low=nuclei:2, nuclei_high=nuclei:40]
  pairs:
    denoise: {input: nuclei_low, target: nuclei_high}
    stain: {input: brightfield, targets: [nuclei_high]}
"""


def test_a_plan_flag_overrides_one_field_of_the_file_plan(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(PLAN_FILE)
    out = tmp_path / "run.ome.zarr"
    r = cli(
        "run",
        "--config",
        str(cfg_file),
        "--z-planes",
        "3",
        "--source",
        "sim",
        "--shape",
        "64x64",
        "--frames",
        "18",  # 2 time points × 3 channels × 3 planes
        "--model",
        "none",
        "--out",
        str(out),
        "--json",
    )
    assert r.code == 0, r.stderr
    assert r.json["frames_written"] == 18
    saved = json.loads((out / "zarr.json").read_text())["attributes"]["scopestream"]["config"]
    plan = saved["plan"]
    assert plan["z_planes"] == 3  # the flag
    assert [c["name"] for c in plan["channels"]] == ["brightfield", "nuclei_low", "nuclei_high"]
    assert [c["exposure_ms"] for c in plan["channels"]] == [5, 2, 40]
    assert plan["pairs"] == {
        "denoise": {"input": "nuclei_low", "target": "nuclei_high"},
        "stain": {"input": "brightfield", "targets": ["nuclei_high"]},
    }
    assert plan["time_points"] == 2
    assert saved["seed"] == 2
    assert saved["shape"] == [64, 64]
    # the recording has the file's channels and the flag's planes
    arr = json.loads((out / "0" / "0" / "zarr.json").read_text())  # the raw image's array
    assert arr["shape"] == [2, 3, 3, 64, 64]


BOMB = (
    "plan:\n  channels: [low:2, high:50]\n  pairs:\n    denoise:\n"
    "      input: low\n      target: high\n      _anchors:\n"
    '        a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"        a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 6))
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe\x00\x01\x02", "UTF-16"),
        (b"frames: 3\nout: \xe9t\xe9\n", "not UTF-8"),
        (b"shape: 0x512\n", "shape must be positive, got 0x512"),
        (BOMB.encode(), "aliases"),
        (b"fps: .inf\n", "fps: Input should be a finite number"),
        (b"plan:\n  channels: [nuclei:inf]\n", "finite"),
        (b"shape: 100000x100000\n", "would need 18.6 GiB"),
        (b"plan:\n  z_planes: 100000000\n", "z_planes: Input should be less than or equal"),
        (b"frames: 100000000000\n", "frames: Input should be less than or equal"),
        (
            b"shape: 64x64\nplan:\n  time_points: 1\n  positions: [{name: far, x_um: 5.0e5}]\n",
            "lie outside the stage's travel: far: x 500000 µm (range -130000",
        ),
    ],
    ids=[
        "utf16",
        "latin1",
        "hex-shape",
        "alias-bomb",
        "inf-fps",
        "inf-exposure",
        "huge-shape",
        "huge-z",
        "huge-frames",
        "beyond-stage",
    ],
)
def test_bad_config_files_exit_2_with_a_message_and_write_nothing(
    cli: Callable[..., CliResult], tmp_path: Path, data: bytes, message: str
) -> None:
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_bytes(data)
    out = tmp_path / "x.ome.zarr"
    r = cli("run", "--config", str(cfg_file), "--model", "none", "--out", str(out), timeout=60)
    assert r.code == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
