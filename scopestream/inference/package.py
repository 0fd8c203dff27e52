"""Model packages (a directory or a zip) and the versioned registry.

A package holds ``manifest.yaml``, the PyTorch state dict (``weights.pt``) and
an ONNX export (``model.onnx``). The manifest lists every file's sha256; the
package's own hash is the sha256 of the manifest, so it identifies weights and
settings together. Loading checks every hash: a corrupted or edited package is
refused, never run.

A registry is a directory ``ROOT/<name>/v<version>/``. ``name`` resolves to
the newest version (user registry first, then the models bundled with
scopestream), ``name@3`` to that version, and a path to that package.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from scopestream.inference.manifest import Manifest

if TYPE_CHECKING:
    from torch import nn

    from scopestream.inference.architectures import UNet

MANIFEST = "manifest.yaml"
BUNDLED = Path(__file__).resolve().parents[1] / "models"
_VERSION_DIR = re.compile(r"^v(\d+)$")


class PackageError(ValueError):
    """A model package that cannot be trusted or used."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_registry() -> Path:
    """``$SCOPESTREAM_REGISTRY``, else ``~/.scopestream/models``."""
    env = os.environ.get("SCOPESTREAM_REGISTRY")
    return Path(env) if env else Path.home() / ".scopestream" / "models"


@dataclass(frozen=True)
class ModelPackage:
    """A loaded, verified package."""

    path: Path
    manifest: Manifest
    sha256: str
    files: dict[str, bytes]

    @property
    def name(self) -> str:
        """Model name."""
        return self.manifest.name

    @property
    def version(self) -> int:
        """Model version."""
        return self.manifest.version

    @property
    def identity(self) -> dict[str, Any]:
        """Who this model is, for provenance."""
        return {
            "model": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "task": self.manifest.task,
            "path": str(self.path),
        }

    def build_module(self) -> UNet:
        """The PyTorch network with its weights (eval mode, CPU, fp32)."""
        import torch

        from scopestream.inference.architectures import build

        arch = self.manifest.architecture
        if "torch" not in self.manifest.weights:
            raise PackageError(
                f"{self.name} has ONNX weights only: run it with --backend onnxruntime"
            )
        blob = io.BytesIO(self.files[self.manifest.weights["torch"]])
        if arch.kind == "external":  # an imported TorchScript network
            with warnings.catch_warnings():  # deprecated upstream; zoo models still ship it
                warnings.simplefilter("ignore", DeprecationWarning)
                script: UNet = torch.jit.load(blob, map_location="cpu")  # type: ignore[no-untyped-call]
            return script.eval()
        module = build(arch.kind, arch.params)
        state = torch.load(blob, weights_only=True)
        module.load_state_dict(state)
        return module.eval()

    def onnx_bytes(self) -> bytes:
        """The ONNX export."""
        if "onnx" not in self.manifest.weights:
            raise PackageError(f"{self.name} has no ONNX weights: use --backend torch")
        return self.files[self.manifest.weights["onnx"]]


