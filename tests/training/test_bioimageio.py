"""bioimage.io export (validated by bioimageio.spec, test tensors reproduced by bioimageio.core)
and import (our own round trip, and another tool's ONNX/TorchScript export)."""

from __future__ import annotations

import gc
import io
import warnings
import zipfile
from typing import TYPE_CHECKING, Any

import bioimageio.core as bioimageio_core
import numpy as np
import pytest
import torch
import yaml
from bioimageio.spec import InvalidDescr, load_description, save_bioimageio_package
from torch import nn

from scopestream.inference.backends import make_backend
from scopestream.inference.package import Registry
from scopestream.inference.predictor import Predictor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import CliResult


# bioimageio.spec opens a package's zip and files (cover.png) without closing them
# (`bioimageio.spec._io.open_bioimageio_yaml`): a third-party leak, filtered for this module
# only, and collected inside each test so it cannot surface in another one
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(autouse=True)
def _collect_bioimageio_leftovers() -> Iterator[None]:
    yield
    gc.collect()


@pytest.mark.parametrize("model", ["denoise", "stain"])
def test_export_validates_and_its_test_tensors_reproduce(
    cli: Callable[..., CliResult], tmp_path: Path, model: str
) -> None:
    out = tmp_path / f"{model}.zip"
    r = cli("export", "--model", model, "--format", "bioimageio", "--out", str(out), "--json")
    assert r.code == 0, r.stderr
    descr = load_description(out, perform_io_checks=True)
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()
    assert str(descr.format_version).startswith("0.5")
    assert {"pytorch_state_dict", "onnx"} <= {
        k for k, v in descr.weights.model_dump(mode="json").items() if v
    }
    inp, outp = descr.inputs[0], descr.outputs[0]
    y_axis = next(a for a in inp.axes if a.type == "space" and a.id == "y")
    assert (
        y_axis.size.step == 8
        and y_axis.size.min
        > 2 * next(a for a in outp.axes if a.type == "space" and a.id == "y").halo
    )
    ops = [p.id for p in inp.preprocessing]
    assert "scale_linear" in ops  # fixed constants, never per-image statistics
    assert not {"zero_mean_unit_variance", "scale_range"} & set(ops)
    with zipfile.ZipFile(out) as z:
        assert "Evaluation on held-out fields" in z.read("README.md").decode()
    summary = bioimageio_core.test_model(
        out
    )  # runs both weight formats, several sizes, batch 1 and 2
    assert summary.status == "passed", summary.format()
    reproduced = [d.name for d in summary.details if d.name.startswith("Reproduce test outputs")]
    assert len(reproduced) == 2
    assert cli("export", "--model", model, "--out", str(out)).code == 2  # no clobbering


