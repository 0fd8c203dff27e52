"""BioImage Model Zoo (bioimage.io, spec 0.5) export and import.

Export
    A scopestream package becomes a bioimage.io zip: ``pytorch_state_dict``
    weights with the architecture's source file (`scopestream.inference.architectures`
    depends on torch only) and the ``onnx`` weights; parameterized input sizes
    (minimum and step from the network's size multiple, the minimum larger than
    twice the halo); the output halo; the fixed normalization constants as
    ``scale_linear`` pre- and postprocessing (never per-image statistics: the
    live pipeline does not normalize per frame either); test input/output
    tensors computed by the package itself; a README with the evaluation. The
    scopestream manifest rides along under ``config.scopestream`` so that an
    import restores the package exactly.
Import
    Our own export round-trips. Another tool's model (a CAREamics Noise2Void
    export, say) comes in when it has one input and one output tensor with
    single-plane or z-stack spatial axes and ONNX or TorchScript weights; its
    fixed normalization (``scale_linear``, ``fixed_zero_mean_unit_variance``)
    is taken as is. Per-image normalization (``zero_mean_unit_variance``,
    ``scale_range``) is frozen from the model's test input and reported, so
    that the user calibrates on their own data (``run --calibrate N``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from scopestream import __version__
from scopestream.inference.manifest import Architecture, Manifest, Normalization
from scopestream.inference.package import (
    MANIFEST,
    ModelPackage,
    PackageError,
    Registry,
    _sha256,
    load_package,
)

if TYPE_CHECKING:
    import os

FORMAT_VERSION = "0.5.12"

_CITES = {
    "n2v": ("Krull et al. Noise2Void - Learning denoising from single noisy images. "
            "CVPR 2019.", "10.1109/CVPR.2019.00223"),
    "n2v2": ("Höck et al. N2V2 - Fixing Noise2Void checkerboard artifacts. ECCV BIC 2022.",
             "10.48550/arXiv.2211.08512"),
    "care": ("Weigert et al. Content-aware image restoration. Nature Methods 2018.",
             "10.1038/s41592-018-0216-7"),
    "supervised": ("Ounkomol et al. Label-free prediction of three-dimensional fluorescence "
                   "images from transmitted-light microscopy. Nature Methods 2018.",
                   "10.1038/s41592-018-0111-2"),
    "pix2pix": ("Isola et al. Image-to-image translation with conditional adversarial "
                "networks. CVPR 2017.", "10.1109/CVPR.2017.632"),
}  # fmt: skip


class BioimageioError(ValueError):
    """A model that cannot be exported to or imported from bioimage.io."""


def _safe_id(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower() or "c"


def _min_size(mult: int, halo: int) -> int:
    """Smallest multiple of ``mult`` that leaves valid output after cropping the halo."""
    return (2 * halo // mult + 1) * mult


def _test_input(man: Manifest, seed: int = 0) -> np.ndarray:
    """A smooth, textured test image in data units (blobs on a background plus noise)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    mult, halo = man.size_multiple, man.halo
    spatial = [_min_size(m, h) + 2 * m for m, h in zip(mult, halo, strict=True)]
    if man.n_spatial == 3:
        spatial[0] = max(spatial[0], 8)
    base = gaussian_filter(rng.random(spatial), 3.0)
    base = (base - base.min()) / (np.ptp(base) or 1.0)
    img = base + 0.05 * rng.standard_normal(spatial)
    off, sc = man.input_norm.offset[0], man.input_norm.scale[0]
    data = (off + sc * img).astype(np.float32)
    return (
        data[None, None]
        if man.in_channels == 1
        else np.repeat(data[None, None], man.in_channels, axis=1)
    )