def _read_files(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return {Path(n).name: z.read(n) for n in z.namelist() if not n.endswith("/")}
    raise PackageError(f"{path} is neither a model package directory nor a zip")


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Load and verify a package."""
    p = Path(path)
    if not p.exists():
        raise PackageError(f"model package {p} does not exist")
    files = _read_files(p)
    if MANIFEST not in files:
        raise PackageError(f"{p} has no {MANIFEST}")
    raw = files[MANIFEST]
    try:
        manifest = Manifest.model_validate(yaml.safe_load(raw))
    except (yaml.YAMLError, ValidationError) as e:
        raise PackageError(f"{p}/{MANIFEST} is not a valid manifest: {e}") from None
    for role, fname in manifest.weights.items():
        if fname not in files:
            raise PackageError(f"{p}: the {role} weights {fname!r} are missing")
    for fname, digest in manifest.files_sha256.items():
        if fname not in files:
            raise PackageError(f"{p}: {fname} is listed in the manifest but missing")
        if _sha256(files[fname]) != digest:
            raise PackageError(
                f"{p}: {fname} does not match its sha256 in the manifest (corrupted or edited); "
                "refusing to run it"
            )
    unlisted = [f for f in manifest.weights.values() if f not in manifest.files_sha256]
    if unlisted:
        raise PackageError(f"{p}: weights {unlisted} have no sha256 in the manifest")
    return ModelPackage(p, manifest, _sha256(raw), files)


def export_onnx(module: nn.Module, manifest: Manifest, opset: int = 17) -> bytes:
    """ONNX export with dynamic batch and spatial sizes."""
    import torch

    n_sp = manifest.n_spatial
    sizes = [4 * m for m in manifest.size_multiple]
    x = torch.zeros(1, manifest.in_channels, *sizes)
    axes = {0: "n", **{2 + i: f"s{i}" for i in range(n_sp)}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of one that needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (x,),
            buf,  # type: ignore[arg-type]
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": axes, "output": axes},
            opset_version=opset,
            dynamo=False,
        )
    return buf.getvalue()


def save_package(
    directory: str | os.PathLike[str], module: nn.Module, manifest: Manifest
) -> ModelPackage:
    """Write weights, the ONNX export and the manifest (with hashes); return the loaded package."""
    import torch

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=False)
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    files = {
        manifest.weights["torch"]: buf.getvalue(),
        manifest.weights["onnx"]: export_onnx(module, manifest),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    final = manifest.model_copy(update={"files_sha256": {n: _sha256(b) for n, b in files.items()}})
    (d / MANIFEST).write_text(yaml.safe_dump(final.model_dump(mode="json"), sort_keys=False))
    return load_package(d)


def add_files(
    directory: str | os.PathLike[str], manifest: Manifest, names: list[str]
) -> ModelPackage:
    """Add files (report, figure, logs) to a package directory, hashed in its manifest."""
    d = Path(directory)
    hashes = dict(manifest.files_sha256)
    for name in names:
        p = d / name
        if p.exists():
            hashes[name] = _sha256(p.read_bytes())
    final = manifest.model_copy(update={"files_sha256": hashes})
    (d / MANIFEST).write_text(yaml.safe_dump(final.model_dump(mode="json"), sort_keys=False))
    return load_package(d)


def zip_package(package: ModelPackage, out: str | os.PathLike[str]) -> Path:
    """The package as one zip file."""
    path = Path(out)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in package.files.items():
            z.writestr(name, data)
    return path


class Registry:
    """Named, versioned models in ``root`` (plus the bundled ones, read-only)."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, bundled: bool = True
    ) -> None:
        self.root = Path(root) if root is not None else default_registry()
        self.roots = [self.root, *([BUNDLED] if bundled else [])]

    def versions(self, name: str) -> list[tuple[int, Path]]:
        """All versions of ``name`` (user registry shadows bundled), oldest first."""
        found: dict[int, Path] = {}
        for root in reversed(self.roots):
            base = root / name
            if not base.is_dir():
                continue
            for d in base.iterdir():
                m = _VERSION_DIR.match(d.name)
                if m and (d / MANIFEST).exists():
                    found[int(m.group(1))] = d
        return sorted(found.items())

    def names(self) -> list[str]:
        """Model names available."""
        out = set()
        for root in self.roots:
            if root.is_dir():
                out |= {d.name for d in root.iterdir() if d.is_dir() and self.versions(d.name)}
        return sorted(out)

    def resolve(self, spec: str) -> ModelPackage:
        """``name``, ``name@version`` or a path → a verified package."""
        p = Path(spec)
        if p.exists() or os.sep in spec or spec.endswith(".zip"):
            return load_package(p)
        name, _, ver = spec.partition("@")
        versions = dict(self.versions(name))
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise PackageError(
                f"no model named {name!r} in {self.root} or the bundled models "
                f"(available: {known})"
            )
        if ver:
            if not ver.isdigit() or int(ver) not in versions:
                raise PackageError(f"{name} has no version {ver!r}; versions: {sorted(versions)}")
            return load_package(versions[int(ver)])
        return load_package(versions[max(versions)])

    def latest_version(self, name: str) -> int | None:
        """Newest version number of ``name``, or None."""
        v = self.versions(name)
        return v[-1][0] if v else None

    def publish(self, package: ModelPackage, name: str | None = None) -> ModelPackage:
        """Copy ``package`` in as the next version of ``name`` (atomically: a rename)."""
        name = name or package.name
        version = (self.latest_version(name) or 0) + 1
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
        try:
            manifest = package.manifest.model_copy(update={"name": name, "version": version})
            for fname, data in package.files.items():
                if fname != MANIFEST:
                    (tmp / fname).write_bytes(data)
            (tmp / MANIFEST).write_text(
                yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False)
            )
            target = base / f"v{version}"
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return load_package(target)
