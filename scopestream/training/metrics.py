"""Image-quality metrics, computed the way CARE-style evaluations do.

The target is normalized by its 1st/99.8th percentiles; the prediction (or the
untouched input, for the baseline) is then mapped onto it by the least-squares
affine fit, so a restoration is judged on structure and noise, not on units
(a CARE model predicts the high-exposure scale; N2V the input's). Pearson's r
is invariant to that anyway.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def _norm(target: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = np.percentile(target, [1, 99.8])
    scale = float(hi - lo) or 1.0
    return (target - lo) / scale, float(lo), scale


def _fit(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    p = pred.astype(np.float64).ravel()
    a, b = np.polyfit(p, ref.astype(np.float64).ravel(), 1) if p.std() > 0 else (0.0, ref.mean())
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
    p = _fit(pred, t)
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
