"""Train a model from saved data, evaluate it on held-out fields, package and register it."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream import __version__
from scopestream.inference.manifest import Architecture, Manifest, Normalization
from scopestream.training.data import (
    DataError,
    FieldData,
    PatchSampler,
    Region,
    load_run_fields,
    load_tiff_pairs,
    split_regions,
)
from scopestream.training.metrics import affine_fit, image_metrics, mean_metrics, region_metrics
from scopestream.training.n2v import REPLACE

if TYPE_CHECKING:
    from scopestream.inference.guard import Fingerprint
    from scopestream.inference.package import ModelPackage

MODES = ("n2v", "care", "supervised", "pix2pix", "cyclegan", "stable", "gpt")
GANS = ("patch", "multiscale")
SPATIAL = ("2d", "2.5d-z", "3d")


@dataclass
class TrainConfig:
    """Everything one training needs (saved into the model's manifest)."""

    task: str
    mode: str
    out: str  # REGISTRY/NAME
    data: list[str] = field(default_factory=list)  # OME-Zarr runs (one field each)
    inputs: str | None = None  # TIFF file or folder (unpaired modes: domain A)
    targets: str | None = None
    #: cyclegan/stable: domain B's TIFF file or folder (no pairs with ``inputs``)
    inputs_b: str | None = None
    #: cyclegan/stable from paired data (``data`` or ``inputs`` + ``targets``): split so
    #: no block or field gives both domains (`unpaired_split`); the test pairs evaluate
    unpaired: bool = False
    #: cyclegan: "resnet" (the reference: 9 blocks, 4·base filters, instance norm; whole
    #: frames live) or "unet" (our U-Net with 2·base: no norm, tiles exactly live)
    generator: str = "resnet"
    n_info: int = 3  # stable: channels of the information map Z
    upsample: str = "dysample"  # stable: dysample | bilinear (the seed's ablation)
    info_consistency: bool = True  # stable: False is the seed's ablation
    #: cyclegan/stable: the cycle loss's weight (None: cyclegan 10, stable 5)
    cycle_weight: float | None = None
    #: stable: steps over which the cycle weight grows along a sigmoid (None or 0: no
    #: ramp, the full weight from the start; the seed ramps it for its calcium data only)
    ramp_steps: int | None = None
    #: gpt: the first level whose transitions are attention (0: full resolution, the
    #: seed's; 2: feature maps of ¼ and ⅛ the patch, and the bottom)
    attention_from: int = 2
    dropout: float = 0.5  # gpt: dropout of its convolutions and attention (the seed's)
    input_channel: str | None = None
    target_channels: list[str] = field(default_factory=list)
    eval_target: str | None = None  # e.g. truth:nuclei (evaluation only)
    patch: int = 64
    spatial: str = "2d"  # 2d | 2.5d-z (a window of z-planes in) | 3d (sub-volumes)
    window: int = 5  # z-planes per 2.5d window or 3d patch
    init_from: str | None = None  # pix2pix: a supervised model to start the generator from
    #: pix2pix's discriminator: "patch" (one PatchGAN, L1 reconstruction) or "multiscale"
    #: (pix2pixHD as in MMV_Im2Im: two scales, feature matching, MSE reconstruction)
    gan: str = "patch"
    #: pix2pix: the adversarial term's weight (None: 0.05 next to patch's L1; 1, the
    #: seed's, for multiscale, whose reconstruction weighs ``rec_weight``)
    gan_weight: float | None = None
    fm_weight: float = 10.0  # multiscale: feature matching (the seed's 10)
    rec_weight: float = 20.0  # multiscale: the MSE reconstruction (the seed's fine-tune: 20)
    batch: int = 16
    max_steps: int = 1000
    epochs: int | None = None
    #: None: 4e-4; multiscale pix2pix: the seed's 2e-5 from a supervised model (--init-from,
    #: the fine-tune), 2e-4 from scratch
    lr: float | None = None
    loss: str = "l2"
    ssim_weight: float = 0.0
    base: int = 16
    max_channels: int | None = None
    #: n2v: which network: "n2v" (the plain U-Net of the original N2V: top skip,
    #: max-pooling) or "n2v2" (no top skip, blur-pool: no checkerboard artefacts);
    #: on real data (``bench quality``) n2v gains 1.4 dB more at 300 steps
    variant: str = "n2v"
    #: n2v: the fraction of each patch's pixels masked, and what replaces them
    #: ("median" of the 5×5 neighbourhood, N2V2; "uniform": a random neighbour, N2V);
    #: 1.5 % (N2V's setting) gains 0.8 dB over the 0.2 % of N2V2 at 300 steps
    mask_fraction: float = 0.015
    mask_replace: str = "median"
    #: how inputs and targets are scaled (`NORMS`), computed on the training data and
    #: frozen in the package (live prediction uses the same constants, never per frame);
    #: "" is the mode's default: ``standard`` for the denoisers (n2v and care: +0.8 to
    #: +2.2 dB over percentile on the real time-lapse, ``bench quality``), ``percentile``
    #: for the stain modes
    norm: str = ""
    #: draw half the training patches as the brighter of two (None: the mode's default,
    #: on for care/supervised; off for n2v, where it cost 0.4 dB on the real time-lapse
    #: at 5 photons: the dark background is as much a denoiser's job as the cells)
    foreground: bool | None = None
    target_norm: str = ""
    seed: int = 0
    devices: int = 1
    num_nodes: int = 1
    val_every: int = 100
    patience: int = 8
    work_dir: str | None = None
    resume: bool = True
    #: publish even when the held-out result is worse than the untouched input
    force: bool = False

    def __post_init__(self) -> None:
        multiscale = self.gan == "multiscale"
        if self.gan_weight is None:
            self.gan_weight = 1.0 if multiscale else 0.05
        if self.lr is None:
            unpaired = {"cyclegan": 2e-4, "stable": 3e-4}
            if self.mode in unpaired:
                self.lr = unpaired[self.mode]
            else:
                self.lr = (2e-5 if self.init_from else 2e-4) if multiscale else 4e-4
        if self.cycle_weight is None and self.mode in ("cyclegan", "stable"):
            self.cycle_weight = 10.0 if self.mode == "cyclegan" else 5.0
        denoiser = self.mode in ("n2v", "care")
        if not self.norm:
            self.norm = "standard" if denoiser else "percentile"
        if not self.target_norm:
            self.target_norm = "standard" if denoiser else "percentile"
        if self.foreground is None:
            self.foreground = self.mode != "n2v"

    def key(self) -> str:
        """Identity of this training (its checkpoints live under it, so it can resume)."""
        d = asdict(self)
        for k in ("work_dir", "resume", "devices", "num_nodes", "force"):
            d.pop(k)
        defaults = {
            "gan": "patch",  # the options after pix2pixHD: older trainings keep their key
            "fm_weight": 10.0,
            "rec_weight": 20.0,
            "inputs_b": None,  # ... and after the unpaired modes
            "unpaired": False,
            "generator": "resnet",
            "n_info": 3,
            "upsample": "dysample",
            "info_consistency": True,
            "cycle_weight": None,
            "ramp_steps": None,
            "attention_from": 2,  # ... and after gpt
            "dropout": 0.5,
            "norm": "percentile",
            "target_norm": "percentile",
            "mask_fraction": 0.002,  # the masking before these options (with "n2v2")
            "mask_replace": "median",
        }
        if d["foreground"]:
            d.pop("foreground")  # the only behaviour before the option: the same key
        for k, v in defaults.items():  # the settings of older trainings keep their key
            if d[k] == v:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _load(cfg: TrainConfig) -> list[FieldData]:
    if cfg.mode not in MODES:
        raise DataError(f"--mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.variant not in ("n2v", "n2v2"):
        raise DataError(f"--variant must be n2v or n2v2, got {cfg.variant!r}")
    if cfg.mask_replace not in REPLACE:
        raise DataError(
            f"--mask-replace must be one of {', '.join(REPLACE)}, got {cfg.mask_replace!r}"
        )
    if not 0 < cfg.mask_fraction < 0.5:
        raise DataError(f"--mask-fraction must be in (0, 0.5), got {cfg.mask_fraction}")
    for flag, v in (("--norm", cfg.norm), ("--target-norm", cfg.target_norm)):
        if v not in NORMS:
            raise DataError(f"{flag} must be one of {', '.join(NORMS)}, got {v!r}")
    if cfg.spatial not in SPATIAL:
        raise DataError(f"--spatial must be one of {SPATIAL}, got {cfg.spatial!r}")
    if cfg.spatial != "2d" and cfg.task != "stain":
        raise DataError(
            "2.5d-z and 3d training is for --task stain; the denoiser is 2D (it runs per plane)"
        )
    if cfg.gan not in GANS:
        raise DataError(f"--gan must be one of {GANS}, got {cfg.gan!r}")
    if cfg.gan != "patch" and cfg.mode != "pix2pix":
        raise DataError(f"--gan {cfg.gan} is pix2pix's discriminator: give --mode pix2pix")
    if cfg.mode == "gpt" and (cfg.task != "stain" or cfg.spatial == "3d"):
        raise DataError("--mode gpt is for --task stain, 2d or 2.5d-z (a window of z-planes in)")
    if cfg.mode in ("cyclegan", "stable") and cfg.task != "stain":
        raise DataError(f"--mode {cfg.mode} is for --task stain (A → B translation)")
    if cfg.mode == "pix2pix" and cfg.task != "stain":
        raise DataError("--mode pix2pix is for --task stain (label-free prediction)")
    if cfg.mode in ("n2v", "care") and cfg.task != "denoise":
        raise DataError(f"--mode {cfg.mode} is for --task denoise")
    needs_target = cfg.mode != "n2v"
    if cfg.data:
        targets = list(cfg.target_channels)
        if needs_target and not targets:
            raise DataError(f"--mode {cfg.mode} needs --target-channel (pairs)")
        # several stains at once: a run may lack some (its loss is masked to those it has)
        partial = cfg.mode in ("supervised", "gpt") and len(targets) > 1
        fields = [
            f
            for p in cfg.data
            for f in load_run_fields(p, cfg.input_channel, targets, allow_missing=partial)
        ]
        for name in targets:
            if fields and all(name.rpartition(":")[2] in f.missing_targets for f in fields):
                raise DataError(f"no run has the target channel {name!r}")
    elif cfg.inputs:
        if needs_target and not cfg.targets:
            raise DataError(f"--mode {cfg.mode} needs --targets (pairs)")
        fields = load_tiff_pairs(cfg.inputs, cfg.targets if needs_target else None)
    else:
        raise DataError("give training data: --data RUN.ome.zarr or --inputs (and --targets)")
    return fields


def _eval_fields(cfg: TrainConfig, fields: list[FieldData]) -> list[FieldData]:
    """Fields with the evaluation target (ground truth when given, else the training target)."""
    if cfg.eval_target and cfg.data:
        target = [cfg.eval_target]
        return [f for p in cfg.data for f in load_run_fields(p, cfg.input_channel, target)]
    return fields


#: ``train --preset``: the network's size. ``fast`` is the live default (a 512² frame
#: predicts at camera rate on a CPU); ``quality`` is larger (better on real data, slower)
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"base": 16, "max_channels": None},
    "quality": {"base": 32, "max_channels": 128},
}

