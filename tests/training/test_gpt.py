"""Global Pixel Transformers: the network's arithmetic, its export, and several stains
trained at once from runs that lack some of them."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import bioimageio.core as bioimageio_core
import numpy as np
import onnxruntime as ort
import pytest
import torch

from scopestream.inference.architectures import GPTLayer, GPTNet, receptive_radius
from scopestream.inference.manifest import Normalization
from scopestream.inference.package import load_package
from scopestream.training.data import PatchSampler, Region, load_run_fields
from scopestream.training.module import PatchDataset
from tests.conftest import record_sim

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult

# bioimageio.spec leaves its zip open (see test_bioimageio.py)
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def test_gpt_network_has_the_seeds_widths_and_attention_where_asked() -> None:
    torch.manual_seed(0)
    seed_widths = GPTNet(1, 3, base=32, attention_from=0)
    assert seed_widths.channels_up == 90  # Table II: 288, 168, 90 on the way up
    assert sum(isinstance(m, GPTLayer) for m in seed_widths.modules()) == 7  # 3 GDT, GST, 3 GUT
    default = GPTNet(1, 3, base=32)
    assert sum(isinstance(m, GPTLayer) for m in default.modules()) == 3  # ¼, ⅛ and the bottom
    with torch.no_grad():
        for size in ((64, 64), (48, 80)):
            assert default.eval()(torch.zeros(2, 1, *size)).shape == (2, 3, *size)
    assert receptive_radius(default) == GPTNet.halo_px  # global: the stated overlap
    with pytest.raises(ValueError, match="attention_from"):
        GPTNet(attention_from=4)


def test_gpt_exports_to_onnx_at_any_size() -> None:
    torch.manual_seed(0)
    net = GPTNet(1, 2, base=8).eval()
    buf = io.BytesIO()
    axes = {0: "n", 2: "y", 3: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(1, 1, 32, 32),), buf, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": axes, "output": axes},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 40, 56)
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def stain_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two fields: one with nuclei and membrane recorded, one with nuclei only."""
    d = tmp_path_factory.mktemp("stains")
    both = record_sim(
        d / "both.ome.zarr", "--channels", "brightfield:5,nuclei:20,membrane:20",
        "--time-points", "2", "--shape", "128x128", "--seed", "4",
    )  # fmt: skip
    nuclei_only = record_sim(
        d / "nuc.ome.zarr", "--channels", "brightfield:5,nuclei:20",
        "--time-points", "2", "--shape", "128x128", "--seed", "5",
    )  # fmt: skip
    return both, nuclei_only


def test_a_missing_stain_is_masked_out_of_the_loss(stain_runs: tuple[Path, Path]) -> None:
    nuclei_only = stain_runs[1]
    targets = ["nuclei", "membrane"]
    f = load_run_fields(nuclei_only, "brightfield", targets, allow_missing=True)[0]
    assert f.missing_targets == ["membrane"] and np.isnan(f.targets[1][0, :4, :4]).all()
    with pytest.raises(ValueError, match="no channel 'membrane'"):
        load_run_fields(nuclei_only, "brightfield", targets)
    with pytest.raises(ValueError, match="none of the target channels"):
        load_run_fields(nuclei_only, "brightfield", ["membrane"], allow_missing=True)
    sampler = PatchSampler([f], [Region(0, slice(0, 128), slice(0, 128))], 32, augment=False)
    norm = Normalization(offset=(0.0, 0.0), scale=(1.0, 1.0))
    ds = PatchDataset(sampler, "gpt", Normalization(), norm, 2)
    _, y, w = ds[0]
    assert w[0].all() and not w[1].any()  # nuclei count, the absent membrane does not
    assert torch.isfinite(y).all()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_gpt_trains_several_stains_from_runs_that_lack_some_and_runs_live(
    cli: Callable[..., CliResult], tmp_path: Path, stain_runs: tuple[Path, Path]
) -> None:
    both, nuclei_only = stain_runs
    r = cli(
        "train", "--task", "stain", "--mode", "gpt", "--data", str(both),
        "--data", str(nuclei_only), "--input-channel", "brightfield",
        "--target-channel", "nuclei", "--target-channel", "membrane", "--patch", "32x32",
        "--batch", "2", "--max-steps", "3", "--base", "4", "--force",
        "--out", str(tmp_path / "reg" / "gpt"), "--work-dir", str(tmp_path / "w"), "--json",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    pkg = load_package(r.json["package"])
    man = pkg.manifest
    assert man.architecture.kind == "gpt" and man.outputs == ("nuclei", "membrane")
    assert man.architecture.params["dropout"] == 0.5 and man.halo == (64, 64)
    zipped = tmp_path / "gpt.zip"
    pkg_path = r.json["package"]
    ex = cli("export", "--model", pkg_path, "--format", "bioimageio", "--out", str(zipped))
    assert ex.code == 0, ex.stderr  # validated by bioimageio.spec ...
    summary = bioimageio_core.test_model(zipped)  # ... and reproduced by bioimageio.core
    assert summary.status == "passed", summary.format()
    out = tmp_path / "live.ome.zarr"
    live = cli(
        "run", "--source", "sim", "--channels", "brightfield:5", "--time-points", "2",
        "--shape", "128x128", "--model", r.json["package"], "--out", str(out), "--json",
    )  # fmt: skip
    assert live.code == 0, live.stderr
    assert live.json["models"]["model:gpt"]["predicted"] == 2
    none = cli(
        "train", "--task", "stain", "--mode", "gpt", "--data", str(nuclei_only),
        "--input-channel", "brightfield", "--target-channel", "nuclei",
        "--target-channel", "actin", "--out", str(tmp_path / "reg" / "x"), "--force",
    )  # fmt: skip
    assert none.code == 2 and "no run has the target channel 'actin'" in none.stderr
