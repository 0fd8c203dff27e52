"""Model packages (a directory or a zip) and the versioned registry.

A package holds ``manifest.yaml``, the PyTorch state dict (``weights.pt``) and
an ONNX export (``model.onnx``). The manifest lists every file's sha256; the
package's own hash is the sha256 of the manifest, so it identifies weights and
settings together. Loading checks every hash: a corrupted or edited package is
refused, never run.

Only the manifest and the files it lists are read; anything else in the
directory or zip is ignored (never loaded, never hashed). Before a byte of
them is read, their sizes (for a zip, the sizes its members *declare*) are
checked against `MAX_MANIFEST_BYTES` and `MAX_PACKAGE_BYTES`, so a zip bomb is
refused instead of being inflated into memory. A corrupt zip is a
`PackageError` like any other untrustworthy package.

A registry is a directory ``ROOT/<name>/v<version>/``. ``name`` resolves to
the newest version (user registry first, then the models bundled with
scopestream), ``name@3`` to that version, and a path to that package. A spec
is a path only if it looks like one (`is_path_spec`): a bare name always means
the registry, whatever the current directory holds. New versions are numbered
above the newest version in every root, so a retrained model never hides
behind a bundled one of the same number.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import shutil
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from scopestream.inference.manifest import Manifest

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch import nn

    from scopestream.inference.architectures import Network, UNet

MANIFEST = "manifest.yaml"
BUNDLED = Path(__file__).resolve().parents[1] / "models"
_VERSION_DIR = re.compile(r"^v(\d+)$")

MAX_MANIFEST_BYTES = 1 << 20
"""Largest ``manifest.yaml`` read (a real one is a few kB)."""
MAX_PACKAGE_BYTES = 2 << 30
"""Largest total size of the files a manifest lists (declared sizes, for a zip).

Every listed file is held in memory once loaded, so this bounds what one
package can cost; the bundled models are a few MB.
"""
# Everything zipfile and its decompressors raise for a damaged archive (bad CRC,
# truncated deflate stream, unsupported method, encrypted member, bad offsets).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    OSError,
    ValueError,
)
_PUBLISH_ATTEMPTS = 100


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

    def build_module(self) -> Network:
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


class _Members:
    """The files of a package directory or zip by base name: sizes now, bytes on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._infos: dict[str, zipfile.ZipInfo] = {}
        self._paths: dict[str, Path] = {}
        self._ambiguous: set[str] = set()
        self.sizes: dict[str, int] = {}
        if path.is_dir():
            self._paths = {f.name: f for f in path.iterdir() if f.is_file()}
            self.sizes = {n: f.stat().st_size for n, f in self._paths.items()}
            return
        if not zipfile.is_zipfile(path):
            raise PackageError(f"{path} is neither a model package directory nor a zip")
        try:
            self._zip = zipfile.ZipFile(path)
            for info in self._zip.infolist():
                if info.is_dir():
                    continue
                # base names only: a member called ../../x can never point outside
                name = PurePosixPath(info.filename.replace("\\", "/")).name
                if name in self._infos:
                    self._ambiguous.add(name)
                self._infos[name] = info
        except _ZIP_ERRORS as e:
            self.close()
            raise PackageError(f"{path} is a corrupt zip: {e}") from None
        # ZipInfo.file_size is what the archive declares; zipfile never inflates a
        # member past it, so checking it bounds memory before anything is read
        self.sizes = {n: i.file_size for n, i in self._infos.items()}

    def read(self, name: str) -> bytes:
        """The bytes of one member."""
        if self._zip is None:
            return self._paths[name].read_bytes()
        if name in self._ambiguous:
            raise PackageError(f"{self.path} holds more than one file named {name!r}")
        try:
            return self._zip.read(self._infos[name])
        except _ZIP_ERRORS as e:
            raise PackageError(f"{self.path} is a corrupt zip ({name}: {e})") from None

    def close(self) -> None:
        """Close the zip, if any."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _read_manifest(p: Path, members: _Members) -> bytes:
    if MANIFEST not in members.sizes:
        raise PackageError(f"{p} has no {MANIFEST}")
    if members.sizes[MANIFEST] > MAX_MANIFEST_BYTES:
        raise PackageError(
            f"{p}/{MANIFEST} is {members.sizes[MANIFEST]} bytes, over the "
            f"{MAX_MANIFEST_BYTES}-byte limit for a manifest"
        )
    return members.read(MANIFEST)


def package_sha256(path: str | os.PathLike[str]) -> str:
    """A package's identity (the sha256 of its manifest), reading nothing else.

    Cheap enough to poll; it verifies nothing (`load_package` does).
    """
    p = Path(path)
    members = _Members(p)
    try:
        return _sha256(_read_manifest(p, members))
    finally:
        members.close()


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Load and verify a package.

    Only the manifest and the files listed in its ``files_sha256`` are read;
    other files are ignored. Raises `PackageError` for anything that cannot be
    trusted: a missing, unlisted or edited file, an invalid manifest, a corrupt
    zip, or listed files that declare more than `MAX_PACKAGE_BYTES` together.
    """
    p = Path(path)
    if not p.exists():
        raise PackageError(f"model package {p} does not exist")
    members = _Members(p)
    try:
        return _load(p, members)
    finally:
        members.close()


