"""What a user looks at after an overnight run: ``scopestream report RUN --out report.html``.

Throughput and latency per second of the run for every stage (acquisition,
recording, each model), skipped frames per second per consumer, frames lost
(acquired but never on disk), and a panel of raw vs each output for a few
frames. The numbers come from the per-second timeline the runner stores in the
run's attributes when it ends; a run that was killed has none, and the report
says so and still shows the frames that are complete.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np


class ReportError(ValueError):
    """A run that cannot be reported on."""


def _figure(rows: int, cols: int, w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def timeline_figure(timeline: dict[str, Any]) -> bytes:
    """Three stacked plots: frames/s, latency, skipped and lost frames over the run."""
    fig, ax = _figure(3, 1, 9, 8)
    stages = timeline.get("stages", {})
    for name, st in stages.items():
        if st["t_s"]:
            per_s = np.asarray(st["frames"], float) / float(st.get("bucket_s", 1))
            ax[0][0].plot(st["t_s"], per_s, label=name, lw=1.2)
            if name != "acquire":
                ax[1][0].plot(st["t_s"], st["latency_mean_ms"], label=f"{name} mean", lw=1.2)
                ax[1][0].plot(st["t_s"], st["latency_max_ms"], ls=":", lw=1, label=f"{name} max")
    ax[0][0].set_ylabel("frames / s")
    ax[0][0].set_title("throughput")
    ax[1][0].set_ylabel("latency (ms)")
    ax[1][0].set_title("latency from acquisition (mean and max per second)")
    for name, sk in timeline.get("skipped", {}).items():
        ax[2][0].bar(sk["t_s"], sk["frames"], label=f"skipped by {name}", alpha=0.6)
    lost = lost_over_time(timeline)
    if lost["t_s"]:
        ax[2][0].plot(lost["t_s"], lost["lost"], color="red", label="lost (cumulative)")
    ax[2][0].set_ylabel("frames")
    ax[2][0].set_xlabel("time since start (s)")
    ax[2][0].set_title("skipped (display/models: by design) and lost (never on disk)")
    for a in ax[:, 0]:
        if a.has_data():
            a.legend(fontsize=7, loc="upper right")
        a.grid(alpha=0.3)
    return _png(fig)


def lost_over_time(timeline: dict[str, Any]) -> dict[str, list[int]]:
    """Frames acquired but not on disk, cumulative, per second (0 for a clean run)."""
    st = timeline.get("stages", {})
    acq, disk = st.get("acquire"), st.get("zarr:disk") or st.get("zarr")
    if not acq or not disk or not acq["t_s"]:
        return {"t_s": [], "lost": []}
    t_end = max(acq["t_s"][-1], disk["t_s"][-1] if disk["t_s"] else 0)
    a = np.zeros(t_end + 1, np.int64)
    d = np.zeros(t_end + 1, np.int64)
    a[np.asarray(acq["t_s"])] = acq["frames"]
    if disk["t_s"]:
        d[np.asarray(disk["t_s"])] = disk["frames"]
    total_acq, total_disk = int(a.sum()), int(d.sum())
    # frames in flight at a second's end are not lost; only the run's end says so
    lost = np.zeros(t_end + 1, np.int64)
    lost[-1] = max(0, total_acq - total_disk)
    return {"t_s": list(range(t_end + 1)), "lost": lost.tolist()}


def _u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a = np.nan_to_num(a, nan=lo)  # NaN: a frame the model skipped (marked "not written")
    return (np.clip((a - lo) / ((hi - lo) or 1.0), 0, 1) * 255).astype(np.uint8)


def frames_figure(run: Path, n_frames: int) -> tuple[bytes, list[dict[str, Any]]]:
    """Raw vs each output for a few time points (rows) and every layer (columns)."""
    from scopestream.streaming.ome import estimate_limits, stain_colour
    from scopestream.streaming.saved_run import SavedRun

    specs = SavedRun(run).channels()
    if not specs:
        raise ReportError(f"{run} holds no images")
    n_t = int(specs[0].image.shape[0])
    score: dict[int, int] = {}
    for s in specs:
        for t in s.complete_t:
            score[t] = score.get(t, 0) + 1
    # time points where the most images were written (models on 'latest' skip frames),
    # spread over the run
    ts: list[int] = []
    for k in sorted(set(score.values()), reverse=True):
        pool = sorted(t for t, v in score.items() if v == k)
        want = min(n_frames - len(ts), len(pool))
        if want > 0:
            ts += [pool[int(i)] for i in np.linspace(0, len(pool) - 1, want).round()]
        if len(ts) >= n_frames:
            break
    ts = sorted(set(ts)) or [0]
    limits = {
        s.name: estimate_limits(s.plane(s.complete_t[-1])) if s.complete_t else (0.0, 1.0)
        for s in specs
    }
    fig, ax = _figure(len(ts), len(specs), 2.2 * len(specs), 2.3 * len(ts))
    for r, t in enumerate(ts):
        for c, s in enumerate(specs):
            a = ax[r][c]
            img = s.plane(min(t, n_t - 1))
            lo, hi = limits[s.name]
            cmap = _mpl_cmap(stain_colour(s.channel)[0])
            a.imshow(_u8(img, lo, hi), cmap=cmap, vmin=0, vmax=255)
            if t not in s.complete_t:
                a.text(0.5, 0.5, "not written", color="w", ha="center", transform=a.transAxes)
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(s.name, fontsize=8)
            if c == 0:
                a.set_ylabel(f"t = {t}", fontsize=8)
    return _png(fig), [{"t": t, "layers": [s.name for s in specs]} for t in ts]


def _mpl_cmap(napari_name: str) -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    rgb = {
        "gray": (1, 1, 1),
        "cyan": (0, 1, 1),
        "magenta": (1, 0, 1),
        "green": (0, 1, 0),
        "red": (1, 0, 0),
        "yellow": (1, 1, 0),
    }.get(napari_name, (1, 1, 1))
    return LinearSegmentedColormap.from_list(napari_name, [(0, 0, 0), rgb])


def _attrs(run: Path) -> dict[str, Any]:
    from scopestream.streaming.saved_run import SavedRun

    try:
        sc = SavedRun(run).attrs
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None
    if not sc:
        raise ReportError(f"{run} was not written by scopestream (no scopestream attributes)")
    return sc


def write_report(run: str | Path, out: str | Path, n_frames: int = 3) -> dict[str, Any]:
    """Write ``out`` (.html: self-contained page; .png: the figures stacked); return numbers."""
    from scopestream.streaming.saved_run import SavedRun, inspect_run

    run, out = Path(run), Path(out)
    sc = _attrs(run)
    summary = sc.get("summary") or {}
    saved = SavedRun(run)
    timeline = saved.timeline
    prediction = _prediction(saved.prediction)
    notes = []
    inspected = inspect_run(run).to_json()
    status = inspected.get("status")
    if prediction is not None:
        notes.append(
            f"an offline prediction (scopestream predict) by {prediction['model']} "
            f"v{prediction['version']} of {prediction['input']}, {status}: no stream was "
            "timed, so it has no timeline"
        )
    elif timeline is None and status in ("complete", "stopped"):
        notes.append(f"no timeline recorded (the run is {status}); its frames are shown")
    elif timeline is None:
        notes.append(
            f"no timeline: the run's status is {status!r} (it did not end cleanly); "
            "only its complete frames are shown"
        )
    tl_png = timeline_figure(timeline) if timeline else b""
    fr_png, panel = frames_figure(run, n_frames)
    numbers = {
        "run": str(run),
        "status": sc.get("status"),
        "prediction": prediction,
        "frames_acquired": summary.get("frames_acquired"),
        "frames_written": summary.get("frames_written", sc.get("frames_written")),
        "frames_lost": summary.get("frames_lost"),
        "frames_skipped": summary.get("frames_skipped"),
        "fps": summary.get("fps"),
        "latency_ms": summary.get("latency_ms"),
        "elapsed_s": summary.get("elapsed_s"),
        "seconds_in_timeline": len(
            (timeline or {}).get("stages", {}).get("acquire", {}).get("t_s", [])
        ),
        "lost_over_time": lost_over_time(timeline) if timeline else None,
        "panel": panel,
        "complete_frames": inspected.get("images"),
        "notes": notes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        import imageio.v3 as iio

        imgs = [iio.imread(b) for b in (tl_png, fr_png) if b]
        width = max(i.shape[1] for i in imgs)
        padded = [
            np.pad(i[..., :3], ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255)
            for i in imgs
        ]
        iio.imwrite(out, np.concatenate(padded, axis=0))
    else:
        out.write_text(_html(numbers, sc, tl_png, fr_png))
    return numbers


def _prediction(prov: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a ``scopestream predict`` store says of its model and input (None for a run)."""
    if prov is None:
        return None
    source = prov.get("input") or {}
    return {
        "model": prov.get("model"),
        "version": prov.get("version"),
        "task": prov.get("task"),
        "backend": prov.get("backend"),
        "input": source.get("path", source.get("kind")) if isinstance(source, dict) else source,
    }


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html(numbers: dict[str, Any], sc: dict[str, Any], tl: bytes, fr: bytes) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in numbers.items()
        if k not in ("panel", "lost_over_time", "complete_frames", "notes", "prediction")
    )
    outputs = dict(sc.get("outputs") or {})
    pred = numbers.get("prediction")
    if pred is not None:  # a predict store: its one image is the model's output
        outputs = {f"{pred['model']} (offline prediction)": pred}
    models = "".join(
        f"<li>{html.escape(name)}: {html.escape(str(p.get('model', p.get('kind', ''))))} "
        f"v{html.escape(str(p.get('version', '')))} on {html.escape(str(p.get('backend', '')))}"
        "</li>"
        for name, p in outputs.items()
    )
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in numbers["notes"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>scopestream report: {html.escape(numbers["run"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
th{{text-align:left;padding-right:1em}} img{{max-width:100%}} .note{{color:#a60}}</style>
</head><body>
<h1>Run report</h1><p>{html.escape(numbers["run"])}</p>{notes}
<table>{rows}</table>
<h2>Outputs</h2><ul>{models or "<li>none</li>"}</ul>
<h2>Throughput, latency, skipped and lost frames over the run</h2>
{_img(tl, "timeline") if tl else "<p>no timeline recorded</p>"}
<h2>Raw vs outputs</h2>
{_img(fr, "frames")}
</body></html>
"""