def _axes(man: Manifest, channels: list[str], *, output: bool) -> list[dict[str, Any]]:
    names = ["z", "y", "x"][-man.n_spatial :]
    axes: list[dict[str, Any]] = [
        {"type": "batch"},
        {"type": "channel", "channel_names": channels},
    ]
    for ax, mult, halo in zip(names, man.size_multiple, man.halo, strict=True):
        if output:
            entry: dict[str, Any] = {
                "type": "space",
                "id": ax,
                "size": {"tensor_id": "input", "axis_id": ax},
                "unit": "micrometer",
            }
            if halo and _min_size(mult, halo) > 2 * halo:
                entry["halo"] = int(halo)
        else:
            entry = {
                "type": "space",
                "id": ax,
                "size": {"min": _min_size(mult, halo), "step": int(mult)},
                "unit": "micrometer",
            }
        axes.append(entry)
    return axes


def _scale_linear(norm: Normalization, invert: bool, n: int) -> dict[str, Any]:
    off = np.resize(np.asarray(norm.offset, np.float64), n)
    sc = np.resize(np.asarray(norm.scale, np.float64), n)
    if invert:  # data = y * scale + offset
        gain, offset = sc, off
    else:  # y = (x - offset) / scale
        gain, offset = 1.0 / sc, -off / sc
    if n == 1 or (np.all(gain == gain[0]) and np.all(offset == offset[0])):
        kwargs: dict[str, Any] = {"gain": float(gain[0]), "offset": float(offset[0])}
    else:
        kwargs = {"axis": "channel", "gain": gain.tolist(), "offset": offset.tolist()}
    return {"id": "scale_linear", "kwargs": kwargs}


def _readme(pkg: ModelPackage) -> str:
    man = pkg.manifest
    t = man.training
    lines = [
        f"# {man.name} (version {man.version})",
        "",
        man.description or f"A scopestream {man.task} model ({man.spatial}).",
        "",
        f"- inputs: {', '.join(man.inputs)}; outputs: {', '.join(man.outputs)}",
        f"- training mode: {t.get('mode', 'unknown')}, {t.get('steps', '?')} steps",
        f"- normalization: input (x - {man.input_norm.offset}) / {man.input_norm.scale}, "
        f"output y * {man.output_norm.scale} + {man.output_norm.offset} (fixed constants)",
        "",
    ]
    m, b = t.get("metrics") or {}, t.get("baseline_metrics") or {}
    lines += [
        "# Validation",
        "",
        "Held-out fields (split by field of view or spatial block, never by neighbouring "
        "frames), metrics after an affine fit of the prediction to the target (CARE-style).",
        "",
    ]
    if m:
        lines += [
            "## Evaluation on held-out fields",
            "",
            "| metric | model | untouched input |",
            "|---|---|---|",
            *[f"| {k} | {m[k]} | {b.get(k, '')} |" for k in m],
            "",
        ]
    if "report.png" in pkg.files:
        lines += ["![input | prediction | target | error](report.png)", ""]
    lines += [f"Exported by scopestream {__version__}.", ""]
    return "\n".join(lines)


