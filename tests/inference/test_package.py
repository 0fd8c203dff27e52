from __future__ import annotations

import struct
import zipfile
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import yaml

from scopestream.inference import package as package_mod
from scopestream.inference.package import (
    BUNDLED,
    MANIFEST,
    PackageError,
    Registry,
    is_path_spec,
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


def test_bare_name_is_the_registry_even_with_a_same_named_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    (cwd / "denoise").mkdir(parents=True)
    (cwd / "denoise" / "notes.txt").write_text("not a model")
    monkeypatch.chdir(cwd)
    reg = Registry(tmp_path / "registry")
    bundled = load_package(BUNDLED / "denoise" / "v1")
    assert reg.resolve("denoise").sha256 == bundled.sha256
    assert reg.resolve("denoise@1").sha256 == bundled.sha256
    with pytest.raises(PackageError, match=r"has no manifest\.yaml"):
        reg.resolve("./denoise")  # spelled as a path, it is one


@pytest.mark.parametrize(
    ("spec", "is_path"),
    [
        ("denoise", False),
        ("denoise@2", False),
        ("stain-lab.v2", False),
        ("./denoise", True),
        ("../denoise", True),
        (".", True),
        ("~/models/denoise", True),
        ("/abs/denoise", True),
        ("models/denoise", True),
        ("denoise.zip", True),
    ],
)
def test_what_counts_as_a_path(spec: str, is_path: bool) -> None:
    assert is_path_spec(spec) is is_path


def _bundled_style(root: Path, pkg: ModelPackage) -> Path:
    """A read-only registry root holding ``pkg`` as its v1, like the bundled models."""
    Registry(root, bundled=False).publish(pkg)
    return root


def test_publish_numbers_above_every_root(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    bundled = _bundled_style(tmp_path / "bundled", make_package(seed=1))
    reg = Registry(tmp_path / "user", bundled=False, read_only_roots=[bundled])
    mine = reg.publish(make_package(seed=2))
    assert mine.version == 2  # not a second v1 hiding the bundled one
    assert mine.path == tmp_path / "user" / "denoise" / "v2"
    assert reg.resolve("denoise").sha256 == mine.sha256
    assert reg.resolve("denoise@1").path.is_relative_to(bundled)


def test_publish_skips_a_broken_version_directory(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    reg = Registry(tmp_path / "user", bundled=False)
    reg.publish(make_package(seed=1))
    broken = tmp_path / "user" / "denoise" / "v2"
    broken.mkdir()
    (broken / "weights.pt").write_bytes(b"half a copy, no manifest")
    assert reg.publish(make_package(seed=2)).version == 3
    assert [v for v, _ in reg.versions("denoise")] == [1, 3]


def _member_data_offset(path: Path, member: str) -> int:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return int(info.header_offset + 30 + name_len + extra_len)


@pytest.mark.parametrize(
    ("compression", "damage"),
    [
        (zipfile.ZIP_DEFLATED, "header"),  # a reserved block type: zlib.error
        (zipfile.ZIP_DEFLATED, "data"),  # inflates, to the wrong bytes: bad CRC
        (zipfile.ZIP_STORED, "data"),
    ],
)
def test_corrupt_zip_is_a_package_error(
    make_package: Callable[..., ModelPackage], tmp_path: Path, compression: int, damage: str
) -> None:
    pkg = make_package()
    z = tmp_path / "m.zip"
    with zipfile.ZipFile(z, "w", compression) as out:
        for name, data in pkg.files.items():
            out.writestr(name, data)
    raw = bytearray(z.read_bytes())
    start = _member_data_offset(z, "weights.pt")
    if damage == "header":
        raw[start] = 0xFF  # final block, type 3 (reserved)
    else:
        for i in range(start + 200, start + 260):
            raw[i] ^= 0x5A
    z.write_bytes(bytes(raw))
    assert zipfile.is_zipfile(z)
    with pytest.raises(PackageError, match="corrupt zip"):
        load_package(z)


def _declare_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size ``member`` declares in the central directory."""
    raw = bytearray(path.read_bytes())
    i = raw.find(b"PK\x01\x02")
    while i >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, i + 28)
        if raw[i + 46 : i + 46 + name_len].decode() == member:
            struct.pack_into("<I", raw, i + 24, size)
            path.write_bytes(bytes(raw))
            return
        i = raw.find(b"PK\x01\x02", i + 46 + name_len + extra_len + comment_len)
    raise AssertionError(f"{member} not in {path}")


def test_zip_bomb_is_refused_before_reading(
    make_package: Callable[..., ModelPackage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    z = zip_package(make_package(), tmp_path / "bomb.zip")
    _declare_size(z, "model.onnx", 3 << 30)  # a small zip that says it inflates to 3 GiB
    read: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: str | zipfile.ZipInfo, *a: Any, **kw: Any) -> IO[bytes]:
        read.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(PackageError, match=r"declare \d+ bytes, over the \d+-byte limit"):
        load_package(z)
    assert read == [MANIFEST]  # only the manifest was inflated


def test_listed_files_over_the_cap_are_refused(
    make_package: Callable[..., ModelPackage], monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = make_package()
    monkeypatch.setattr(package_mod, "MAX_PACKAGE_BYTES", 100_000)  # the weights are larger
    with pytest.raises(PackageError, match="over the 100000-byte limit"):
        load_package(pkg.path)


def test_files_not_in_the_manifest_are_not_loaded(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    pkg = make_package()
    (pkg.path / "notes.txt").write_text("unlisted")
    assert set(load_package(pkg.path).files) == {MANIFEST, "weights.pt", "model.onnx"}
    z = zip_package(pkg, tmp_path / "m.zip")
    with zipfile.ZipFile(z, "a") as out:
        out.writestr("padding.bin", b"\0" * 1000)
    _declare_size(z, "padding.bin", 3 << 30)  # unlisted, so never even size-checked
    loaded = load_package(z)
    assert set(loaded.files) == {MANIFEST, "weights.pt", "model.onnx"}
    assert loaded.sha256 == pkg.sha256
