"""Smoke test of ``scopestream bench long-run``: it runs and reports every field, finite.

Benchmarks are not tests (STYLE 12): nothing here asserts a rate or a memory
figure, only that the JSON is complete and well-formed and the temp dir is gone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import CliResult


def _numbers(obj: Any) -> Iterator[float]:
    """Every number in a JSON value (booleans excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def test_bench_long_run_reports_every_field(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    r = cli("bench", "long-run", "--frames", "2000", "--workdir", str(tmp_path), "--json")
    assert r.code == 0, r.stderr
    b = r.json
    assert b["benchmark"] == "long_run"
    assert b["frames"] == b["frames_written"] == 2000
    assert b["shape"] == [64, 64]
    assert set(b["fps"]) == {"pipeline", "tensorstore"}
    assert b["ratio_pipeline_vs_tensorstore"] is not None
    assert {
        "warmup_frames",
        "after_warmup",
        "end",
        "growth",
        "max_excursion",
        "peak",
        "samples",
        "series",
    } <= set(b["rss_mb"])
    assert b["rss_mb"]["warmup_frames"] == 200
    assert b["rss_mb"]["series"][-1][0] == 2000  # the last sample is taken at the end
    assert {"root_zarr_json", "root_zarr_json_max", "frames_npy"} <= set(b["bytes"])
    assert b["bytes"]["root_zarr_json"] > 0
    assert b["bytes"]["frames_npy"] >= 2000 * 96  # one 96-byte record a frame
    assert set(b["ok"]) == {"rss_flat", "root_zarr_json_small", "all"}
    assert all(isinstance(v, bool) for v in b["ok"].values())
    assert all(math.isfinite(x) for x in _numbers(b))
    assert not list(tmp_path.iterdir())  # cleaned up


def test_bench_long_run_refuses_bad_arguments(cli: Callable[..., CliResult]) -> None:
    assert cli("bench", "long-run", "--frames", "0", "--json").code == 2
    assert cli("bench", "long-run", "--shape", "axb", "--json").code == 2


def test_bench_positions_reports_both_variants_and_their_ratio(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    r = cli(
        "bench", "positions", "--positions", "4", "--time-points", "3", "--shape", "64x64",
        "--repeats", "1", "--workdir", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    b = r.json
    assert b["benchmark"] == "positions" and b["frames"] == 12
    assert set(b["fps"]) == set(b["all_fps"]) == {
        "recording", "simulator", "simulator_triggered"
    }
    for path, fps in b["fps"].items():
        assert set(fps) == {"positions", "single"}
        assert all(len(v) == 1 for v in b["all_fps"][path].values())
        ratio = fps["positions"] / fps["single"]
        assert b["ratio_positions_vs_single"][path] == pytest.approx(ratio, rel=0.02)
    assert all(math.isfinite(x) for x in _numbers(b))
    assert not list(tmp_path.iterdir())  # cleaned up
