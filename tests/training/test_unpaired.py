"""Unpaired translation (CycleGAN, STABLE): the honest split, the training step, and the
models they make: packaged, exported, validated and running live."""

from __future__ import annotations

import gc
import warnings
from typing import TYPE_CHECKING

import bioimageio.core as bioimageio_core
import lightning as L
import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch.utils.data import DataLoader, TensorDataset

from scopestream.inference.architectures import StableGenerator, build
from scopestream.inference.backends import make_backend
from scopestream.inference.package import load_package
from scopestream.inference.predictor import Predictor
from scopestream.streaming.saved_run import SavedRun
from scopestream.training.data import DataError, FieldData, Region, split_regions
from scopestream.training.translation import UnpairedModule, unpaired_split
from tests.conftest import record_sim

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import CliResult

# bioimageio.spec leaves its zip open (see test_bioimageio.py)
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(autouse=True)
def _collect_bioimageio_leftovers() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Brightfield and nuclei of the same fields (the simulator's pairs)."""
    return record_sim(
        tmp_path_factory.mktemp("pairs") / "pairs.ome.zarr",
        "--channels", "brightfield:5,nuclei:20", "--time-points", "3",
        "--sim-time-step", "60", "--shape", "128x128", "--seed", "3",
    )  # fmt: skip


def test_unpaired_split_gives_each_domain_its_own_blocks_and_keeps_the_test_pairs() -> None:
    f = FieldData("f", np.zeros((2, 256, 256), np.float32), [np.zeros((2, 256, 256))], ["n"])
    splits = split_regions([f], 32, seed=0)
    u = unpaired_split(splits, seed=0)

    def keys(regions: list[Region]) -> set[tuple[int, int, int]]:
        return {(r.field, r.y.start, r.x.start) for r in regions}

    a, b = keys(u["train_a"]), keys(u["train_b"])
    assert a and b and not a & b  # no block gives both domains
    assert a | b == keys(splits["train"])
    assert not (a | b) & keys(u["test"]) and u["test"] == splits["test"]
    one = {"train": [Region(0, slice(0, 64), slice(0, 64))], "val": [], "test": []}
    with pytest.raises(DataError, match="two training blocks"):
        unpaired_split(one)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
@pytest.mark.parametrize("method", ["cyclegan", "stable"])
def test_a_training_step_moves_both_generators_and_both_discriminators(method: str) -> None:
    torch.manual_seed(0)
    if method == "stable":
        kind, params = "stable", {"base": 4, "depth": 2, "n_info": 3}
    else:
        kind, params = "stain_unet", {"base": 4, "depth": 2, "out_channels": 1}
    m = UnpairedModule(method, kind, params, lr=1e-3, max_steps=3, disc_base=8)
    before = {k: _params(getattr(m, k)) for k in ("gen_ab", "gen_ba", "disc_a", "disc_b")}
    xa, xb = torch.rand(6, 1, 32, 32), torch.rand(6, 1, 32, 32)
    data = DataLoader(TensorDataset(xa, xb), batch_size=2)
    trainer = L.Trainer(
        max_steps=2 * 3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(m, data, data)
    for name, p0 in before.items():
        p1 = _params(getattr(m, name))
        # every weight tensor of the generators moved; each discriminator's convolutions
        moved = [k for k in p0 if not torch.equal(p0[k], p1[k])]
        weights = [k for k in p0 if k.endswith("weight") and p0[k].ndim == 4]
        assert set(weights) <= set(moved), (name, set(weights) - set(moved))
    if method == "stable":  # E_A, D_B (A → B) and E_B, D_A (B → A) all trained
        assert isinstance(m.gen_ab, StableGenerator) and isinstance(m.gen_ba, StableGenerator)


def test_stable_and_cyclegan_train_export_and_run_live(
    cli: Callable[..., CliResult], tmp_path: Path, pairs: Path
) -> None:
    common = [
        "--task", "stain", "--data", str(pairs), "--input-channel", "brightfield",
        "--target-channel", "nuclei", "--unpaired", "--patch", "32x32", "--batch", "2",
        "--max-steps", "2", "--base", "4", "--force", "--json",
    ]  # fmt: skip
    st = cli(
        "train", "--mode", "stable", "--out", str(tmp_path / "reg" / "st"),
        "--work-dir", str(tmp_path / "w1"), *common,
    )  # fmt: skip
    assert st.code == 0, st.stderr
    assert st.json["steps"] == 2
    split = st.json["split"]
    assert split["train_a"] > 0 and split["train_b"] > 0 and split["test"] > 0
    # evaluated on the withheld true pairs, objects included
    assert {"pearson", "objects", "iou"} <= set(st.json["metrics"])
    pkg = load_package(st.json["package"])
    man = pkg.manifest
    assert man.architecture.kind == "stable" and man.training["mode"] == "stable"
    assert (man.inputs, man.outputs) == (("brightfield",), ("nuclei",))
    assert man.training["config"]["upsample"] == "dysample"
    # the ONNX export (DySample's grid_sample) agrees with torch on a frame of another size
    frame = np.random.default_rng(0).normal(300, 40, (64, 96)).astype(np.float32)
    by_torch = Predictor(pkg, make_backend(pkg, "torch")).predict(frame)
    by_onnx = Predictor(pkg, make_backend(pkg, "onnxruntime")).predict(frame)
    assert by_torch.shape == (1, 64, 96)
    np.testing.assert_allclose(by_onnx, by_torch, atol=1e-3 * float(np.abs(by_torch).max()))
    # no normalization layer: tiles (halo = both U-Nets' receptive field) = the whole frame
    big = np.random.default_rng(1).normal(300, 40, (320, 384)).astype(np.float32)
    whole = Predictor(pkg, make_backend(pkg, "torch")).predict(big)
    tiled = Predictor(pkg, make_backend(pkg, "torch"), tile=(288, 288)).predict(big)
    np.testing.assert_allclose(tiled, whole, atol=1e-4 * float(np.ptp(whole)))
    # the ablations train too, and say so
    abl = cli(
        "train", "--mode", "stable", "--no-info-consistency", "--upsample", "bilinear",
        "--out", str(tmp_path / "reg" / "st-abl"), "--work-dir", str(tmp_path / "w2"), *common,
    )  # fmt: skip
    assert abl.code == 0, abl.stderr
    cfg = load_package(abl.json["package"]).manifest.training["config"]
    assert (cfg["info_consistency"], cfg["upsample"]) == (False, "bilinear")
    cg = cli(
        "train", "--mode", "cyclegan", "--out", str(tmp_path / "reg" / "cg"),
        "--work-dir", str(tmp_path / "w3"), *common,
    )  # fmt: skip
    assert cg.code == 0, cg.stderr
    cg_pkg = load_package(cg.json["package"])
    assert cg_pkg.manifest.architecture.kind == "resnet"
    assert cg_pkg.manifest.architecture.params["blocks"] == 9  # the reference generator
    zipped = tmp_path / "st.zip"
    ex = cli(
        "export", "--model", st.json["package"], "--format", "bioimageio", "--out", str(zipped)
    )
    assert ex.code == 0, ex.stderr
    summary = bioimageio_core.test_model(zipped)  # the architecture source is self-contained
    assert summary.status == "passed", summary.format()
    out = tmp_path / "live.ome.zarr"
    live = cli(
        "run", "--source", "sim", "--channels", "brightfield:5", "--time-points", "2",
        "--shape", "128x128", "--model", st.json["package"], "--model", cg.json["package"],
        "--model-policy", "all", "--out", str(out), "--json",
    )  # fmt: skip
    assert live.code == 0, live.stderr
    assert live.json["status"] == "complete"
    assert live.json["models"]["model:st"]["predicted"] == 2
    assert live.json["models"]["model:cg"]["predicted"] == 2
    for name in ("st", "cg"):
        pred = np.asarray(zarr.open_group(str(SavedRun(out).image(name).path), mode="r")["0"])
        assert pred.shape == (2, 1, 1, 128, 128) and np.isfinite(pred).all()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_two_unpaired_folders_train_without_pairs(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    a, b = tmp_path / "brightfield", tmp_path / "nuclei"
    a.mkdir()
    b.mkdir()
    for i in range(3):  # different fields in each domain: nothing pairs them
        tifffile.imwrite(a / f"bf{i}.tif", rng.normal(500, 30, (2, 96, 96)).astype(np.uint16))
        tifffile.imwrite(b / f"n{i + 7}.tif", rng.poisson(20, (2, 96, 96)).astype(np.uint16))
    r = cli(
        "train", "--task", "stain", "--mode", "cyclegan", "--generator", "unet",
        "--inputs-a", str(a), "--inputs-b", str(b), "--patch", "32x32", "--batch", "2",
        "--max-steps", "3", "--base", "4", "--out", str(tmp_path / "reg" / "cgu"), "--json",
        "--work-dir", str(tmp_path / "w"),
    )  # fmt: skip
    assert r.code == 0, r.stderr
    assert r.json["metrics"] == {}  # no pairs, no made-up evaluation
    pkg = load_package(r.json["package"])
    assert pkg.manifest.architecture.kind == "stain_unet"
    assert pkg.manifest.outputs == ("nuclei",)  # B's folder names the channel
    # our U-Net generator tiles exactly, like every U-Net of the project
    frame = rng.normal(500, 30, (192, 256)).astype(np.float32)
    whole = Predictor(pkg, make_backend(pkg, "torch")).predict(frame)
    tiled = Predictor(pkg, make_backend(pkg, "torch"), tile=(128, 128)).predict(frame)
    np.testing.assert_allclose(tiled, whole, atol=1e-4 * float(np.abs(whole).max()))
    bad = cli(
        "train", "--task", "stain", "--mode", "stable", "--data", str(tmp_path / "x.ome.zarr"),
        "--input-channel", "brightfield", "--target-channel", "nuclei",
        "--out", str(tmp_path / "reg" / "bad"),
    )  # fmt: skip
    assert bad.code == 2 and "--unpaired" in bad.stderr
    paired = build("stable", {"base": 4})
    assert paired.size_multiple == (8, 8)
