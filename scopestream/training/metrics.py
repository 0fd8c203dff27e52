"""Image-quality metrics, computed the way CARE-style evaluations do.

The target is normalized by its 1st/99.8th percentiles; the prediction (or the
untouched input, for the baseline) is then mapped onto it by the least-squares
affine fit, so a restoration is judged on structure and noise, not on units
(a CARE model predicts the high-exposure scale; N2V the input's). Pearson's r
is invariant to that anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.ndimage import gaussian_filter

if TYPE_CHECKING:
    from pathlib import Path


def _norm(target: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = np.percentile(target, [1, 99.8])
    scale = float(hi - lo) or 1.0
    return (target - lo) / scale, float(lo), scale


def affine_fit(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``pred`` scaled and offset to ``ref`` by least squares (a flat ``pred``: ref's mean)."""
    p = pred.astype(np.float64).ravel()
    r = ref.astype(np.float64).ravel()
    # least squares in closed form (np.polyfit warns, as an error in tests, on a nearly
    # flat prediction such as an untrained model's)
    dp = p - p.mean()
    var = float(dp @ dp)
    a = float(dp @ (r - r.mean())) / var if var > 0 else 0.0
    b = float(r.mean() - a * p.mean())
    out: np.ndarray = (pred * a + b).astype(np.float64)
    return out


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Structural similarity (Gaussian window)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    vx = gaussian_filter(x * x, sigma) - mx * mx
    vy = gaussian_filter(y * y, sigma) - my * my
    cxy = gaussian_filter(x * y, sigma) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def image_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR (dB), SSIM, Pearson r, MAE and NRMSE of ``pred`` against ``target``."""
    t, _, _ = _norm(target.astype(np.float64))
    p = affine_fit(pred, t)
    err = p - t
    mse = float(np.mean(err * err))
    r = float(np.corrcoef(pred.ravel(), target.ravel())[0, 1]) if pred.std() > 0 else 0.0
    return {
        "psnr": round(float(10 * np.log10(1.0 / max(mse, 1e-12))), 3),
        "ssim": round(ssim(p, t), 4),
        "pearson": round(r, 4),
        "mae": round(float(np.mean(np.abs(err))), 5),
        "nrmse": round(float(np.sqrt(mse)), 5),
    }


def mean_metrics(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Average of per-image metrics (a metric an image has no value for, None, is left out
    of its mean; None where no image has one)."""
    if not rows:
        return {}
    out: dict[str, float | None] = {}
    for k in rows[0]:
        vals = [float(v) for r in rows if (v := r.get(k)) is not None and np.isfinite(v)]
        out[k] = round(float(np.mean(vals)), 4) if vals else None
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of the histogram that maximizes the between-class variance."""
    v = values[np.isfinite(values)].ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def segment_objects(image: np.ndarray, *, sigma: float = 1.0, min_size: int = 16) -> np.ndarray:
    """Objects of a stain image: Gaussian smoothing (σ px), Otsu's threshold, holes filled,
    connected components (faces touch) of at least ``min_size`` pixels; int32 labels 1..n.

    A simple, dependency-free stand-in for the seeds' Cellpose masks: touching nuclei
    count as one object, in the prediction and the target alike."""
    from scipy import ndimage as ndi

    smooth = gaussian_filter(np.asarray(image, np.float64), sigma)
    mask = ndi.binary_fill_holes(smooth > otsu_threshold(smooth))
    labels, n = ndi.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_size
        keep[0] = False
        remap = np.zeros(n + 1, np.int32)
        remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels = remap[labels]
    out: np.ndarray = np.asarray(labels, np.int32)
    return out


def region_metrics(
    pred: np.ndarray, target: np.ndarray, *, min_size: int = 16
) -> dict[str, float | None]:
    """The seeds' object metrics (STABLE, §002.5) of a stain prediction against its target.

    Both are segmented the same way, each on its own (`segment_objects`). For every
    target object: the distance (px) from its centroid to the nearest predicted object's
    centroid, and its IoU with that object. ``objects`` / ``objects_target``: how many
    each holds; ``centroid_distance`` and ``iou``: means over the target objects
    (None when either image has no object); ``matched``: the fraction of target objects
    whose nearest predicted object overlaps it with IoU ≥ 0.5.
    """
    from scipy import ndimage as ndi

    lt = segment_objects(target, min_size=min_size)
    lp = segment_objects(pred, min_size=min_size)
    nt, np_ = int(lt.max()), int(lp.max())
    out: dict[str, float | None] = {
        "objects": float(np_),
        "objects_target": float(nt),
        "centroid_distance": None,
        "iou": None,
        "matched": 0.0 if nt else None,
    }
    if nt == 0 or np_ == 0:
        return out
    ct = np.asarray(ndi.center_of_mass(np.ones_like(lt), lt, range(1, nt + 1)), np.float64)
    cp = np.asarray(ndi.center_of_mass(np.ones_like(lp), lp, range(1, np_ + 1)), np.float64)
    d = np.sqrt(((ct[:, None, :] - cp[None, :, :]) ** 2).sum(-1))
    nearest = d.argmin(1)
    # the overlap of every (target, predicted) label pair in one pass
    both = (lt > 0) & (lp > 0)
    inter = np.zeros((nt + 1, np_ + 1), np.int64)
    np.add.at(inter, (lt[both], lp[both]), 1)
    size_t = np.bincount(lt.ravel(), minlength=nt + 1)
    size_p = np.bincount(lp.ravel(), minlength=np_ + 1)
    ti = np.arange(1, nt + 1)
    pi = nearest + 1
    iou = inter[ti, pi] / (size_t[ti] + size_p[pi] - inter[ti, pi])
    out.update(
        centroid_distance=round(float(d[np.arange(nt), nearest].mean()), 3),
        iou=round(float(iou.mean()), 4),
        matched=round(float((iou >= 0.5).mean()), 4),
    )
    return out


def compare_with_truth(run: str | Path, max_frames: int = 12) -> list[dict[str, Any]]:
    """Each model output of a simulated run against the simulator's truth, beside raw's.

    For every output channel the truth has (a run recorded with ``--sim-truth``): the
    mean PSNR (denoisers) or Pearson r (stains) over up to ``max_frames`` predicted
    frames spread over the run, of the output and of the raw frame of that channel
    (for a stain: the measured fluorescence it stands in for, where it was recorded),
    both against the same noise-free truth (`image_metrics`). Empty without a truth.
    """
    from scopestream.streaming.saved_run import SavedRun, display_kind

    saved = SavedRun(run)
    truths = {im.p: im for im in saved.images if display_kind(im) == "truth"}
    raws = {im.p: im for im in saved.images if im.kind == "raw"}
    rows: list[dict[str, Any]] = []
    for im in saved.images:
        kind = display_kind(im)
        truth, raw = truths.get(im.p), raws.get(im.p)
        if kind not in ("denoised", "predicted") or truth is None:
            continue
        metric = "psnr" if kind == "denoised" else "pearson"
        out_arr, truth_arr = im.array(), truth.array()
        raw_arr = raw.array() if raw is not None else None
        for j, ch in enumerate(im.channels):
            if ch not in truth.channels:
                continue
            tc = truth.channels.index(ch)
            rc = raw.channels.index(ch) if raw is not None and ch in raw.channels else None
            done = [
                (t, z)
                for t in range(int(out_arr.shape[0]))
                for z in range(int(out_arr.shape[2]))
                if np.isfinite(out_arr[t, j, z, :1, :1]).all()
            ]
            if not done:
                continue
            spread = np.linspace(0, len(done) - 1, min(max_frames, len(done)))
            pick = [done[int(i)] for i in spread]
            ours, base = [], []
            for t, z in dict.fromkeys(pick):
                ref = np.asarray(truth_arr[t, tc, z], np.float64)
                pred = np.asarray(out_arr[t, j, z], np.float64)
                if not np.isfinite(pred).all():
                    continue
                ours.append(image_metrics(pred, ref)[metric])
                if rc is not None and raw_arr is not None:
                    measured = np.asarray(raw_arr[t, rc, z], np.float64)
                    base.append(image_metrics(measured, ref)[metric])
            if ours:
                rows.append(
                    {
                        "model": im.name,
                        "field": im.position,
                        "channel": ch,
                        "metric": metric,
                        "output": round(float(np.mean(ours)), 3),
                        "raw": round(float(np.mean(base)), 3) if base else None,
                        "frames": len(ours),
                    }
                )
    return rows
