"""Unpaired translation against the paired upper bound, on the simulator's brightfield →
nuclei: Pearson r, SSIM and object metrics against the noise-free truth, JSON out.

The data are simulated fields (``scopestream run --source sim``: brightfield 5 ms,
nuclei 30 ms, with the truth), split by field: the test fields are the same for every
row. The supervised U-Net learns from the true pairs of the training fields (the
upper bound); the unpaired rows see the training fields' brightfield from one half
of them and their nuclei from the other half (`unpaired_split`: no field is in both
domains), so what they learn cannot come from a pair. Every row is scored on the
held-out fields against ``truth:nuclei`` (`scopestream.training.train.evaluate`):
Pearson, SSIM, objects per image (and the truth's), nearest-centroid distance, IoU
with it and the fraction matched at IoU ≥ 0.5 (`region_metrics`).

Rows (``ROWS``): ``supervised``; ``cyclegan`` (our U-Net generator;
``cyclegan-resnet``, the reference ResNet-9, is ~3× slower per step on a CPU and is
run only when asked); ``stable``; ``stable-no-info`` (without information
consistency) and ``stable-bilinear`` (fixed bilinear instead of DySample) — the
seed's ablations.

Options: ``scopestream bench translation --help``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scopestream.bench.stain_norms import record_pairs

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: row name → (mode, extra TrainConfig settings)
ROW_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "supervised": ("supervised", {}),
    "cyclegan": ("cyclegan", {"generator": "unet"}),
    "cyclegan-resnet": ("cyclegan", {"generator": "resnet"}),
    "stable": ("stable", {}),
    "stable-no-info": ("stable", {"info_consistency": False}),
    "stable-bilinear": ("stable", {"upsample": "bilinear"}),
}
ROWS = ("supervised", "cyclegan", "stable", "stable-no-info", "stable-bilinear")
METRICS = ("pearson", "ssim", "objects", "objects_target", "centroid_distance", "iou", "matched")


def bench_translation(
    rows: Sequence[str] = ROWS,
    fields: int = 6,
    steps: int = 2000,
    batch: int = 4,
    seed: int = 0,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
    frames: int = 16,
) -> dict[str, Any]:
    """Each row trained for ``steps`` optimizer steps (generator steps for the GANs) and
    scored on the same held-out fields against the truth.

    Parameters
    ----------
    rows
        Names from `ROW_SETTINGS`.
    fields
        Simulated fields (≥ 4: validation, test, and two for the unpaired domains).
    frames
        Time points recorded per field (256² each).
    workdir
        Where recordings and trainings go (default: a temporary directory, removed).
    """
    bad = [r for r in rows if r not in ROW_SETTINGS]
    if bad:
        raise ValueError(f"unknown row {bad[0]!r}: one of {', '.join(ROW_SETTINGS)}")
    if fields < 4:
        raise ValueError(f"fields must be at least 4 (validation, test, A, B), got {fields}")
    tmp = tempfile.TemporaryDirectory(prefix="ss-translation-") if workdir is None else None
    try:
        work = Path(tmp.name if tmp else str(workdir))
        return _bench(rows, fields, steps, batch, seed, work, log, frames)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _bench(
    rows: Sequence[str],
    fields: int,
    steps: int,
    batch: int,
    seed: int,
    work: Path,
    log: Callable[[str], None],
    frames: int,
) -> dict[str, Any]:
    from scopestream.inference.package import load_package
    from scopestream.training.data import load_run_fields, split_regions
    from scopestream.training.train import TrainConfig, evaluate, train
    from scopestream.training.translation import unpaired_split

    runs = [record_pairs(work / "pairs", 30 + s, time_points=frames) for s in range(fields)]
    truth = ["truth:nuclei"]
    eval_fields = [f for p in runs for f in load_run_fields(str(p), "brightfield", truth)]
    test = split_regions(eval_fields, 64, seed)["test"]
    domains = unpaired_split(split_regions(eval_fields, 64, seed), seed)
    out_rows = []
    for name in rows:
        mode, extra = ROW_SETTINGS[name]
        cfg = TrainConfig(
            task="stain", mode=mode, out=str(work / "reg" / name),
            data=[str(p) for p in runs], input_channel="brightfield",
            target_channels=["nuclei"], max_steps=steps, batch=batch, seed=seed,
            unpaired=mode != "supervised", force=True, work_dir=str(work / "w" / name),
            **extra,
        )  # fmt: skip
        t0 = time.perf_counter()
        res = train(cfg, progress=False)
        wall = time.perf_counter() - t0
        ev = evaluate(load_package(res["package"]), eval_fields, test)
        row: dict[str, Any] = {"row": name, "mode": mode, **extra}
        row.update({k: ev["metrics"].get(k) for k in METRICS})
        row["brightfield_pearson"] = ev["baseline_metrics"].get("pearson")
        row.update(wall_s=round(wall, 1), optimizer_steps=int(res["steps"]))
        row["steps_per_s"] = round(row["optimizer_steps"] / wall, 2) if wall > 0 else None
        log(
            f"{name:16} r {row['pearson']}  SSIM {row['ssim']}  objects {row['objects']} "
            f"(truth {row['objects_target']})  centroid {row['centroid_distance']} px  "
            f"IoU {row['iou']}  {row['wall_s']:.0f} s"
        )
        out_rows.append(row)
    ref = next((r for r in out_rows if r["row"] == "supervised"), None)
    for r in out_rows:  # each row against the paired upper bound
        if ref is not None and r is not ref and ref["pearson"] and r["pearson"] is not None:
            r["pearson_vs_supervised"] = round(r["pearson"] - ref["pearson"], 4)
    return {
        "bench": "translation",
        "rows": out_rows,
        "settings": {
            "fields": fields,
            "split": "by field: validation and test fields held out; the unpaired rows' "
            "brightfield and nuclei from disjoint halves of the training fields",
            "unpaired_fields": {
                "a": sorted({r.field for r in domains["train_a"]}),
                "b": sorted({r.field for r in domains["train_b"]}),
                "test": sorted({r.field for r in test}),
            },
            "data": f"simulated brightfield 5 ms → nuclei 30 ms, {frames} frames of 256² each",
            "metric": "against the simulator's noise-free nuclei, held-out fields",
            "steps": steps,
            "batch": batch,
            "seed": seed,
        },
    }