def test_import_of_our_export_restores_the_package(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    out = tmp_path / "stain.zip"
    assert cli("export", "--model", "stain", "--out", str(out)).code == 0
    reg = tmp_path / "reg"
    r = cli("import", str(out), "--registry", str(reg), "--name", "stain-lab", "--json")
    assert r.code == 0, r.stderr
    new = Registry(reg, bundled=False).resolve("stain-lab")
    orig = Registry().resolve("stain")
    assert new.files["weights.pt"] == orig.files["weights.pt"]
    assert new.files["model.onnx"] == orig.files["model.onnx"]
    for field in ("architecture", "inputs", "outputs", "input_norm", "output_norm", "halo"):
        assert getattr(new.manifest, field) == getattr(orig.manifest, field)
    assert new.manifest.training["metrics"] == orig.manifest.training["metrics"]
    frame = np.random.default_rng(0).normal(400, 60, (96, 128)).astype(np.float32)
    a = Predictor(orig, make_backend(orig, "onnxruntime")).predict(frame)
    b = Predictor(new, make_backend(new, "onnxruntime")).predict(frame)
    assert np.array_equal(a, b)


class _Tiny(nn.Module):
    """Another tool's network (stands in for e.g. a CAREamics N2V export)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)  # nothing in eval mode; traced in training mode, noise
        self.b = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.b(self.drop(torch.relu(self.a(x))))
        return out


def _foreign_zip(
    tmp: Path,
    weights: set[str],
    *,
    output_off_by: float = 0.0,
    careamics: bool = False,
    fixed_size: int | None = None,
) -> tuple[Path, nn.Module]:
    """A bioimage.io 0.5 model written the way other tools write theirs (its test output
    ``output_off_by`` of its range away from what its weights give, as a model converted
    wrongly is). ``careamics``: its de-normalization written as CAREamics writes it, a
    ``fixed_zero_mean_unit_variance`` post-processing with the inverse constants, and
    (``fixed_size``) one fixed input size, as CAREamics declares 256."""
    torch.manual_seed(1)
    net = _Tiny().eval()
    n = fixed_size or 64
    x = np.random.default_rng(1).normal(100, 20, (1, 1, n, n)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy((x - 100) / 20)).numpy() * 20 + 100
    np.save(tmp / "in.npy", x)
    y = y + output_off_by * float(np.ptp(y))
    np.save(tmp / "out.npy", y.astype(np.float32))
    w: dict[str, Any] = {}
    if "torchscript" in weights:
        with warnings.catch_warnings():  # TorchScript is deprecated, but zoo models use it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(net), str(tmp / "net.pt"))
        w["torchscript"] = {"source": "net.pt", "pytorch_version": "2.13"}
    if "onnx" in weights:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (torch.zeros(1, 1, 64, 64),), buf, input_names=["i"], output_names=["o"],
                dynamic_axes={"i": {0: "b", 2: "y", 3: "x"}, "o": {0: "b", 2: "y", 3: "x"}},
                opset_version=17, dynamo=False,
            )  # fmt: skip
        (tmp / "net.onnx").write_bytes(buf.getvalue())
        w["onnx"] = {"source": "net.onnx", "opset_version": 17}
    if "pytorch_state_dict" in weights:
        (tmp / "tiny.py").write_text(
            "import torch\nfrom torch import nn\n\nclass Tiny(nn.Module):\n"
            "    def __init__(self):\n        super().__init__()\n"
            "        self.a = nn.Conv2d(1, 4, 3, padding=1)\n"
            "        self.drop = nn.Dropout(0.5)\n"
            "        self.b = nn.Conv2d(4, 1, 1)\n\n"
            "    def forward(self, x):\n"
            "        return x + self.b(self.drop(torch.relu(self.a(x))))\n"
        )
        torch.save(net.state_dict(), tmp / "sd.pt")
        w["pytorch_state_dict"] = {
            "source": "sd.pt",
            "architecture": {"source": "tiny.py", "callable": "Tiny"},
            "pytorch_version": "2.13",
        }
    if "keras_hdf5" in weights:  # weights scopestream cannot run
        (tmp / "w.h5").write_bytes(b"not really keras")
        w["keras_hdf5"] = {"source": "w.h5", "tensorflow_version": "2.15"}
    (tmp / "README.md").write_text("# tiny\n")
    post: dict[str, Any] = {"id": "scale_linear", "kwargs": {"gain": 20.0, "offset": 100.0}}
    if careamics:  # (y - mean) / std with mean = -100/20, std = 1/20: y × 20 + 100
        post = {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": -5.0, "std": 0.05}}
    size: Any = fixed_size or {"min": 16, "step": 8}
    space = [{"type": "space", "id": a, "size": size} for a in ("y", "x")]
    rdf = {
        "type": "model",
        "format_version": "0.5.12",
        "name": "Tiny N2V",
        "description": "a small denoiser from another tool",
        "authors": [{"name": "Someone Else"}],
        "cite": [
            {"text": "Krull et al. Noise2Void. CVPR 2019.", "doi": "10.1109/CVPR.2019.00223"}
        ],
        "license": "MIT",
        "tags": ["denoising", "n2v"],
        "documentation": {"source": "README.md"},
        "inputs": [
            {
                "id": "input",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, *space],
                "test_tensor": {"source": "in.npy"},
                "preprocessing": [
                    {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": 100.0, "std": 20.0}}
                ],
            }
        ],
        "outputs": [
            {
                "id": "prediction",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["denoised"]},
                    *[
                        {"type": "space", "id": a, "size": {"tensor_id": "input", "axis_id": a}}
                        for a in ("y", "x")
                    ],
                ],
                "test_tensor": {"source": "out.npy"},
                "postprocessing": [post],
            }
        ],
        "weights": w,
    }
    (tmp / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    descr = load_description(tmp / "rdf.yaml", perform_io_checks=True)
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()
    return save_bioimageio_package(descr, output_path=tmp / "tiny.zip"), net


def test_import_of_another_tools_model_runs_with_its_normalization(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    zip_path, net = _foreign_zip(src, {"torchscript", "onnx"})
    reg = tmp_path / "reg"
    r = cli("import", str(zip_path), "--registry", str(reg), "--json")
    assert r.code == 0, r.stderr
    # it declared no halo: measured on the network (3×3 conv: 1 px), and said so
    assert any("halo 8 px measured on the network" in n for n in r.json["notes"])
    assert any("reproduces its test output" in n for n in r.json["notes"])
    pkg = Registry(reg, bundled=False).resolve(r.json["model"])
    m = pkg.manifest
    assert (m.task, m.architecture.kind, m.inputs) == ("denoise", "external", ("*",))
    assert (m.input_norm.offset, m.input_norm.scale) == ((100.0,), (20.0,))
    frame = np.random.default_rng(2).normal(100, 20, (80, 96)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy((frame - 100) / 20)[None, None]).numpy()[0] * 20 + 100
    for backend in ("onnxruntime", "torch-cpu"):  # ONNX, and TorchScript through torch
        got = Predictor(pkg, make_backend(pkg, backend)).predict(frame)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # and it runs live, per channel like our own denoiser (on the CPU: under `auto` a GPU
    # with torch-tensorrt would take the TorchScript weights to TensorRT)
    run = cli(
        "run", "--source", "sim", "--channels", "nuclei:5", "--frames", "3", "--shape", "64x64",
        "--model", str(pkg.path), "--model-policy", "all", "--backend", "onnxruntime",
        "--out", str(tmp_path / "r.ome.zarr"), "--json",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert run.json["models"][f"model:{pkg.name}"]["predicted"] == 3


def test_import_takes_the_task_and_input_channel_it_is_told(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    zip_path, _ = _foreign_zip(src, {"onnx"})
    reg = tmp_path / "reg"
    r = cli("import", str(zip_path), "--registry", str(reg), "--name", "dn-nuc",
            "--input-channel", "nuclei", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    m = Registry(reg, bundled=False).resolve("dn-nuc").manifest
    assert (m.task, m.inputs, m.outputs) == ("denoise", ("nuclei",), ("nuclei",))
    assert any("tags say so" in n for n in r.json["notes"])
    r = cli("import", str(zip_path), "--registry", str(reg), "--name", "as-stain",
            "--task", "stain", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    m = Registry(reg, bundled=False).resolve("as-stain").manifest
    assert (m.task, m.inputs, m.outputs) == ("stain", ("brightfield",), ("denoised",))
    bad = cli("import", str(zip_path), "--registry", str(reg), "--task", "segment")
    assert bad.code == 2 and "--task must be denoise or stain" in bad.stderr


def test_import_traces_state_dict_weights_in_eval_mode_and_refuses_others(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """CAREamics exports ``pytorch_state_dict`` weights with their architecture's source."""
    src = tmp_path / "src"
    src.mkdir()
    zip_path, net = _foreign_zip(src, {"pytorch_state_dict"}, careamics=True, fixed_size=96)
    reg = tmp_path / "reg"
    r = cli("import", str(zip_path), "--registry", str(reg), "--json")
    assert r.code == 0, r.stderr
    assert any("traced to TorchScript in eval mode" in n for n in r.json["notes"])
    pkg = Registry(reg, bundled=False).resolve(r.json["model"])
    frame = np.random.default_rng(5).normal(100, 20, (48, 40)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy((frame - 100) / 20)[None, None]).numpy()[0] * 20 + 100
    got = Predictor(pkg, make_backend(pkg, "torch-cpu")).predict(frame)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)  # dropout off: eval mode
    # its fixed 96-px input is not a 96-px halo: the network's reach is, so it tiles
    assert pkg.manifest.halo == (8, 8) and pkg.manifest.size_multiple == (1, 1)
    tiled = Predictor(pkg, make_backend(pkg, "torch-cpu"), tile=(24, 24)).predict(frame)
    np.testing.assert_allclose(tiled, got, rtol=1e-5, atol=1e-4)
    other = tmp_path / "other"
    other.mkdir()
    bad, _ = _foreign_zip(other, {"keras_hdf5"})
    r = cli("import", str(bad), "--registry", str(reg))
    assert r.code == 2 and "keras_hdf5" in r.stderr


def test_import_refuses_a_model_that_does_not_reproduce_its_own_test_output(
    tmp_path: Path,
) -> None:
    from scopestream.training.bioimageio import BioimageioError, import_bioimageio

    src = tmp_path / "src"
    src.mkdir()
    zip_path, _ = _foreign_zip(src, {"onnx"}, output_off_by=0.028)  # 2.8 % off, as seen
    reg = Registry(tmp_path / "reg", bundled=False)
    with pytest.raises(BioimageioError, match=r"differs from the test output by 2\.8\d% "):
        import_bioimageio(zip_path, reg)
    assert reg.names() == []  # nothing published
