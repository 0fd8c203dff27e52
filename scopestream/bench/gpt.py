"""Global Pixel Transformers vs our stain U-Net at equal training time, on the
simulator's brightfield → nuclei + membrane: Pearson r per stain vs the truth, JSON out.

Both networks train as ``--mode supervised`` / ``--mode gpt`` on the same fields
(split by field, the same test fields) for the same wall-clock budget: each one's time
per optimizer step is measured first (`seconds_per_step`: forward, backward and update
on a batch of patches), and its step count set to fill the budget. Scores: Pearson r
of each stain against the noise-free truth on the held-out fields, the nuclei's object
metrics, and, for GPT, how far tiled prediction (its global attention is cut at tile
borders) is from whole frames.

Options: ``scopestream bench gpt --help``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.bench.stain_norms import STAINS, record_pairs

if TYPE_CHECKING:
    from collections.abc import Callable


def bench_gpt(
    budget_s: float = 600.0,
    fields: int = 5,
    batch: int = 8,
    seed: int = 0,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
    frames: int = 16,
) -> dict[str, Any]:
    """U-Net and GPT, each trained for ``budget_s`` seconds, scored per stain.

    Parameters
    ----------
    budget_s
        Training time of each network (its steps are set from its measured step time).
    fields
        Simulated fields (≥ 3: training, validation, test by field).
    frames
        Time points per field (256² each).
    """
    if fields < 3:
        raise ValueError(f"fields must be at least 3 (train, validation, test), got {fields}")
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    tmp = tempfile.TemporaryDirectory(prefix="ss-gpt-") if workdir is None else None
    try:
        work = Path(tmp.name if tmp else str(workdir))
        return _bench(budget_s, fields, batch, seed, work, log, frames)
    finally:
        if tmp is not None:
            tmp.cleanup()


def seconds_per_step(cfg: Any, n_out: int, warm: int = 2, timed: int = 5) -> float:
    """Median seconds of one optimizer step (forward, backward, update) of ``cfg``'s
    network on a batch of its patches: what a training step costs without the data."""
    import torch

    from scopestream.training.module import TrainModule
    from scopestream.training.train import _architecture

    arch = _architecture(cfg, n_out)
    module = TrainModule(arch.kind, dict(arch.params), cfg.mode, max_steps=10)
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    x = torch.rand(cfg.batch, 1, cfg.patch, cfg.patch)
    y = torch.rand(cfg.batch, n_out, cfg.patch, cfg.patch)
    batch = (x, y, torch.ones_like(y))
    times = []
    module.train()
    for i in range(warm + timed):
        t0 = time.perf_counter()
        loss = module._loss(batch)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _bench(
    budget_s: float,
    fields: int,
    batch: int,
    seed: int,
    work: Path,
    log: Callable[[str], None],
    frames: int,
) -> dict[str, Any]:
    from scopestream.inference.backends import make_backend
    from scopestream.inference.package import load_package
    from scopestream.inference.predictor import Predictor
    from scopestream.training.data import load_run_fields, split_regions
    from scopestream.training.train import TrainConfig, evaluate, train

    runs = [record_pairs(work / "pairs", 50 + s, time_points=frames) for s in range(fields)]
    truth = [f"truth:{s}" for s in STAINS]
    eval_fields = [f for p in runs for f in load_run_fields(str(p), "brightfield", truth)]
    test = split_regions(eval_fields, 64, seed)["test"]

    def config(mode: str, steps: int, tag: str) -> TrainConfig:
        return TrainConfig(
            task="stain", mode=mode, out=str(work / "reg" / mode),
            data=[str(p) for p in runs], input_channel="brightfield",
            target_channels=list(STAINS), max_steps=steps, batch=batch, seed=seed,
            force=True, work_dir=str(work / "w" / f"{mode}-{tag}"), val_every=10**9,
        )  # fmt: skip

    out_rows = []
    for mode in ("supervised", "gpt"):
        per_step = seconds_per_step(config(mode, 1, "cal"), len(STAINS))
        steps = max(10, int(budget_s / per_step))
        t0 = time.perf_counter()
        res = train(config(mode, steps, "run"), progress=False)
        wall = time.perf_counter() - t0
        pkg = load_package(res["package"])
        row: dict[str, Any] = {
            "network": "unet" if mode == "supervised" else "gpt",
            "architecture": pkg.manifest.architecture.model_dump(mode="json"),
            "seconds_per_step": round(per_step, 4),
            "optimizer_steps": int(res["steps"]),
            "wall_s": round(wall, 1),
        }
        for k, stain in enumerate(STAINS):
            ev = evaluate(pkg, eval_fields, test, target_index=k)
            row[f"{stain}_pearson"] = ev["metrics"]["pearson"]
            row[f"{stain}_ssim"] = ev["metrics"]["ssim"]
            if k == 0:
                row.update({f"nuclei_{m}": ev["metrics"].get(m) for m in ("objects", "iou")})
                row["nuclei_objects_target"] = ev["metrics"].get("objects_target")
        if mode == "gpt":  # its attention is global: tiles are not the whole frame
            frame = np.asarray(eval_fields[test[0].field].input[0], np.float32)
            whole = Predictor(pkg, make_backend(pkg, "torch")).predict(frame)
            tiled = Predictor(pkg, make_backend(pkg, "torch"), tile=(192, 192)).predict(frame)
            span = float(whole.max() - whole.min()) or 1.0
            row["tiled_vs_whole"] = {
                "tile": [192, 192],
                "halo": list(pkg.manifest.halo),
                "max_abs_over_range": round(float(np.abs(tiled - whole).max()) / span, 5),
                "mean_abs_over_range": round(float(np.abs(tiled - whole).mean()) / span, 5),
                "pearson": round(float(np.corrcoef(tiled.ravel(), whole.ravel())[0, 1]), 5),
            }
        log(
            f"{row['network']:5} {row['optimizer_steps']:6d} steps in {row['wall_s']:.0f} s: "
            f"nuclei r {row['nuclei_pearson']}, membrane r {row['membrane_pearson']}"
        )
        out_rows.append(row)
    unet, gpt = out_rows
    return {
        "bench": "gpt",
        "rows": out_rows,
        "gpt_minus_unet": {
            s: round(gpt[f"{s}_pearson"] - unet[f"{s}_pearson"], 4) for s in STAINS
        },
        "settings": {
            "budget_s": budget_s,
            "fields": fields,
            "split": "by field (training, validation, test)",
            "data": f"simulated brightfield 5 ms → nuclei, membrane 30 ms, {frames} frames "
            "of 256² each",
            "metric": "Pearson r vs the simulator's noise-free truth, held-out fields",
            "batch": batch,
            "seed": seed,
        },
    }
