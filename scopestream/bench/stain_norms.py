"""Which normalization wins for virtual staining: the seeds' methods on the simulator's
pairs, Pearson r against the noise-free truth: JSON out.

No real paired brightfield/fluorescence data can be had offline, so the pairs are the
simulated microscope's (``scopestream run --source sim``): in-focus brightfield in,
the recorded (noisy) nuclei and membrane fluorescence of the same fields as targets,
one field per seed, split by field (never a field in two splits). Each row trains the
same supervised stain U-Net for the same optimizer steps with one pair of
normalizations (``--norm`` for the brightfield, ``--target-norm`` for the stains,
MMV_Im2Im's study: `scopestream.training.train.NORMS`) and scores the held-out field's
predictions against the simulator's truth (``truth:nuclei``, ``truth:membrane``),
next to the brightfield's own correlation with it.

Options: ``scopestream bench stain-norms --help``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: (input norm, target norm) rows: each method for both, then a z-scored input with
#: percentile targets (VisCy's habit). ``center`` is left out: the simulator records 2D
#: frames, where it is `standard` by definition (the whole stack is its centre)
ROWS: tuple[tuple[str, str], ...] = (
    ("percentile", "percentile"),
    ("percentile-sym", "percentile-sym"),
    ("standard", "standard"),
    ("standard", "percentile"),
)
STAINS = ("nuclei", "membrane")


def record_pairs(out: Path, seed: int, time_points: int = 16, shape: str = "256x256") -> Path:
    """One simulated field: brightfield (5 ms), nuclei and membrane (30 ms), with truth."""
    run = out / f"field{seed}.ome.zarr"
    cmd = [
        sys.executable, "-m", "scopestream", "run", "--source", "sim",
        "--channels", "brightfield:5,nuclei:30,membrane:30",
        "--time-points", str(time_points), "--sim-time-step", "45", "--shape", shape,
        "--seed", str(seed), "--sim-truth", "--out", str(run), "--overwrite",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"recording field {seed} failed: {proc.stderr[-2000:]}")
    return run


def bench_stain_norms(
    rows: Sequence[tuple[str, str]] = ROWS,
    fields: int = 5,
    steps: int = 300,
    seed: int = 0,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every (input, target) normalization pair: Pearson r of each stain vs the truth.

    Parameters
    ----------
    rows
        (``--norm``, ``--target-norm``) pairs, from `scopestream.training.train.NORMS`.
    fields
        Simulated fields (≥ 3: training, validation and test by field).
    steps
        Optimizer steps of every training.
    workdir
        Where recordings and trainings go (default: a temporary directory, removed).
    """
    from scopestream.training.train import NORMS

    bad = [n for r in rows for n in r if n not in NORMS]
    if bad:
        raise ValueError(f"unknown normalization {bad[0]!r}: one of {', '.join(NORMS)}")
    if fields < 3:
        raise ValueError(f"fields must be at least 3 (train, validation, test), got {fields}")
    tmp = tempfile.TemporaryDirectory(prefix="ss-stain-norms-") if workdir is None else None
    try:
        return _bench(rows, fields, steps, seed, Path(tmp.name if tmp else str(workdir)), log)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _bench(
    rows: Sequence[tuple[str, str]],
    fields: int,
    steps: int,
    seed: int,
    work: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from scopestream.inference.package import load_package
    from scopestream.training.data import load_run_fields, split_regions
    from scopestream.training.train import TrainConfig, evaluate, train

    runs = [record_pairs(work / "pairs", 10 + s) for s in range(fields)]
    truth = [f"truth:{s}" for s in STAINS]
    eval_fields = [f for p in runs for f in load_run_fields(str(p), "brightfield", truth)]
    out_rows = []
    for norm, target_norm in rows:
        cfg = TrainConfig(
            task="stain", mode="supervised", out=str(work / "reg" / "stain"),
            data=[str(p) for p in runs], input_channel="brightfield",
            target_channels=list(STAINS), max_channels=64, max_steps=steps, seed=seed,
            norm=norm, target_norm=target_norm, force=True,
            work_dir=str(work / "w" / f"{norm}-{target_norm}"),
        )  # fmt: skip
        t0 = time.perf_counter()
        res = train(cfg, progress=False)
        wall = time.perf_counter() - t0
        pkg = load_package(res["package"])
        test = split_regions(eval_fields, cfg.patch, cfg.seed)["test"]
        row: dict[str, Any] = {"norm": norm, "target_norm": target_norm}
        for k, stain in enumerate(STAINS):
            ev = evaluate(pkg, eval_fields, test, target_index=k)
            row[f"{stain}_pearson"] = round(ev["metrics"]["pearson"], 4)
            row[f"{stain}_brightfield_pearson"] = round(ev["baseline_metrics"]["pearson"], 4)
        row.update(wall_s=round(wall, 1), optimizer_steps=int(res["steps"]))
        log(
            f"--norm {norm:15} --target-norm {target_norm:15} nuclei r "
            f"{row['nuclei_pearson']:.4f}  membrane r {row['membrane_pearson']:.4f}  "
            f"{row['wall_s']:6.1f} s"
        )
        out_rows.append(row)
    return {
        "bench": "stain_norms",
        "rows": out_rows,
        "settings": {
            "fields": fields,
            "split": "by field (training, validation, test)",
            "data": "simulated brightfield 5 ms → nuclei, membrane 30 ms, 16 frames of 256²",
            "metric": "Pearson r vs the simulator's noise-free truth, held-out field",
            "steps": steps,
            "seed": seed,
        },
    }
