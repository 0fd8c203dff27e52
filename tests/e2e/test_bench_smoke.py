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


def _fake_wheel(cache: Path, image: Any) -> None:
    """A cached stardist wheel holding ``image`` as its img2d.tif (no network in tests)."""
    import io
    import zipfile

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "stardist-0.9.2-py3-none-any.whl", "w") as z:
        z.writestr("stardist/data/images/img2d.tif", buf.getvalue())


def test_bench_quality_reports_every_method_against_its_baselines(
    cli: Callable[..., CliResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from scopestream.bench.common import realistic_frames

    _fake_wheel(tmp_path / "cache", realistic_frames((512, 512), k=1)[0])
    monkeypatch.setenv("SCOPESTREAM_BENCH_CACHE", str(tmp_path / "cache"))
    r = cli(
        "bench", "quality", "--datasets", "img2d", "--photons", "20", "--steps", "3",
        "--methods", "n2v,care", "--no-careamics", "--no-ablation",
        "--workdir", str(tmp_path / "w"), "--json", timeout=600,
    )  # fmt: skip
    assert r.code == 0, r.stderr
    b = r.json
    assert b["bench"] == "quality"
    assert [row["method"] for row in b["rows"]] == ["plain-n2v", "n2v", "care"]
    assert "careamics" in b["baselines_unavailable"]  # left out, and said so
    for row in b["rows"]:
        assert row["optimizer_steps"] == 3 and row["dataset"] == "img2d"
        assert row["psnr_gain_db"] == pytest.approx(row["psnr"] - row["noisy_psnr"], abs=2e-3)
        assert {"psnr", "ssim", "ssim_gain", "wall_s", "steps_per_s"} <= set(row)
    assert set(b["rows"][1]["vs"]) == {"plain-n2v"}
    assert np.isfinite(list(_numbers(b["rows"]))).all()
    bad = cli("bench", "quality", "--datasets", "lena", "--no-careamics")
    assert bad.code == 2 and "unknown dataset 'lena'" in bad.stderr


def test_bench_quality_degrades_like_a_camera_and_never_splits_a_frame_in_two() -> None:
    import numpy as np

    from scopestream.bench.quality import OFFSET, READ_NOISE, degrade, split

    clean = np.full((4, 64, 64), 1000.0)
    clean[:, :, :32] = 0
    noisy, ref, target = degrade(clean, 20, np.random.default_rng(0), (0.0, 1000.0))
    assert noisy.dtype == np.uint16 and target.dtype == np.uint16
    bright, dark = noisy[..., 32:].astype(float), noisy[..., :32].astype(float)
    assert bright.mean() == pytest.approx(20 + OFFSET, abs=0.3)
    assert bright.var() == pytest.approx(20 + READ_NOISE**2, rel=0.1)  # shot + read noise
    assert dark.var() == pytest.approx(READ_NOISE**2 + 1 / 12, rel=0.15)  # read + rounding
    assert np.array_equal(ref[..., 32:], np.full((4, 64, 32), 20.0 + OFFSET))
    assert target[..., 32:].mean() == pytest.approx(20 * 50 + OFFSET, rel=0.01)
    columns = np.tile(np.arange(512), (512, 1))
    tr, te = split("img2d", columns)
    assert te.min() - tr.max() > 8  # no column in both, and a gap between them
    with pytest.raises(ValueError, match="too small"):
        split("img2d", columns[:, :256])


# lightning's own use of a torch API it deprecates (the CLI trains with it too)
@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_bench_stain_norms_trains_each_normalization_and_scores_both_stains(
    tmp_path: Path,
) -> None:
    from scopestream.bench.stain_norms import bench_stain_norms
    from scopestream.inference.package import Registry

    rows = (("percentile", "percentile"), ("standard", "percentile-sym"))
    b = bench_stain_norms(rows, fields=3, steps=2, workdir=str(tmp_path), log=lambda s: None)
    assert [(r["norm"], r["target_norm"]) for r in b["rows"]] == list(rows)
    for r in b["rows"]:
        assert r["optimizer_steps"] == 2
        for s in ("nuclei", "membrane"):
            assert -1 <= r[f"{s}_pearson"] <= 1
    # the same held-out field and truth for every row: the brightfield's own r is one number
    assert len({r["nuclei_brightfield_pearson"] for r in b["rows"]}) == 1
    # the two stains are scored against their own truth, not both against the nuclei
    assert b["rows"][0]["nuclei_brightfield_pearson"] != b["rows"][0][
        "membrane_brightfield_pearson"
    ]
    newest = Registry(tmp_path / "reg").resolve("stain").manifest.training["config"]
    assert (newest["norm"], newest["target_norm"]) == rows[-1]
    with pytest.raises(ValueError, match="unknown normalization 'minmax'"):
        bench_stain_norms((("minmax", "percentile"),), fields=3, workdir=str(tmp_path))


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_bench_translation_scores_unpaired_rows_on_the_paired_rows_test_fields(
    tmp_path: Path,
) -> None:
    from scopestream.bench.translation import bench_translation
    from scopestream.inference.package import Registry

    b = bench_translation(
        ("supervised", "stable-bilinear"), fields=4, steps=1, batch=2, frames=2,
        workdir=str(tmp_path), log=lambda s: None,
    )  # fmt: skip
    assert [r["row"] for r in b["rows"]] == ["supervised", "stable-bilinear"]
    for r in b["rows"]:
        assert r["optimizer_steps"] == 1 and -1 <= r["pearson"] <= 1
        assert r["objects_target"] > 0  # the truth has nuclei to find
    assert "pearson_vs_supervised" in b["rows"][1]
    # the same truth and test fields for every row; the domains' fields are disjoint
    assert len({r["brightfield_pearson"] for r in b["rows"]}) == 1
    f = b["settings"]["unpaired_fields"]
    assert f["a"] and f["b"] and not set(f["a"]) & set(f["b"])
    assert not (set(f["a"]) | set(f["b"])) & set(f["test"])
    cfg = Registry(tmp_path / "reg").resolve("stable-bilinear").manifest.training["config"]
    assert (cfg["mode"], cfg["upsample"], cfg["unpaired"]) == ("stable", "bilinear", True)
    with pytest.raises(ValueError, match="unknown row 'gpt2'"):
        bench_translation(("gpt2",), workdir=str(tmp_path))


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_bench_gpt_trains_both_networks_for_the_budget_and_scores_each_stain(
    tmp_path: Path,
) -> None:
    from scopestream.bench.gpt import bench_gpt

    b = bench_gpt(1.0, fields=3, batch=2, frames=2, workdir=str(tmp_path), log=lambda s: None)
    unet, gpt = b["rows"]
    assert (unet["network"], gpt["network"]) == ("unet", "gpt")
    assert gpt["architecture"]["kind"] == "gpt" and unet["architecture"]["kind"] == "stain_unet"
    for r in b["rows"]:
        assert r["optimizer_steps"] >= 10 and r["seconds_per_step"] > 0
        assert -1 <= r["nuclei_pearson"] <= 1 and -1 <= r["membrane_pearson"] <= 1
    assert set(b["gpt_minus_unet"]) == {"nuclei", "membrane"}
    tiles = gpt["tiled_vs_whole"]
    assert tiles["tile"] == [192, 192] and tiles["max_abs_over_range"] >= 0
    with pytest.raises(ValueError, match="budget_s must be positive"):
        bench_gpt(0, workdir=str(tmp_path))
