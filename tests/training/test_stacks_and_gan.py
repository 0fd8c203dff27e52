"""2.5D and 3D training patches, pix2pix, and the models they make running live."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, TensorDataset

from scopestream.inference.architectures import build
from scopestream.inference.package import load_package
from scopestream.streaming.saved_run import SavedRun
from scopestream.training.data import FieldData, PatchSampler, Region, load_run
from scopestream.training.module import MultiscaleDiscriminator, PatchDiscriminator, TrainModule
from tests.conftest import record_sim

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult


@pytest.fixture(scope="module")
def zstack_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Brightfield + nuclei z-stacks (8 planes, 3 time points) from the simulator."""
    return record_sim(
        tmp_path_factory.mktemp("zs") / "zs.ome.zarr",
        "--channels", "brightfield:5,nuclei:20", "--z-planes", "8", "--z-step", "0.7",
        "--time-points", "3", "--sim-time-step", "60", "--shape", "128x128", "--seed", "3",
    )  # fmt: skip


def _stack_field(n_t: int = 2, z: int = 6) -> FieldData:
    """Plane value = 100·stack + plane, so every patch says where it came from."""
    planes = np.zeros((n_t * z, 32, 32), np.float32)
    for i in range(n_t * z):
        planes[i] = 100 * (i // z) + i % z
    return FieldData("f", planes, [planes + 0.5], ["t"], z=z)


def test_window_and_subvolume_patches_stay_inside_one_stack() -> None:
    f = _stack_field()
    region = [Region(0, slice(0, 32), slice(0, 32))]
    win = PatchSampler([f], region, 16, spatial="2.5d-z", window=3, augment=False)
    vol = PatchSampler([f], region, 16, spatial="3d", window=4, augment=False)
    for i in range(50):
        x, (y,) = win.sample(i)
        assert x.shape == (3, 16, 16) and y.shape == (16, 16)
        v = x[:, 0, 0]
        assert len({int(a) // 100 for a in v}) == 1  # one stack
        assert np.array_equal(np.diff(v), [1, 1])  # neighbouring planes, in order
        assert y[0, 0] == v[1] + 0.5  # the centre plane's target
        x3, (y3,) = vol.sample(i)
        assert x3.shape == y3.shape == (4, 16, 16)
        assert len({int(a) // 100 for a in x3[:, 0, 0]}) == 1
        assert np.array_equal(y3[:, 0, 0], x3[:, 0, 0] + 0.5)
    with pytest.raises(ValueError, match="too few for 3d patches of 8 planes"):
        PatchSampler([f], region, 16, spatial="3d", window=8)


def test_zarr_runs_keep_their_stack_depth(zstack_run: Path) -> None:
    f = load_run(zstack_run, "brightfield", ["nuclei"])
    assert f.z == 8 and f.n == 24


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_pix2pix_step_trains_generator_and_discriminator() -> None:
    torch.manual_seed(0)
    m = TrainModule("stain_unet", {"base": 8, "out_channels": 2}, "pix2pix", max_steps=3)
    assert isinstance(m.disc, PatchDiscriminator)
    logits = m.disc(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 8, 8)  # one verdict per patch, not per image
    g0, d0 = _params(m.net), _params(m.disc)
    x = torch.rand(8, 1, 32, 32)
    y = torch.rand(8, 2, 32, 32)
    data = DataLoader(TensorDataset(x, y, torch.ones_like(y)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2 * 3,  # three batches; Lightning counts both optimizers' steps
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # Lightning's own noise: tiny loaders in the main process; torch's pytree deprecation
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        trainer.fit(m, data, data)
    assert trainer.global_step == 6
    g1, d1 = _params(m.net), _params(m.disc)
    # every generator tensor moved (AdamW), and the discriminator's convolutions did
    assert [k for k in g0 if torch.equal(g0[k], g1[k])] == []
    d_weights = [k for k in d0 if k.endswith("weight") and d0[k].ndim == 4]
    assert len(d_weights) == 4
    assert [k for k in d_weights if torch.equal(d0[k], d1[k])] == []


def test_multiscale_step_trains_generator_and_both_discriminators() -> None:
    """pix2pixHD: two PatchGANs (full and half scale) and feature matching."""
    torch.manual_seed(0)
    m = TrainModule(
        "stain_unet", {"base": 8, "out_channels": 1}, "pix2pix", max_steps=3, gan="multiscale"
    )
    assert isinstance(m.disc, MultiscaleDiscriminator)
    logits = m.disc(torch.zeros(2, 2, 64, 64))
    assert [tuple(t.shape) for t in logits] == [(2, 1, 8, 8), (2, 1, 4, 4)]
    feats = m.disc.features(torch.zeros(2, 2, 64, 64))
    assert [len(f) for f in feats] == [4, 4]  # three activations + the logits, per scale
    g0, d0 = _params(m.net), _params(m.disc)
    x = torch.rand(8, 1, 32, 32)
    y = torch.rand(8, 1, 32, 32)
    data = DataLoader(TensorDataset(x, y, torch.ones_like(y)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2 * 3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        trainer.fit(m, data, data)
    g1, d1 = _params(m.net), _params(m.disc)
    assert [k for k in g0 if torch.equal(g0[k], g1[k])] == []
    d_weights = [k for k in d0 if k.endswith("weight") and d0[k].ndim == 4]
    assert len(d_weights) == 8 and {k.split(".")[1] for k in d_weights} == {"0", "1"}
    assert [k for k in d_weights if torch.equal(d0[k], d1[k])] == []
    # the discriminators learn at their own rate (the seed's 2e-4), not the generator's
    opt_d = m.optimizers()[1]  # type: ignore[index]
    assert opt_d.param_groups[0]["lr"] == 2e-4


def test_3d_and_25d_stain_models_train_and_run_live(
    cli: Callable[..., CliResult], tmp_path: Path, zstack_run: Path
) -> None:
    common = [
        "--data",
        str(zstack_run),
        "--input-channel",
        "brightfield",
        "--target-channel",
        "nuclei",
        "--patch",
        "32x32",
        "--batch",
        "4",
        "--max-steps",
        "15",
        "--json",
    ]
    r3 = cli(
        "train", "--force",
        "--task", "stain", "--mode", "supervised", "--spatial", "3d", "--window", "8",
        "--out", str(tmp_path / "reg" / "st3"), "--work-dir", str(tmp_path / "w3"), *common,
    )  # fmt: skip
    assert r3.code == 0, r3.stderr
    p3 = load_package(r3.json["package"])
    assert p3.manifest.spatial == "3d" and len(p3.manifest.size_multiple) == 3
    assert p3.build_module().dims == 3
    r25 = cli(
        "train", "--force", "--task", "stain", "--mode", "supervised", "--spatial", "2.5d-z",
        "--window", "3", "--out", str(tmp_path / "reg" / "st25"),
        "--work-dir", str(tmp_path / "w25"), *common,
    )  # fmt: skip
    assert r25.code == 0, r25.stderr
    p25 = load_package(r25.json["package"])
    assert (p25.manifest.spatial, p25.manifest.window, p25.manifest.in_channels) == (
        "2.5d-z",
        3,
        3,
    )
    assert r25.json["metrics"] and r3.json["metrics"]  # evaluated on held-out blocks
    out = tmp_path / "live.ome.zarr"
    live = cli(
        "run", "--source", "sim", "--channels", "brightfield:5", "--z-planes", "8",
        "--z-step", "0.7", "--time-points", "2", "--shape", "128x128",
        "--model", r3.json["package"], "--model", r25.json["package"],
        "--model-policy", "all", "--out", str(out), "--json",
    )  # fmt: skip
    assert live.code == 0, live.stderr
    s = live.json
    assert s["status"] == "complete" and s["error"] is None
    assert s["models"]["model:st3"]["predicted"] == 16
    assert s["models"]["model:st25"]["predicted"] == 16
    run = SavedRun(out)
    for name in ("st3", "st25"):
        pred = np.asarray(zarr.open_group(str(run.image(name).path), mode="r")["0"])
        assert pred.shape == (2, 1, 8, 128, 128)
        assert np.isfinite(pred).all() and pred.std() > 0


def test_pix2pix_starts_from_a_supervised_model(
    cli: Callable[..., CliResult], tmp_path: Path, zstack_run: Path
) -> None:
    common = [
        "--task", "stain", "--data", str(zstack_run), "--input-channel", "brightfield",
        "--target-channel", "nuclei", "--patch", "32x32", "--batch", "4", "--json",
    ]  # fmt: skip
    sup = cli(
        "train", "--force", "--mode", "supervised", "--max-steps", "20",
        "--out", str(tmp_path / "reg" / "sup"), "--work-dir", str(tmp_path / "w1"), *common,
    )  # fmt: skip
    assert sup.code == 0, sup.stderr
    gan = cli(
        "train", "--force",
        "--mode", "pix2pix", "--init-from", sup.json["package"], "--max-steps", "10",
        "--out", str(tmp_path / "reg" / "gan"), "--work-dir", str(tmp_path / "w2"), *common,
    )  # fmt: skip
    assert gan.code == 0, gan.stderr
    assert gan.json["steps"] == 10  # generator steps (Lightning counts both optimizers)
    pkg = load_package(gan.json["package"])
    assert pkg.manifest.training["mode"] == "pix2pix"
    assert pkg.manifest.training["init_from"]["sha256"] == sup.json["sha256"]
    init = load_package(sup.json["package"])
    assert pkg.manifest.input_norm == init.manifest.input_norm
    a, b = _params(init.build_module()), _params(pkg.build_module())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained on from there ...
    arch = pkg.manifest.architecture
    torch.manual_seed(1)
    r = _params(build(arch.kind, dict(arch.params)))  # what a fresh generator starts from

    def dist(p: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> float:
        return float(torch.cat([(p[k] - q[k]).ravel() for k in p]).norm())

    # ... by a few steps from the supervised weights, far from any random start
    assert dist(b, a) < 0.2 * dist(r, a), (dist(b, a), dist(r, a))
    hd = cli(
        "train", "--force", "--mode", "pix2pix", "--gan", "multiscale",
        "--init-from", sup.json["package"], "--max-steps", "3",
        "--out", str(tmp_path / "reg" / "hd"), "--work-dir", str(tmp_path / "w4"), *common,
    )  # fmt: skip
    assert hd.code == 0, hd.stderr
    hd_pkg = load_package(hd.json["package"])
    hd_cfg = hd_pkg.manifest.training["config"]
    assert (hd_cfg["gan"], hd_cfg["lr"], hd_cfg["gan_weight"]) == ("multiscale", 2e-5, 1.0)
    assert hd_pkg.manifest.training["init_from"]["sha256"] == sup.json["sha256"]
    assert hd_pkg.onnx_bytes()  # exported like every model
    c = _params(hd_pkg.build_module())
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert dist(c, a) < 0.2 * dist(r, a)  # the seed's fine-tune: 2e-5 from the FCN
    nogan = cli(
        "train", "--force", "--mode", "supervised", "--gan", "multiscale", "--max-steps", "2",
        "--out", str(tmp_path / "reg" / "x"), *common,
    )  # fmt: skip
    assert nogan.code == 2 and "give --mode pix2pix" in nogan.stderr
    bad = cli(
        "train", "--force", "--mode", "pix2pix", "--init-from", "stain", "--max-steps", "2",
        "--out", str(tmp_path / "reg" / "gan2"), "--work-dir", str(tmp_path / "w3"),
        *common,
    )  # fmt: skip
    assert bad.code == 2
    assert "predicts ['nuclei', 'membrane']" in bad.stderr
    wrong = cli(
        "train", "--force", "--task", "denoise", "--mode", "pix2pix", "--data", str(zstack_run),
        "--input-channel", "nuclei", "--out", str(tmp_path / "reg" / "x"),
    )  # fmt: skip
    assert wrong.code == 2 and "pix2pix is for --task stain" in wrong.stderr
