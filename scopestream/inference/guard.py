"""Domain-shift guard: does the live data look like what the model was trained on?

A model's package records a `Fingerprint` of its training data: the channels
(preset names), the pixel size, the exposure range and camera pixel type, and the
range over the training frames of robust input statistics (percentiles 1, 50 and
99.8, and the noise σ from neighbouring-pixel differences), plus the largest
saturated fraction. Live, a `DomainGuard` compares the stream with it:

- at load: the pixel size (more than 2 % apart; exactly 1 µm is what a recording
  without a pixel-size calibration says, so it counts as unknown) and the channel
  the model is given (a preset it was not trained on);
- every frame: the exposure (outside the trained range);
- every ``every``-th frame of each field and channel (sub-sampled: about 64k pixels,
  well under a millisecond): the statistics, outside the training range widened by
  ``margin`` of its width and ``relative_margin`` of its values, for ``run_length``
  checks in a row.

What it finds is a **warning, never a stop**: a `ShiftWarning` per kind, field and
channel (with the frames it covers), counted in the run's summary, stored in the
output's attributes and shown as a badge in the viewer. Nothing is checked where
the fingerprint does not say (a TIFF's exposure, a model imported without one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from collections.abc import Iterable

    from scopestream.streaming.frame import FrameMeta

#: the statistics a fingerprint keeps the training range of
STATS = ("p1", "p50", "p99_8", "noise_sigma")
#: pixels a frame's statistics are computed from (a strided sample)
SAMPLE_PIXELS = 65_536
#: a pixel size further than this (relative) from the training data's is another scale
PIXEL_SIZE_TOLERANCE = 0.02


class Fingerprint(BaseModel):
    """What a model's training data looked like (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    frames: int
    channels: tuple[str, ...] = ()
    pixel_size_um: float | None = None
    exposure_ms: tuple[float, float] | None = None
    dtype: str | None = None
    saturated_fraction: float = 0.0
    #: per statistic of `STATS`: (lowest, highest) over the training frames
    ranges: dict[str, tuple[float, float]]