#: normalizations (MMV_Im2Im's study), each an affine map frozen in the package:
#: ``percentile``: the 1st/99.8th percentiles to 0/1 (the default);
#: ``percentile-sym``: the 0.5th/99.5th to -1/1 (the seeds' setting);
#: ``standard``: z-score; ``center``: z-score over the central 32 planes of each
#: z-stack (the whole stack when it has fewer; 2D data: as ``standard``)
NORMS = ("percentile", "percentile-sym", "standard", "center")
#: planes of the central chunk of ``center``
CENTER_PLANES = 32


def _norm_from(
    fields: list[FieldData], regions: list[Region], which: int | None, method: str = "percentile"
) -> Normalization:
    """Constants of ``method`` (`NORMS`) from (a sample of) the training regions."""
    vals = []
    rng = np.random.default_rng(0)
    for r in regions[:64]:
        f = fields[r.field]
        if which is not None and f.target_names[which] in f.missing_targets:
            continue  # this field has no such stain
        arr = f.input if which is None else f.targets[which]
        frames = np.arange(f.n)
        if method == "center" and f.z > 1:  # planes of the central chunk of each stack
            lo = max(0, f.z // 2 - CENTER_PLANES // 2)
            hi = min(f.z, lo + CENTER_PLANES)
            frames = frames[(frames % f.z >= lo) & (frames % f.z < hi)]
        for i in rng.choice(frames, size=min(4, frames.size), replace=False):
            vals.append(np.asarray(arr[int(i), r.y, r.x], np.float32).ravel()[::7])
    if not vals:
        raise DataError("no training field has this target: nothing to normalize it by")
    v = np.concatenate(vals)
    if method == "percentile":
        return Normalization.from_percentiles(v, source="training")
    if method == "percentile-sym":  # [p0.5, p99.5] -> [-1, 1]
        p_lo, p_hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
        half = (p_hi - p_lo) / 2 if p_hi > p_lo else 1.0
        return Normalization(offset=((p_lo + p_hi) / 2,), scale=(half,), source="training")
    mean, std = float(v.mean()), float(v.std())
    return Normalization(offset=(mean,), scale=(std if std > 0 else 1.0,), source="training")


def training_fingerprint(fields: list[FieldData], regions: list[Region]) -> Fingerprint:
    """The `Fingerprint` of the training fields' inputs (up to 64 frames spread over them).

    A pixel size of exactly 1 µm is what a recording without a pixel-size
    calibration says, so it is taken as unknown; fields of different pixel sizes
    leave it unknown too.
    """
    from scopestream.inference.guard import fingerprint_of

    used = sorted({r.field for r in regions}) or list(range(len(fields)))
    per = max(1, 64 // len(used))
    frames = []
    for i in used:
        n = fields[i].n
        for k in np.unique(np.linspace(0, n - 1, min(n, per)).round().astype(int)):
            frames.append(np.asarray(fields[i].input[int(k)]))
    ctx = [fields[i].context for i in used]
    sizes = {c.get("pixel_size_um") for c in ctx} - {None, 1.0}
    dtypes = {c.get("dtype") for c in ctx} - {None}
    return fingerprint_of(
        frames,
        channels=[ch for c in ctx for ch in c.get("channels", [])],
        pixel_size_um=sizes.pop() if len(sizes) == 1 else None,
        exposures_ms=[e for c in ctx for e in c.get("exposures_ms", [])],
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
    )


def _architecture(cfg: TrainConfig, n_out: int) -> Architecture:
    if cfg.task == "denoise":
        params: dict[str, Any] = {"base": cfg.base}
        if cfg.max_channels:
            params["max_channels"] = cfg.max_channels
        if cfg.mode == "n2v" and cfg.variant == "n2v2":
            params["n2v2"] = True
        return Architecture(kind="denoise_unet", params=params)
    if cfg.mode == "gpt":  # the seed's widths at the fast preset's base (16 → 32)
        gpt: dict[str, Any] = {
            "out_channels": n_out, "base": 2 * cfg.base,
            "attention_from": cfg.attention_from, "dropout": cfg.dropout,
        }  # fmt: skip
        if cfg.spatial == "2.5d-z":
            gpt["in_channels"] = cfg.window
        return Architecture(kind="gpt", params=gpt)
    params = {"base": cfg.base, "out_channels": n_out}
    if cfg.max_channels:
        params["max_channels"] = cfg.max_channels
    if cfg.spatial == "2.5d-z":
        params["in_channels"] = cfg.window
    elif cfg.spatial == "3d":
        # pool z only while the patch stays at least 4 planes deep (stacks are shallow)
        n_z = max(0, min(3, int(np.log2(cfg.window)) - 2))
        params.update(dims=3, pool_z=[i < n_z for i in range(3)])
    return Architecture(kind="stain_unet", params=params)


def _figure(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """PNG: input | prediction | target | |error|, one row per held-out field."""
    import imageio.v3 as iio

    def u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return (np.clip((a - lo) / (hi - lo or 1.0), 0, 1) * 255).astype(np.uint8)

    lines = []
    for inp, pred, tgt in rows[:3]:
        crop = tuple(
            slice(max(0, (s - 192) // 2), max(0, (s - 192) // 2) + 192) for s in inp.shape
        )
        inp, pred, tgt = inp[crop], pred[crop], tgt[crop]  # keeps the figure small
        t_lo, t_hi = np.percentile(tgt, [1, 99.8])
        i_lo, i_hi = np.percentile(inp, [1, 99.8])
        p_fit = affine_fit(pred, tgt)
        err = np.abs(p_fit - tgt)
        gap = np.full((inp.shape[0], 4), 255, np.uint8)
        lines.append(
            np.concatenate(
                [
                    u8(inp, i_lo, i_hi),
                    gap,
                    u8(p_fit, t_lo, t_hi),
                    gap,
                    u8(tgt, t_lo, t_hi),
                    gap,
                    u8(err, 0, (t_hi - t_lo) / 2),
                ],
                axis=1,
            )
        )
        lines.append(np.full((4, lines[-1].shape[1]), 255, np.uint8))
    buf = io.BytesIO()
    iio.imwrite(buf, np.concatenate(lines[:-1], axis=0), extension=".png")
    return buf.getvalue()


def _eval_units(f: FieldData, spatial: str, window: int) -> list[tuple[int, Any, int]]:
    """What the model predicts at once: (index, planes to read, plane the target is for)."""
    if spatial == "2d":
        return [(i, slice(i, i + 1), i) for i in range(f.n)]
    stacks = range(0, f.n - f.z + 1, f.z)
    if spatial == "3d":
        return [(s, slice(s, s + f.z), s + f.z // 2) for s in stacks]
    if f.z < window:
        raise DataError(f"{f.name} has stacks of {f.z} planes; the model needs {window}")
    h = window // 2
    return [
        (s + k, slice(s + k - h, s + k + h + 1), s + k) for s in stacks for k in range(h, f.z - h)
    ]


class NotPublished(RuntimeError):
    """A trained version whose held-out result is worse than the untouched input."""


def worse_than_input(
    task: str, metrics: dict[str, float], baseline: dict[str, float]
) -> str | None:
    """Why a model is worse than its input on the held-out data (None if it is not, or
    nothing was measured): PSNR for a denoiser, Pearson r for a stain model (its input,
    another kind of image, is compared by correlation)."""
    key, unit = ("psnr", " dB") if task == "denoise" else ("pearson", "")
    if key not in metrics or key not in baseline:
        return None
    if metrics[key] >= baseline[key]:
        return None
    label = "PSNR" if key == "psnr" else "Pearson r"
    return (
        f"its held-out {label} is {metrics[key]:g}{unit}, below the untouched input's "
        f"{baseline[key]:g}{unit}"
    )


def evaluate(
    package: ModelPackage,
    fields: list[FieldData],
    regions: list[Region],
    *,
    backend: str = "auto",
    target_index: int = 0,
    max_images: int = 24,
) -> dict[str, Any]:
    """Metrics of the model on ``regions`` vs the target, next to the untouched input's.

    ``target_index``: a stain model's output channel, scored against the fields' target
    of the same index (a denoiser has one of each)."""
    from scopestream.inference.backends import make_backend
    from scopestream.inference.predictor import Predictor

    if not all(f.targets for f in fields):
        return {
            "metrics": {},
            "baseline_metrics": {},
            "baseline": "none: no target to compare with (give --eval-target, e.g. truth:nuclei)",
            "images": [],
            "figure_png": b"",
        }
    predictor = Predictor(package, make_backend(package, backend))
    rows: list[dict[str, float | None]] = []
    base_rows: list[dict[str, float | None]] = []
    figs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    per_image = []
    man = package.manifest
    ch = target_index if man.task == "stain" else 0
    for r in regions:
        f = fields[r.field]
        if f.target_names and f.target_names[min(ch, len(f.target_names) - 1)] in (
            f.missing_targets
        ):
            continue  # the field has no such stain to compare with
        units = _eval_units(f, man.spatial, man.window)
        step = max(1, len(units) // max(1, max_images // max(1, len(regions))))
        for i, planes, centre in units[::step]:
            data = np.asarray(f.input[planes], np.float32)
            if man.spatial == "2d":
                data = data[0]
            out = predictor.predict(data)[ch]
            if man.spatial == "3d":
                pred, inp = out[:, r.y, r.x], data[:, r.y, r.x]
                tgt = np.asarray(f.targets[ch][planes, r.y, r.x], np.float32)
            else:
                pred = out[r.y, r.x]
                inp = np.asarray(f.input[centre, r.y, r.x], np.float32)
                tgt = np.asarray(f.targets[ch][centre, r.y, r.x], np.float32)
            m: dict[str, float | None] = dict(image_metrics(pred, tgt))
            b: dict[str, float | None] = dict(image_metrics(inp, tgt))
            if man.task == "stain":  # the seeds' object metrics: count, centroids, IoU
                m.update(region_metrics(pred, tgt))
            rows.append(m)
            base_rows.append(b)
            per_image.append(
                {
                    "field": f.name,
                    "frame": int(i),
                    "y": [r.y.start, r.y.stop],
                    "x": [r.x.start, r.x.stop],
                    "model": m,
                    "input": b,
                }
            )
            if len(figs) < 4:
                mid = inp.shape[0] // 2
                figs.append((inp[mid], pred[mid], tgt[mid]) if inp.ndim == 3 else (inp, pred, tgt))
    return {
        "metrics": mean_metrics(rows),
        "baseline_metrics": mean_metrics(base_rows),
        "baseline": "the untouched input",
        "images": per_image,
        "figure_png": _figure(figs) if figs else b"",
    }


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on the held-out split, package, and publish to the registry."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from scopestream.inference.architectures import receptive_radius
    from scopestream.inference.package import save_package
    from scopestream.inference.predictor import halo_for
    from scopestream.training.module import PatchDataset, TrainModule

    if cfg.mode in ("cyclegan", "stable"):
        from scopestream.training.translation import train_unpaired

        return train_unpaired(cfg, progress)
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fields = _load(cfg)
    splits = split_regions(fields, cfg.patch, cfg.seed)
    in_norm = _norm_from(fields, splits["train"], None, cfg.norm)
    n_out = len(fields[0].targets) if cfg.mode != "n2v" else 1
    tgt_norm = None
    if cfg.mode != "n2v":
        per = [_norm_from(fields, splits["train"], k, cfg.target_norm) for k in range(n_out)]
        tgt_norm = Normalization(
            offset=tuple(p.offset[0] for p in per),
            scale=tuple(p.scale[0] for p in per),
            source="training",
        )
    arch = _architecture(cfg, n_out)
    init = None
    if cfg.init_from:
        init = _init_package(cfg, arch, fields)
        arch = init.manifest.architecture
        in_norm, tgt_norm = init.manifest.input_norm, init.manifest.output_norm
    sp, win = cfg.spatial, cfg.window
    train_s = PatchSampler(
        fields, splits["train"], cfg.patch, seed=cfg.seed, spatial=sp, window=win,
        foreground=bool(cfg.foreground),
    )  # fmt: skip
    val_s = PatchSampler(
        fields, splits["val"], cfg.patch, seed=cfg.seed + 1, augment=False, spatial=sp, window=win
    )
    steps = cfg.max_steps if cfg.epochs is None else cfg.epochs * 200
    # pix2pix steps two optimizers per batch; Lightning counts both
    per_batch = 2 if cfg.mode == "pix2pix" else 1
    masking: dict[str, Any] = {"mask_fraction": cfg.mask_fraction}
    masking["mask_replace"] = cfg.mask_replace
    ds_train = PatchDataset(train_s, cfg.mode, in_norm, tgt_norm, steps * cfg.batch, **masking)
    ds_val = PatchDataset(val_s, cfg.mode, in_norm, tgt_norm, max(cfg.batch * 4, 64), **masking)
    work = (
        Path(cfg.work_dir or Path.home() / ".scopestream" / "train")
        / f"{Path(cfg.out).name}-{cfg.key()}"
    )
    ckpt_dir = work / "checkpoints"
    module = TrainModule(
        arch.kind,
        dict(arch.params),
        cfg.mode,
        lr=float(cfg.lr or 4e-4),
        loss=cfg.loss,
        ssim_weight=cfg.ssim_weight,
        max_steps=steps,
        gan_weight=float(cfg.gan_weight or 0.0),
        gan=cfg.gan,
        fm_weight=cfg.fm_weight,
        rec_weight=cfg.rec_weight,
    )
    if init is not None:
        module.net.load_state_dict(init.build_module().state_dict())
    gpu = torch.cuda.is_available()
    best = ModelCheckpoint(
        dirpath=ckpt_dir, monitor="val_loss", save_top_k=1, save_last=True, filename="best"
    )
    trainer = L.Trainer(
        max_steps=steps * per_batch,
        accelerator="gpu" if gpu else "cpu",
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="ddp" if cfg.devices * cfg.num_nodes > 1 else "auto",
        precision="16-mixed" if gpu else "32-true",
        callbacks=[best, EarlyStopping(monitor="val_loss", patience=cfg.patience)],
        logger=CSVLogger(str(work), name="logs"),
        val_check_interval=min(cfg.val_every, steps),
        check_val_every_n_epoch=None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, steps // 4)),
        num_sanity_val_steps=0,
    )
    last = ckpt_dir / "last.ckpt"
    resumed = cfg.resume and last.exists()
    # where the checkpoint left off: a resume continues from here, a restart would not
    resumed_from = _checkpoint_step(last) // per_batch if resumed else None
    loader = DataLoader(ds_train, batch_size=cfg.batch, shuffle=False, num_workers=0)
    val_loader = DataLoader(ds_val, batch_size=cfg.batch, num_workers=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader, val_loader, ckpt_path=str(last) if resumed else None)
    if trainer.global_rank != 0:
        return {}
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)[
            "state_dict"
        ]
        module.load_state_dict(state)
    net = module.net.cpu().eval()
    mult = net.size_multiple
    done_steps = int(trainer.global_step) // per_batch
    manifest = Manifest(
        name=Path(cfg.out).name,
        task="denoise" if cfg.task == "denoise" else "stain",
        spatial=cfg.spatial,  # type: ignore[arg-type]
        window=cfg.window if cfg.spatial == "2.5d-z" else 1,
        architecture=arch,
        inputs=("*",) if cfg.task == "denoise" else (cfg.input_channel or "brightfield",),
        outputs=("*",) if cfg.task == "denoise" else tuple(fields[0].target_names),
        size_multiple=mult,
        halo=halo_for(receptive_radius(net), mult),
        input_norm=in_norm,
        output_norm=in_norm if cfg.mode == "n2v" else tgt_norm,  # type: ignore[arg-type]
        fingerprint=training_fingerprint(fields, splits["train"]),
        training={
            "mode": cfg.mode,
            "data": cfg.data or [cfg.inputs, cfg.targets],
            "config": asdict(cfg),
            "steps": done_steps,
            "resumed": resumed,
            "resumed_from_step": resumed_from,
            "world_size": module.world_size,
            "init_from": init.identity if init is not None else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": __version__,
            "split": {k: len(v) for k, v in splits.items()},
        },
    )
    staging = work / "package"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    pkg = save_package(staging, net, manifest)
    ev = evaluate(pkg, _eval_fields(cfg, fields), splits["test"])
    seconds = round(time.perf_counter() - t0, 1)
    published = publish_trained(
        cfg, pkg, ev, work, steps=done_steps, seconds=seconds,
        eval_target=cfg.eval_target or "the training target",
    )  # fmt: skip
    return {
        "model": published.name,
        "version": published.version,
        "package": str(published.path),
        "sha256": published.sha256,
        "metrics": ev["metrics"],
        "baseline_metrics": ev["baseline_metrics"],
        "steps": done_steps,
        "seconds": seconds,
        "device": "cuda" if gpu else "cpu",
        "resumed": resumed,
        "resumed_from_step": resumed_from,
        "world_size": module.world_size,
    }


def publish_trained(
    cfg: TrainConfig,
    pkg: ModelPackage,
    ev: dict[str, Any],
    work: Path,
    *,
    steps: int,
    seconds: float,
    eval_target: str,
) -> Any:
    """Add the evaluation and loss reports to the staged package ``pkg`` and publish it to
    ``cfg.out``'s registry, unless its held-out result is worse than the untouched input's
    (`NotPublished`, kept in staging) and ``cfg.force`` is not set."""
    from scopestream.inference.package import Registry, add_files

    staging = Path(pkg.path)
    report = {k: ev[k] for k in ("metrics", "baseline_metrics", "baseline", "images")}
    report.update(steps=steps, seconds=seconds, eval_target=eval_target)
    losses = _collect_losses(work)
    (staging / "report.json").write_text(json.dumps(report, indent=1))
    if ev["figure_png"]:
        (staging / "report.png").write_bytes(ev["figure_png"])
    (staging / "losses.csv").write_text(losses)
    (staging / "losses.png").write_bytes(loss_plot(losses))
    man = pkg.manifest
    final = man.model_copy(
        update={
            "training": {
                **man.training,
                "metrics": ev["metrics"],
                "baseline_metrics": ev["baseline_metrics"],
            }
        }
    )
    pkg = add_files(staging, final, ["report.json", "report.png", "losses.csv", "losses.png"])
    root, name = Path(cfg.out).parent, Path(cfg.out).name
    worse = worse_than_input(man.task, ev["metrics"], ev["baseline_metrics"])
    if worse is not None and not cfg.force:
        raise NotPublished(
            f"not published: {worse}, so {name} would make data worse than leaving it alone "
            f"(the package is kept at {staging}; train longer or on more data, or --force "
            "publishes it anyway)"
        )
    # numbered above every root's newest (the bundled models too): a retrained 'denoise'
    # is v2 over the bundled v1, never a second v1 that hides it
    return Registry(root).publish(pkg, name)


def _checkpoint_step(path: Path) -> int:
    """The optimizer step a Lightning checkpoint was saved at (every optimizer counts)."""
    import torch

    # our own checkpoint (it holds optimizer and loop state, not only tensors)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return int(ckpt["global_step"])


def _init_package(cfg: TrainConfig, arch: Architecture, fields: list[FieldData]) -> ModelPackage:
    """The supervised model a pix2pix generator starts from (same network, same stains)."""
    from scopestream.inference.package import Registry

    if cfg.mode != "pix2pix":
        raise DataError("--init-from starts a pix2pix generator from a supervised model")
    pkg = Registry(Path(cfg.out).parent).resolve(cfg.init_from or "")
    m = pkg.manifest
    if m.task != "stain" or m.spatial != cfg.spatial:
        raise DataError(
            f"--init-from {cfg.init_from}: a {m.task} {m.spatial} model cannot start a "
            f"{cfg.spatial} stain generator"
        )
    if tuple(m.outputs) != tuple(fields[0].target_names):
        raise DataError(
            f"--init-from {cfg.init_from} predicts {list(m.outputs)}, the targets here are "
            f"{fields[0].target_names}"
        )
    if m.architecture.kind != arch.kind:
        raise DataError(f"--init-from {cfg.init_from} is a {m.architecture.kind}")
    return pkg


def _collect_losses(work: Path) -> str:
    """The CSV log(s) of the run, merged (step, train_loss, val_loss)."""
    rows = ["step,train_loss,val_loss"]
    for f in sorted((work / "logs").glob("version_*/metrics.csv")):
        lines = f.read_text().splitlines()
        if not lines:
            continue
        head = lines[0].split(",")
        for line in lines[1:]:
            vals = dict(zip(head, line.split(","), strict=False))
            rows.append(
                f"{vals.get('step', '')},{vals.get('train_loss', '')},{vals.get('val_loss', '')}"
            )
    return "\n".join(rows) + "\n"


def loss_plot(losses_csv: str) -> bytes:
    """PNG of the training and validation loss over steps (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train_pts, val_pts = [], []
    for line in losses_csv.splitlines()[1:]:
        step, tr, va = [*line.split(","), "", ""][:3]
        if not step:
            continue
        if tr:
            train_pts.append((int(float(step)), float(tr)))
        if va:
            val_pts.append((int(float(step)), float(va)))
    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.add_subplot()
    for pts, label in ((train_pts, "train"), (val_pts, "validation")):
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for _, v in train_pts + val_pts) and (train_pts or val_pts):
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def cpu_threads() -> int:
    """Cores to use for training on the CPU."""
    return os.cpu_count() or 1