def export_bioimageio(
    pkg: ModelPackage, out: str | os.PathLike[str], *, authors: list[str] | None = None
) -> Path:
    """Write ``pkg`` as a validated bioimage.io (spec 0.5) zip at ``out``."""
    import torch
    from bioimageio.spec import InvalidDescr, load_description, save_bioimageio_package

    from scopestream.inference.architectures import __file__ as arch_file
    from scopestream.inference.architectures import arch_callable
    from scopestream.inference.predictor import Predictor

    man = pkg.manifest
    if man.architecture.kind == "external":
        raise BioimageioError(
            f"{man.name} was imported from elsewhere; export the original instead"
        )
    if man.spatial == "2.5d-t":
        raise BioimageioError("2.5d-t (temporal window) models have no bioimage.io export yet")
    out_path = Path(out)
    with tempfile.TemporaryDirectory() as tmpdir:
        d = Path(tmpdir)
        (d / "weights.pt").write_bytes(pkg.files[man.weights["torch"]])
        (d / "model.onnx").write_bytes(pkg.onnx_bytes())
        shutil.copy(arch_file, d / "architectures.py")
        x = _test_input(man)
        from scopestream.inference.backends import TorchBackend

        predictor = Predictor(pkg, TorchBackend(pkg, device="cpu"))
        data = x[0, 0] if man.in_channels == 1 else x[0]  # (Y, X), (Z, Y, X) or a window
        y = predictor.predict(data)[None].astype(np.float32)
        np.save(d / "test_input.npy", x)
        np.save(d / "test_output.npy", y)
        import tifffile

        tifffile.imwrite(d / "sample_input.tif", x[0])
        tifffile.imwrite(d / "sample_output.tif", y[0])
        (d / "README.md").write_text(_readme(pkg))
        extra = [
            n for n in ("report.png", "report.json", "losses.png", "losses.csv") if n in pkg.files
        ]
        for n in extra:
            (d / n).write_bytes(pkg.files[n])
        in_names = (
            [man.inputs[0].replace("*", "channel")]
            if man.in_channels == 1
            else [
                f"{man.inputs[0]}_dz{k - man.window // 2:+d}".replace("*", "channel")
                for k in range(man.in_channels)
            ]
        )
        out_names = [o.replace("*", "channel") for o in man.outputs]
        mode = str(man.training.get("mode", "supervised"))
        arch = man.architecture
        if mode == "n2v" and arch.params.get("n2v2"):
            mode = "n2v2"
        cite_text, doi = _CITES.get(mode, _CITES["supervised"])
        callable_name, kwargs = arch_callable(arch.kind, dict(arch.params))  # type: ignore[arg-type]
        if "pool_z" in kwargs:
            kwargs["pool_z"] = [bool(v) for v in kwargs["pool_z"]]
        rdf: dict[str, Any] = {
            "type": "model",
            "format_version": FORMAT_VERSION,
            "name": f"scopestream {man.name.replace('_', ' ').replace('.', ' ').strip()}",
            "description": (
                man.description
                or f"scopestream {man.task} model ({mode}, {man.spatial}): "
                f"{', '.join(in_names)} -> {', '.join(out_names)}"
            )[:1000],
            "authors": [{"name": a} for a in (authors or ["scopestream"])],
            "cite": [{"text": cite_text, "doi": doi}],
            "license": "MIT",
            "tags": ["scopestream", man.task, mode, man.spatial, "fluorescence-light-microscopy"],
            "documentation": {"source": "README.md"},
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [
                {
                    "id": "input",
                    "description": f"{', '.join(man.inputs)} in camera units",
                    "axes": _axes(man, in_names, output=False),
                    "test_tensor": {"source": "test_input.npy"},
                    "sample_tensor": {"source": "sample_input.tif"},
                    "preprocessing": [
                        {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                        _scale_linear(man.input_norm, False, 1),
                    ],
                }
            ],
            "outputs": [
                {
                    "id": "output",
                    "description": f"{', '.join(out_names)} in the target's units",
                    "axes": _axes(man, out_names, output=True),
                    "test_tensor": {"source": "test_output.npy"},
                    "sample_tensor": {"source": "sample_output.tif"},
                    "postprocessing": [
                        _scale_linear(man.output_norm, True, len(out_names)),
                        {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    ],
                }
            ],
            "weights": {
                "pytorch_state_dict": {
                    "source": "weights.pt",
                    "architecture": {
                        "source": "architectures.py",
                        "callable": callable_name,
                        "kwargs": kwargs,
                    },
                    "pytorch_version": torch.__version__.split("+")[0],
                },
                "onnx": {
                    "source": "model.onnx",
                    "opset_version": 17,
                    "parent": "pytorch_state_dict",
                },
            },
            "attachments": [{"source": n} for n in extra],
            "config": {
                "scopestream": {
                    "manifest": man.model_dump(mode="json"),
                    "package_sha256": pkg.sha256,
                }
            },
        }
        (d / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
        descr = load_description(d / "rdf.yaml", perform_io_checks=True)
        if isinstance(descr, InvalidDescr):
            raise BioimageioError(
                "the bioimage.io description does not validate:\n"
                + descr.validation_summary.format()
            )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_bioimageio_package(descr, output_path=out_path)
    return out_path


# -- import ------------------------------------------------------------------------------------


def _gain_offset(kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """``scale_linear``'s gain and offset as arrays of one length (scalars broadcast)."""
    g = np.atleast_1d(np.asarray(kw.gain, np.float64))
    o = np.atleast_1d(np.asarray(kw.offset, np.float64))
    n = max(g.size, o.size)
    return np.resize(g, n), np.resize(o, n)


def _norm_from_pre(ops: list[Any], test_input: np.ndarray) -> tuple[Normalization, list[str]]:
    """Our fixed input normalization from bioimage.io preprocessing (and notes)."""
    notes: list[str] = []
    norm = Normalization(source="identity")
    for op in ops:
        kind: str = op.id
        kw: Any = getattr(op, "kwargs", None)
        if kind == "ensure_dtype":
            continue
        if kind == "scale_linear":  # x * g + o = (x - (-o / g)) / (1 / g)
            g, o = _gain_offset(kw)
            norm = Normalization(offset=tuple(map(float, -o / g)), scale=tuple(map(float, 1 / g)))
        elif kind == "fixed_zero_mean_unit_variance":
            mean = np.atleast_1d(np.asarray(kw.mean, np.float64))
            std = np.atleast_1d(np.asarray(kw.std, np.float64))
            norm = Normalization(
                offset=tuple(float(v) for v in mean), scale=tuple(float(v) for v in std)
            )
        elif kind == "zero_mean_unit_variance":
            norm = Normalization(
                offset=(float(test_input.mean()),), scale=(float(test_input.std()) or 1.0,)
            )
            notes.append(
                "the original normalizes each image to zero mean / unit variance; scopestream "
                "never normalizes per frame, so the constants were frozen from the model's test "
                "input: calibrate on your data with `run --calibrate N`"
            )
        elif kind == "scale_range":
            lo_p = float(getattr(kw, "min_percentile", 0.0))
            hi_p = float(getattr(kw, "max_percentile", 100.0))
            norm = Normalization.from_percentiles(test_input, lo_p, hi_p, source="training")
            notes.append(
                f"the original scales each image by its {lo_p}/{hi_p} percentiles; frozen from "
                "the model's test input: calibrate on your data with `run --calibrate N`"
            )
        else:
            raise BioimageioError(f"preprocessing {kind!r} is not supported by scopestream")
    return norm, notes


def _norm_from_post(ops: list[Any]) -> Normalization:
    norm = Normalization(source="identity")
    for op in ops:
        kind: str = op.id
        kw: Any = getattr(op, "kwargs", None)
        if kind == "ensure_dtype":
            continue
        if kind == "scale_linear":
            g, o = _gain_offset(kw)
            norm = Normalization(offset=tuple(map(float, o)), scale=tuple(map(float, g)))
        elif kind == "fixed_zero_mean_unit_variance":
            # (y - mean) / std as a de-normalization (CAREamics writes its inverse so):
            # y / std - mean / std, a gain of 1/std and an offset of -mean/std
            m = np.atleast_1d(np.asarray(kw.mean, np.float64))
            sd = np.atleast_1d(np.asarray(kw.std, np.float64))
            n = max(m.size, sd.size)
            m, sd = np.resize(m, n), np.resize(sd, n)
            norm = Normalization(
                offset=tuple(float(v) for v in -m / sd), scale=tuple(float(v) for v in 1 / sd)
            )
        else:
            raise BioimageioError(f"postprocessing {kind!r} is not supported by scopestream")
    return norm


def _axis_kind(axes: list[Any]) -> tuple[list[str], int]:
    """Spatial axis ids and the channel count of a tensor description."""
    spatial, n_ch = [], 1
    for a in axes:
        if a.type == "channel":
            n_ch = len(a.channel_names)
        elif a.type == "space":
            spatial.append(str(a.id))
        elif a.type not in ("batch",):
            raise BioimageioError(f"axis type {a.type!r} is not supported (one image per call)")
    return spatial, n_ch


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_bioimageio(
    source: str | os.PathLike[str],
    registry: Registry,
    name: str | None = None,
    *,
    task: str | None = None,
    input_channel: str | None = None,
) -> tuple[ModelPackage, list[str]]:
    """A bioimage.io model (zip, folder or rdf.yaml) into the registry; returns it and notes.

    Another tool's model is a denoiser when ``task`` says so or its tags do
    (denoising, n2v, noise2void, care, restoration, …), else a stain model;
    ``input_channel`` names the channel it takes (a denoiser: any, by default; a
    stain model: brightfield)."""
    if task is not None and task not in ("denoise", "stain"):
        raise BioimageioError(f"--task must be denoise or stain, not {task!r}")
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    src = Path(source)
    if not src.exists():
        raise BioimageioError(f"{src} does not exist")
    try:
        descr = load_description(src, format_version="latest", perform_io_checks=True)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise BioimageioError(f"{src} is not a bioimage.io model package: {e}") from None
    if isinstance(descr, InvalidDescr):
        raise BioimageioError(
            f"{src} is not a valid bioimage.io description:\n" + descr.validation_summary.format()
        )
    if not isinstance(descr, v0_5.ModelDescr):
        raise BioimageioError(f"{src} describes a {descr.type}, not a model")
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise BioimageioError(
            f"{descr.name} has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; "
            "scopestream runs models with one of each"
        )
    cfg = descr.config.model_dump(mode="json") if descr.config is not None else {}
    own = cfg.get("scopestream")
    with tempfile.TemporaryDirectory() as tmpdir:
        d = Path(tmpdir)
        if own and descr.weights.pytorch_state_dict is not None:
            man = Manifest.model_validate(own["manifest"])
            files = {
                man.weights["torch"]: _read(descr.weights.pytorch_state_dict.source),
            }
            if descr.weights.onnx is not None:
                files[man.weights["onnx"]] = _read(descr.weights.onnx.source)
            notes: list[str] = []
        else:
            man, files, notes = _foreign(descr, src, task=task, input_channel=input_channel)
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        for att in descr.attachments:
            fname = Path(str(att.source)).name
            if fname in ("report.png", "report.json", "losses.png", "losses.csv"):
                (d / fname).write_bytes(_read(att.source))
                files[fname] = (d / fname).read_bytes()
        hashes = {n: _sha256(b) for n, b in files.items()}
        final = man.model_copy(update={"files_sha256": hashes})
        (d / MANIFEST).write_text(yaml.safe_dump(final.model_dump(mode="json"), sort_keys=False))
        try:
            pkg = load_package(d)
        except PackageError as e:
            raise BioimageioError(f"{src}: {e}") from None
        if PROBE_NOTE in notes:
            notes.remove(PROBE_NOTE)
            final, note = _probe_geometry(pkg, final)
            notes.append(note)
            (d / MANIFEST).write_text(
                yaml.safe_dump(final.model_dump(mode="json"), sort_keys=False)
            )
            pkg = load_package(d)
        notes.append(reproduces_test_output(pkg, descr))
        published = registry.publish(pkg, name or man.name)
    return published, notes


#: placeholder note: the size multiple and halo are to be measured on the network
PROBE_NOTE = "(probe the network's size multiple and halo)"


def _probe_geometry(pkg: ModelPackage, man: Manifest) -> tuple[Manifest, str]:
    """The size multiple and halo of an imported network, measured (see `probe_network`)."""
    from scopestream.inference.backends import make_backend

    backend = make_backend(pkg, "torch-cpu" if "torch" in man.weights else "onnxruntime")
    try:
        mult, radius = probe_network(backend, man.n_spatial, man.in_channels)
    except BioimageioError as e:
        raise BioimageioError(f"{man.name}: {e}") from None
    step = max(mult, 8)  # tiles are whole multiples of 8 px (and of the network's)
    halo = int(np.ceil(max(radius, 1) / step) * step)
    n = man.n_spatial
    new = man.model_copy(update={"size_multiple": (mult,) * n, "halo": (halo,) * n})
    return new, (
        f"size multiple {mult} and halo {halo} px measured on the network (its receptive "
        f"radius is {radius} px; the description gives a fixed size or no halo)"
    )


def probe_network(backend: Any, n_spatial: int, in_channels: int) -> tuple[int, int]:
    """(size multiple, receptive radius in px) of a network, by running it.

    The multiple: the smallest power of two m such that sizes 3m and 5m both run and
    give an output of the input's size (a U-Net of depth d needs 2^d). The radius: how
    far the output changes when one pixel in the middle of a random input does.
    """
    rng = np.random.default_rng(0)

    def run(size: int) -> np.ndarray | None:
        x = rng.normal(0, 1, (1, in_channels, *(size,) * n_spatial)).astype(np.float32)
        try:
            y = np.asarray(backend(x))
        except Exception:
            return None
        return y if y.shape[2:] == x.shape[2:] else None

    mult = next((m for m in (1, 2, 4, 8, 16, 32, 64) if run(3 * m) is not None
                 and run(5 * m) is not None), None)  # fmt: skip
    if mult is None:
        raise BioimageioError("it runs at no size up to 320 px; cannot tile it")
    for size in (129, 257, 513):
        size = int(np.ceil(size / mult) * mult) + (mult if mult > 1 else 0)
        x = rng.normal(0, 1, (1, in_channels, *(size,) * n_spatial)).astype(np.float32)
        c = size // 2
        bumped = x.copy()
        where: tuple[Any, ...] = (0, slice(None), *(c,) * n_spatial)
        bumped[where] += 5.0
        diff = np.abs(np.asarray(backend(bumped)) - np.asarray(backend(x))).max(axis=(0, 1))
        hit = np.argwhere(diff > 1e-5 * max(float(diff.max()), 1e-12))
        radius = int(np.abs(hit - c).max()) if hit.size else 0
        if radius < c - 1:  # the change stayed inside the input: that is the reach
            return mult, radius
    return mult, radius


#: how close an imported model's prediction of its own test input must be to the
#: package's test output: this fraction of the test output's range (max abs difference)
REPRODUCE_TOLERANCE = 1e-3


def _by_axes(arr: np.ndarray, axes: list[Any], *, keep_channel: bool) -> np.ndarray:
    """A test tensor as scopestream feeds / gets it: batch 0, channel first (or dropped)."""
    idx: list[Any] = []
    channel_first = None
    for i, a in enumerate(axes):
        drop_channel = a.type == "channel" and not keep_channel and arr.shape[i] == 1
        if a.type == "batch" or drop_channel:
            idx.append(0)
        else:
            idx.append(slice(None))
            if a.type == "channel":
                channel_first = i
    out = arr[tuple(idx)]
    if channel_first is not None:
        kept = [i for i, a in enumerate(axes) if not isinstance(idx[i], int)]
        out = np.moveaxis(out, kept.index(channel_first), 0)
    return np.asarray(out)


def reproduces_test_output(pkg: ModelPackage, descr: Any) -> str:
    """Run ``pkg`` on the description's test input; `BioimageioError` unless it gives the
    test output to `REPRODUCE_TOLERANCE` of the output's range (the note otherwise).

    A model whose weights were converted wrongly (traced in training mode, say), or whose
    normalization scopestream read otherwise than its authors meant, fails here instead
    of predicting wrong data later. Outputs cropped by a halo are compared where both
    have pixels (centred).
    """
    from scopestream.inference.backends import make_backend
    from scopestream.inference.predictor import Predictor

    inp, outp = descr.inputs[0], descr.outputs[0]
    m = pkg.manifest
    x = _by_axes(np.load(io.BytesIO(_read(inp.test_tensor.source))), list(inp.axes),
                 keep_channel=m.spatial.startswith("2.5d"))  # fmt: skip
    ref = _by_axes(
        np.load(io.BytesIO(_read(outp.test_tensor.source))), list(outp.axes), keep_channel=True
    ).astype(np.float32)
    backend = make_backend(pkg, "torch-cpu" if "torch" in m.weights else "onnxruntime")
    try:
        got = np.asarray(Predictor(pkg, backend).predict(x), np.float32)
    except Exception as e:
        raise BioimageioError(
            f"{descr.name}: running it on its own test input failed ({e}); not imported"
        ) from None
    if got.ndim == ref.ndim - 1:
        got = got[None]
    if got.ndim != ref.ndim or got.shape[0] != ref.shape[0]:
        raise BioimageioError(
            f"{descr.name}: its prediction of its test input has shape {got.shape}, its test "
            f"output {ref.shape}; not imported"
        )
    crop = tuple(
        slice((g - r) // 2, (g - r) // 2 + r) if g > r else slice(None)
        for g, r in zip(got.shape, ref.shape, strict=True)
    )
    got = got[crop]
    ref = ref[tuple(
        slice((r - g) // 2, (r - g) // 2 + g) if r > g else slice(None)
        for g, r in zip(got.shape, ref.shape, strict=True)
    )]  # fmt: skip
    span = float(np.ptp(ref)) or 1.0
    err = float(np.max(np.abs(got - ref))) / span
    if not np.isfinite(err) or err > REPRODUCE_TOLERANCE:
        raise BioimageioError(
            f"{descr.name}: its prediction of the package's own test input differs from the "
            f"test output by {err:.2%} of the output's range (at most "
            f"{REPRODUCE_TOLERANCE:.1%} is accepted): its weights or normalization are not "
            "what its authors ran; not imported"
        )
    return f"reproduces its test output to {err:.1e} of the output's range"


def _read(source: Any) -> bytes:
    """Bytes of a file referenced by a bioimage.io description (inside the zip or folder)."""
    from bioimageio.spec.utils import download

    reader = download(source)
    data: bytes = reader.read()
    return data


def _foreign(
    descr: Any, src: Path, *, task: str | None = None, input_channel: str | None = None
) -> tuple[Manifest, dict[str, bytes], list[str]]:
    """Manifest and weights for a model exported by another tool."""
    inp, outp = descr.inputs[0], descr.outputs[0]
    spatial_ax, n_in = _axis_kind(inp.axes)
    _, n_out = _axis_kind(outp.axes)
    if spatial_ax not in (["y", "x"], ["z", "y", "x"]):
        raise BioimageioError(f"{descr.name}: input axes {spatial_ax} are not (y, x) or (z, y, x)")
    if n_in != 1:
        raise BioimageioError(
            f"{descr.name} takes {n_in} input channels; scopestream feeds one channel"
        )
    test_in = np.load(io.BytesIO(_read(inp.test_tensor.source))).astype(np.float32)
    in_norm, notes = _norm_from_pre(list(inp.preprocessing), test_in)
    out_norm = _norm_from_post(list(outp.postprocessing))
    mult, halo = [], []
    fixed = False
    for a in inp.axes:
        if a.type != "space":
            continue
        size = a.size
        step = getattr(size, "step", None)
        if isinstance(size, int):  # a fixed size is what the authors ran, not a multiple
            fixed = True
        mult.append(int(step) if step else 1)
    out_halo = {str(a.id): int(getattr(a, "halo", 0) or 0) for a in outp.axes if a.type == "space"}
    declared = all(out_halo.get(ax, 0) > 0 for ax in spatial_ax)
    for ax, m in zip(spatial_ax, mult, strict=True):
        h = out_halo.get(ax, 0)
        halo.append(int(np.ceil(h / m) * m))
    if fixed or not declared:  # measured on the network after import (`_probe_network`)
        notes.append(PROBE_NOTE)
    files: dict[str, bytes] = {}
    weights: dict[str, str] = {}
    w = descr.weights
    if w.torchscript is not None:
        files["weights.torchscript.pt"] = _read(w.torchscript.source)
        weights["torch"] = "weights.torchscript.pt"
    if w.onnx is not None:
        files["model.onnx"] = _read(w.onnx.source)
        weights["onnx"] = "model.onnx"
    if not weights and w.pytorch_state_dict is not None:
        files["weights.torchscript.pt"] = _traced_state_dict(descr, in_norm.apply(test_in))
        weights["torch"] = "weights.torchscript.pt"
        notes.append("its pytorch_state_dict weights were traced to TorchScript in eval mode")
    if not weights:
        have = [k for k, v in w.model_dump(mode="json").items() if v]
        raise BioimageioError(
            f"{descr.name} has {have} weights; scopestream imports ONNX, TorchScript or "
            "pytorch_state_dict weights"
        )
    if task is None:
        tags = " ".join(str(t).lower() for t in descr.tags)
        said = any(
            k in tags for k in ("denois", "n2v", "noise2void", "n2n", "restor", "care")
        )
        task = "denoise" if n_out == 1 and said else "stain"
        why = "its tags say so" if said else "its tags name no denoising"
        notes.append(f"imported as a {task} model ({why}); --task says otherwise")
    elif task == "denoise" and n_out != 1:
        raise BioimageioError(f"{descr.name} has {n_out} output channels; a denoiser has one")
    default_in = "*" if task == "denoise" else "brightfield"
    chan_names = [str(n) for n in getattr(outp.axes[1], "channel_names", [])] or ["output"]
    man = Manifest(
        name=_safe_id(str(descr.id or descr.name)).replace("_", "-") or "imported",
        task=task,  # type: ignore[arg-type]
        description=str(descr.description)[:500],
        architecture=Architecture(kind="external", params={}),
        inputs=(input_channel or default_in,),
        outputs=(
            (input_channel or "*",) if task == "denoise" else tuple(chan_names[:n_out])
        ),
        spatial="3d" if len(spatial_ax) == 3 else "2d",
        size_multiple=tuple(mult),
        halo=tuple(halo),
        input_norm=in_norm,
        output_norm=out_norm if task == "stain" or out_norm.source != "identity" else in_norm,
        training={
            "imported_from": str(src),
            "bioimageio": {
                "name": str(descr.name),
                "id": str(descr.id) if descr.id else None,
                "format_version": str(descr.format_version),
                "authors": [str(a.name) for a in descr.authors],
            },
            "notes": notes,
        },
        weights=weights,  # type: ignore[arg-type]
    )
    if task == "denoise" and out_norm.source == "identity":
        notes.append(
            "the model's output carries no de-normalization: it is mapped back with the "
            "input's constants"
        )
    return man, files, notes


def _traced_state_dict(descr: Any, example: np.ndarray) -> bytes:
    """The package's ``pytorch_state_dict`` model (its architecture source, its weights)
    as TorchScript, traced in **eval** mode on ``example`` (the normalized test input).

    In training mode dropout and batch norm act otherwise, and a model traced so runs
    off (bioimage.io's own converter did: 2.8 %); the test-output check after import
    catches any conversion that still differs.
    """
    import torch
    from bioimageio.core.backends.pytorch_backend import load_torch_model

    try:
        net = load_torch_model(descr.weights.pytorch_state_dict, devices=["cpu"]).eval()
        x = torch.from_numpy(np.ascontiguousarray(example, np.float32))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shapes: checked after
            traced = torch.jit.trace(net, x, check_trace=False)  # type: ignore[no-untyped-call]
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    except Exception as e:
        raise BioimageioError(
            f"{descr.name}: its pytorch_state_dict model could not be built or traced: {e}"
        ) from None
    return buf.getvalue()


def summary_json(pkg: ModelPackage, notes: list[str]) -> str:
    """One JSON line about an imported model."""
    return json.dumps(
        {
            "model": pkg.name,
            "version": pkg.version,
            "package": str(pkg.path),
            "sha256": pkg.sha256,
            "notes": notes,
        }
    )
