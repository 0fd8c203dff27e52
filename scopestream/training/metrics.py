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


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average of per-image metrics."""
    if not rows:
        return {}
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


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