def frame_stats(frame: np.ndarray) -> dict[str, float]:
    """A frame's robust statistics (`STATS` and ``saturated``), from a strided sample.

    Percentiles from a grid sample of about `SAMPLE_PIXELS` pixels; the noise σ from
    horizontal neighbour differences along whole rows (sampled rows, every column, so
    neighbours stay neighbours): the std of their central 90 % over √2; ``saturated``
    the fraction of sampled pixels at the pixel type's maximum (integer frames only).
    """
    a = np.asarray(frame)
    if a.ndim > 2:
        a = a.reshape(-1, a.shape[-1])
    h, w = a.shape
    step = max(1, math.isqrt(max(1, h * w // SAMPLE_PIXELS)))
    rows = a[::step]
    sample = rows[:, ::step].astype(np.float32, copy=False)
    p1, p50, p998 = (float(v) for v in np.percentile(sample, [1.0, 50.0, 99.8]))
    d = np.diff(rows[: max(1, SAMPLE_PIXELS // max(w, 1))].astype(np.float32), axis=1).ravel()
    noise = 0.0
    if d.size >= 20:  # the std of the central 90 % (robust, and not quantised as a MAD is)
        lo, hi = np.percentile(d, [5.0, 95.0])
        core = d[(d >= lo) & (d <= hi)]
        noise = float(core.std() / math.sqrt(2)) if core.size else 0.0
    saturated = 0.0
    if np.issubdtype(a.dtype, np.integer):
        saturated = float(np.mean(sample >= np.iinfo(a.dtype).max))
    return {"p1": p1, "p50": p50, "p99_8": p998, "noise_sigma": noise, "saturated": saturated}


def fingerprint_of(
    frames: Iterable[np.ndarray],
    *,
    channels: Iterable[str] = (),
    pixel_size_um: float | None = None,
    exposures_ms: Iterable[float] = (),
    dtype: str | None = None,
) -> Fingerprint:
    """The fingerprint of training ``frames`` (each a (Y, X) array; a sample is enough)."""
    per: dict[str, list[float]] = {k: [] for k in (*STATS, "saturated")}
    n = 0
    for f in frames:
        s = frame_stats(f)
        for k, v in s.items():
            per[k].append(v)
        n += 1
    if n == 0:
        raise ValueError("a fingerprint needs at least one frame")
    exp = sorted(float(e) for e in exposures_ms if e and math.isfinite(float(e)) and e > 0)
    return Fingerprint(
        frames=n,
        channels=tuple(dict.fromkeys(str(c) for c in channels if c)),
        pixel_size_um=pixel_size_um if pixel_size_um and pixel_size_um > 0 else None,
        exposure_ms=(exp[0], exp[-1]) if exp else None,
        dtype=dtype,
        saturated_fraction=max(per["saturated"]),
        ranges={k: (min(per[k]), max(per[k])) for k in STATS},
    )


def _span(lo: float, hi: float) -> str:
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


@dataclass
class ShiftWarning:
    """One kind of shift at one field and channel, and the frames it has covered."""

    kind: str  # pixel_size | channel | exposure | statistics
    p: int
    channel: str
    message: str
    first_seq: int
    frames: int = 1

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the summary, the output's attributes)."""
        return asdict(self)


@dataclass
class DomainGuard:
    """Compares a stream with a model's `Fingerprint` (see the module docstring)."""

    fingerprint: Fingerprint | None
    channel_names: tuple[str, ...]
    pixel_size_um: float | None = None
    every: int = 8
    run_length: int = 5
    margin: float = 0.25
    relative_margin: float = 0.2
    warnings: dict[tuple[str, int, int], ShiftWarning] = field(default_factory=dict)
    _seen: dict[tuple[int, int], int] = field(default_factory=dict)
    _outside: dict[tuple[int, int], int] = field(default_factory=dict)
    checked_frames: int = 0

    def _name(self, c: int) -> str:
        return self.channel_names[c] if 0 <= c < len(self.channel_names) else str(c)

    def _warn(self, kind: str, p: int, c: int, seq: int, message: str) -> bool:
        """Record (or extend) a warning; True when it is new."""
        key = (kind, p, c)
        if key in self.warnings:
            self.warnings[key].frames += 1
            return False
        self.warnings[key] = ShiftWarning(kind, p, self._name(c), message, seq)
        return True

    def check_stream(self, targets: Iterable[int]) -> list[ShiftWarning]:
        """At load: pixel size and the channels the model is given (field 0 stands for all)."""
        fp = self.fingerprint
        new: list[ShiftWarning] = []
        if fp is None:
            return new
        px = self.pixel_size_um if self.pixel_size_um != 1.0 else None  # 1.0: not calibrated
        if fp.pixel_size_um and px and abs(px / fp.pixel_size_um - 1) > PIXEL_SIZE_TOLERANCE:
            for c in targets:
                if self._warn(
                    "pixel_size", -1, c, -1,
                    f"pixel size {px:g} µm; trained at {fp.pixel_size_um:g} µm",
                ):  # fmt: skip
                    new.append(self.warnings["pixel_size", -1, c])
        if fp.channels:
            for c in targets:
                name = self._name(c)
                if name not in fp.channels and self._warn(
                    "channel", -1, c, -1,
                    f"channel {name!r}; trained on {', '.join(map(repr, fp.channels))}",
                ):  # fmt: skip
                    new.append(self.warnings["channel", -1, c])
        return new

    def _outside_range(self, stats: dict[str, float]) -> str | None:
        fp = self.fingerprint
        assert fp is not None
        for k in STATS:
            lo, hi = fp.ranges[k]
            pad = self.margin * (hi - lo) + self.relative_margin * max(abs(lo), abs(hi))
            if not lo - pad <= stats[k] <= hi + pad:
                return f"{k} {stats[k]:.4g} outside the training range {lo:.4g}…{hi:.4g}"
        return None

    def check_frame(self, frame: np.ndarray, meta: FrameMeta) -> ShiftWarning | None:
        """Check one frame the model is given; the warning when this frame raised a new one."""
        fp = self.fingerprint
        if fp is None:
            return None
        p, c, seq = int(meta["p"]), int(meta["c"]), int(meta["seq"])
        new: ShiftWarning | None = None
        exp = float(meta.get("exposure_ms") or 0.0)
        if fp.exposure_ms is not None and exp > 0:
            lo, hi = fp.exposure_ms
            if not lo * (1 - 1e-6) <= exp <= hi * (1 + 1e-6) and self._warn(
                "exposure", p, c, seq, f"exposure {exp:g} ms; trained at {_span(lo, hi)} ms"
            ):
                new = self.warnings["exposure", p, c]
        key = (p, c)
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        if n % max(1, self.every):
            return new
        self.checked_frames += 1
        why = self._outside_range(frame_stats(frame))
        if why is None:
            self._outside[key] = 0
            return new
        run = self._outside.get(key, 0) + 1
        self._outside[key] = run
        if run >= self.run_length or ("statistics", p, c) in self.warnings:
            msg = f"{why} ({run} checked frames in a row)"
            if self._warn("statistics", p, c, seq, msg) and new is None:
                new = self.warnings["statistics", p, c]
        return new

    def _of(self, p: int | None) -> list[ShiftWarning]:
        """Warnings of field ``p`` and of the whole stream (all with None)."""
        return [w for w in self.warnings.values() if p is None or w.p in (p, -1)]

    def counts(self, p: int | None = None) -> dict[str, int]:
        """Frames covered by warnings, per kind (of field ``p``; all fields with None)."""
        out: dict[str, int] = {}
        for w in self._of(p):
            out[w.kind] = out.get(w.kind, 0) + w.frames
        return out

    def describe(self, p: int | None = None) -> dict[str, Any]:
        """The summary's (and the output attributes') ``domain_shift`` (of field ``p``)."""
        return {
            "fingerprint": self.fingerprint is not None,
            "checked_frames": self.checked_frames,
            "counts": self.counts(p),
            "warnings": [w.to_json() for w in self._of(p)],
        }