def _load(p: Path, members: _Members) -> ModelPackage:
    raw = _read_manifest(p, members)
    try:
        manifest = Manifest.model_validate(yaml.safe_load(raw))
    except (yaml.YAMLError, ValidationError) as e:
        raise PackageError(f"{p}/{MANIFEST} is not a valid manifest: {e}") from None
    for role, fname in manifest.weights.items():
        if fname not in members.sizes:
            raise PackageError(f"{p}: the {role} weights {fname!r} are missing")
    for fname in manifest.files_sha256:
        if fname not in members.sizes:
            raise PackageError(f"{p}: {fname} is listed in the manifest but missing")
    unlisted = [f for f in manifest.weights.values() if f not in manifest.files_sha256]
    if unlisted:
        raise PackageError(f"{p}: weights {unlisted} have no sha256 in the manifest")
    declared = sum(members.sizes[f] for f in manifest.files_sha256)
    if declared > MAX_PACKAGE_BYTES:
        raise PackageError(
            f"{p}: its files declare {declared} bytes, over the {MAX_PACKAGE_BYTES}-byte "
            "limit for a model package; refusing to read them"
        )
    files = {MANIFEST: raw}
    for fname, digest in manifest.files_sha256.items():
        data = members.read(fname)
        if _sha256(data) != digest:
            raise PackageError(
                f"{p}: {fname} does not match its sha256 in the manifest (corrupted or edited); "
                "refusing to run it"
            )
        files[fname] = data
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


#: the channel list of a model spec: ``denoise:nuclei`` or ``denoise@2:nuclei,membrane``
_CHANNELS_TAIL = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")


def split_model_spec(spec: str) -> tuple[str, tuple[str, ...] | None]:
    """``NAME[@VERSION][:CHANNEL,...]`` (or a path with the tail) → (model spec, channels).

    The channels say which of the source's channels the model runs on, overriding
    what it was trained for (`scopestream.inference.engine.check_channels`); None
    when the spec names none. A tail that holds a path separator is part of the
    path (``C:\\models\\denoise``), never a channel list.
    """
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or len(head) == 1 or not _CHANNELS_TAIL.fullmatch(tail):
        return spec, None
    return head, tuple(tail.split(","))


def is_path_spec(spec: str) -> bool:
    """Whether a model spec names a package on disk rather than a registry model.

    A path must look like one: ``.``/``..`` or starting with ``./``, ``../`` or
    ``~``, absolute, holding a path separator, or ending in ``.zip``. A bare
    name (``denoise``, ``denoise@2``) is always the registry's, even when the
    current directory holds a ``denoise/``: what runs must not depend on where
    the command was started.
    """
    seps = {"/", os.sep, *([os.altsep] if os.altsep else [])}
    return (
        spec in (".", "..")
        or spec.startswith("~")  # ./ and ../ are covered by the separators
        or os.path.isabs(spec)
        or any(sep in spec for sep in seps)
        or spec.lower().endswith(".zip")
    )


class Registry:
    """Named, versioned models in ``root`` (plus read-only roots: the bundled models).

    Parameters
    ----------
    root
        The registry `publish` writes to (default `default_registry`).
    bundled
        Also read the models bundled with scopestream.
    read_only_roots
        More registries to read (never written), searched after ``root`` and
        before the bundled models; ``root`` shadows them for equal versions.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        bundled: bool = True,
        read_only_roots: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.root = Path(root) if root is not None else default_registry()
        self.roots = [
            self.root,
            *(Path(r) for r in read_only_roots),
            *([BUNDLED] if bundled else []),
        ]

    def versions(self, name: str) -> list[tuple[int, Path]]:
        """All versions of ``name`` (earlier roots shadow later ones), oldest first."""
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
        """``name``, ``name@version`` or a path (see `is_path_spec`) → a verified package."""
        if is_path_spec(spec):
            return load_package(Path(spec).expanduser())
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

    def latest(self, name: str) -> tuple[int, Path] | None:
        """Newest version of ``name`` and its directory, or None."""
        v = self.versions(name)
        return v[-1] if v else None

    def latest_version(self, name: str) -> int | None:
        """Newest version number of ``name``, or None."""
        head = self.latest(name)
        return head[0] if head else None

    def _next_version(self, name: str) -> int:
        # above every v<N> of every root, loadable or not: a retrain must not reuse
        # the number of a bundled model (it would shadow it with the same number),
        # and a broken v3/ left behind must not make every later publish fail
        newest = 0
        for root in self.roots:
            base = root / name
            if base.is_dir():
                for d in base.iterdir():
                    m = _VERSION_DIR.match(d.name)
                    if m:
                        newest = max(newest, int(m.group(1)))
        return newest + 1

    def publish(self, package: ModelPackage, name: str | None = None) -> ModelPackage:
        """Copy ``package`` in as the next version of ``name`` (atomically: a rename).

        The version is one above the newest in any root (`roots`), the bundled
        models included when this registry reads them.
        """
        name = name or package.name
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
        try:
            for fname, data in package.files.items():
                if fname != MANIFEST:
                    (tmp / fname).write_bytes(data)
            for _ in range(_PUBLISH_ATTEMPTS):
                version = self._next_version(name)
                manifest = package.manifest.model_copy(update={"name": name, "version": version})
                (tmp / MANIFEST).write_text(
                    yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False)
                )
                target = base / f"v{version}"
                try:
                    os.rename(tmp, target)
                    break
                except OSError:
                    if not target.exists():
                        raise
                    # another publisher took this number between the scan and the rename
            else:
                raise PackageError(f"no free version number for {name} in {base}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return load_package(target)
