from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml

from scopestream.inference.package import (
    MANIFEST,
    PackageError,
    Registry,
    load_package,
    zip_package,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from scopestream.inference.package import ModelPackage


def test_package_round_trip_and_identity(make_package: Callable[..., ModelPackage]) -> None:
    pkg = make_package()
    again = load_package(pkg.path)
    assert again.sha256 == pkg.sha256
    assert set(pkg.manifest.files_sha256) == {"weights.pt", "model.onnx"}
    m1, m2 = pkg.build_module(), again.build_module()
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(m1(x), m2(x))
    assert pkg.identity["sha256"] == pkg.sha256


def test_tampered_weights_are_refused(make_package: Callable[..., ModelPackage]) -> None:
    pkg = make_package()
    w = pkg.path / "weights.pt"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match its sha256"):
        load_package(pkg.path)


def test_bad_manifest_is_refused(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    pkg = make_package()
    man = yaml.safe_load((pkg.path / MANIFEST).read_text())
    man["spatial"] = "4d"
    (pkg.path / MANIFEST).write_text(yaml.safe_dump(man))
    with pytest.raises(PackageError, match="not a valid manifest"):
        load_package(pkg.path)
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "nope")


def test_zip_packages_load(make_package: Callable[..., ModelPackage], tmp_path: Path) -> None:
    pkg = make_package()
    z = zip_package(pkg, tmp_path / "m.zip")
    assert load_package(z).sha256 == pkg.sha256


def test_registry_versions_and_specs(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    reg = Registry(tmp_path / "registry", bundled=False)
    v1 = reg.publish(make_package(seed=1))
    v2 = reg.publish(make_package(seed=2))
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("denoise").version == 2
    assert reg.resolve("denoise@1").sha256 == v1.sha256
    assert reg.resolve(str(v1.path)).version == 1
    assert reg.names() == ["denoise"]
    with pytest.raises(PackageError, match="no version '7'"):
        reg.resolve("denoise@7")
    with pytest.raises(PackageError, match=r"no model named 'stain'.*available: denoise"):
        reg.resolve("stain")
    # a half-copied version is never visible: publishing renames into place
    assert not [p for p in (tmp_path / "registry" / "denoise").iterdir() if p.name.startswith(".")]


def test_onnx_export_matches_torch(make_package: Callable[..., ModelPackage]) -> None:
    import onnxruntime as ort

    pkg = make_package(
        kind="stain_unet",
        params={"out_channels": 2, "base": 8},
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
    )
    sess = ort.InferenceSession(pkg.onnx_bytes(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 1, 72, 96), dtype=np.float32)
    ref = pkg.build_module()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], ref, atol=1e-4)
