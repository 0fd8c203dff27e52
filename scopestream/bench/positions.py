"""``scopestream bench positions``: many fields against one, recorded and end to end.

In one run, on the same disk, each of two paths records

* ``positions``: ``positions`` stage positions (a 4×4 grid of fields by default) ×
  ``time_points`` time points, every field its own series of the collection with
  its own per-frame metadata;
* ``single``: one position with the same number of frames
  (``positions × time_points`` time points);

through two paths:

* ``recording``: frames held in memory (realistic content) → ring buffer →
  `ZarrSink`, as fast as the recorder takes them: what many fields cost the
  recording itself (the target: ``ratio_positions_vs_single`` ≥ 0.8);
* ``simulator``: ``scopestream run --source sim`` through `Pipeline` (pymmcore-plus's
  MDA engine driving the simulated camera and stage; optionally models), as fast
  as the pipeline takes frames. Here one position's time-lapse is one camera
  burst (the engine sequences it), while every field costs the engine a stage
  move and an event of its own, as on most microscopes: the ratio says what a
  user with a software-moved stage sees, not what the recorder costs;
* ``simulator_triggered``: the same with the simulated XY stage triggered
  (``sim_triggered_stage``: it takes the fields' positions as a sequence and the
  camera steps it, as a stage with a hardware ring buffer does), so pymmcore-plus
  runs the whole time-lapse of every field as one burst: what the pipeline itself
  costs per field when the hardware does not.

Each is repeated in a rotating order after a ``sync``; medians of frames/s and
their ratios are reported. Every run must record every frame, or the benchmark fails.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable


def _grid(n: int, pitch_um: float = 1000.0) -> list[dict[str, Any]]:
    side = max(1, round(n**0.5))
    return [
        {"name": f"f{i:02d}", "x_um": (i % side) * pitch_um, "y_um": (i // side) * pitch_um}
        for i in range(n)
    ]


def _record_memory(
    out: Path, *, shape: tuple[int, int], time_points: int, positions: int, **_: Any
) -> dict[str, Any]:
    """Frames in memory → ring buffer → `ZarrSink` (the recording alone)."""
    from scopestream.bench.common import realistic_frames
    from scopestream.bench.streaming import pipeline_fps
    from scopestream.streaming.layout import Position

    fields = tuple(
        Position(str(d["name"]), x_um=d["x_um"], y_um=d["y_um"]) for d in _grid(positions)
    )
    n = time_points * positions
    fps = pipeline_fps(realistic_frames(shape), n, out, positions=fields if positions > 1 else ())
    return {"fps": fps}


def _record(
    out: Path,
    *,
    shape: tuple[int, int],
    time_points: int,
    positions: int,
    models: tuple[str, ...],
    backend: str,
    triggered: bool = False,
) -> dict[str, Any]:
    from scopestream.pipeline import Pipeline

    plan: dict[str, Any] = {"time_points": time_points, "channels": "nuclei:5"}
    if positions > 1:
        plan["positions"] = _grid(positions)
    cfg = {
        "source": "sim",
        "plan": plan,
        "shape": list(shape),
        "fps": 0,
        "models": list(models),
        "model_policy": "all",
        "backend": backend,
        "out": str(out),
        "watch_registry": False,
        "sim_triggered_stage": triggered,
    }
    t0 = time.perf_counter()
    with Pipeline.from_config(cfg) as pipe:
        summary = pipe.run()
    dt = time.perf_counter() - t0
    n = time_points * positions
    if summary["status"] != "complete" or summary["frames_written"] != n:
        raise RuntimeError(
            f"{positions}-position run failed: {summary['frames_written']}/{n} written, "
            f"{summary.get('error')}"
        )
    predicted = {k: m.get("predicted", 0) for k, m in (summary.get("models") or {}).items()}
    if any(v != n for v in predicted.values()):
        raise RuntimeError(f"{positions}-position run predicted {predicted} of {n} frames")
    return {"fps": n / dt, "acquire_fps": summary.get("acquire_fps")}


def bench_positions(
    positions: int = 16,
    time_points: int = 100,
    shape: tuple[int, int] = (512, 512),
    repeats: int = 3,
    models: tuple[str, ...] = (),
    backend: str = "auto",
    workdir: str | None = None,
) -> dict[str, Any]:
    """Record ``positions`` × ``time_points`` frames and one position's as many, ``repeats``
    times interleaved; medians and their ratio (see the module docstring).

    Returns
    -------
    dict
        JSON-able: median and all frames/s of each variant and the ratio.
    """
    if positions < 2:
        raise ValueError("compare at least 2 positions with one")
    base = Path(tempfile.mkdtemp(prefix="scopestream-bench-positions-", dir=workdir))
    variants = {
        "positions": {"positions": positions, "time_points": time_points},
        "single": {"positions": 1, "time_points": positions * time_points},
    }
    paths: dict[str, Callable[..., dict[str, Any]]] = {
        "recording": _record_memory,
        "simulator": _record,
        "simulator_triggered": functools.partial(_record, triggered=True),
    }
    results: dict[str, dict[str, list[float]]] = {
        path: {k: [] for k in variants} for path in paths
    }
    order = [(path, name) for path in paths for name in variants]
    try:
        # one untimed short run first: imports, the simulator's sample, the models
        _record(base / "warm", shape=shape, time_points=2, positions=2, models=models,
                backend=backend)  # fmt: skip
        shutil.rmtree(base / "warm", ignore_errors=True)
        for r in range(repeats):
            k = r % len(order)  # rotate: no variant always follows another's writeback
            for path, name in order[k:] + order[:k]:
                target = base / f"{path}-{name}-{r}.ome.zarr"
                os.sync()
                res = paths[path](target, shape=shape, models=models, backend=backend,
                                  **variants[name])  # fmt: skip
                results[path][name].append(res["fps"])
                shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in results.items()}
    return {
        "benchmark": "positions",
        "positions": positions,
        "time_points": time_points,
        "frames": positions * time_points,
        "shape": list(shape),
        "models": list(models),
        "backend": backend,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "fps": {p: {k: round(v, 2) for k, v in m.items()} for p, m in med.items()},
        "all_fps": {
            p: {k: [round(x, 2) for x in v] for k, v in r.items()} for p, r in results.items()
        },
        "ratio_positions_vs_single": {
            p: round(m["positions"] / m["single"], 3) for p, m in med.items()
        },
        "target": "ratio_positions_vs_single.recording and .simulator_triggered >= 0.8",
    }
