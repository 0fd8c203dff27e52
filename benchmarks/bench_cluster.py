"""Archive re-processing on dask.distributed: Mpx/s on 1 and 2 local workers, JSON on stdout.

Records a simulated run of ``--positions`` fields × ``--t`` time points at ``--shape``
(default the issue's 16 × 20 × 512²), predicts it once in one process (the baseline,
same run) and then with ``predict --cluster local:1`` and ``local:2``; reports the
median of ``--repeats`` Mpx/s of each, the scaling efficiency (Mpx/s of 2 workers over
twice that of 1) and the largest difference from the single-process output (0: the
same pixels). The cluster's Mpx/s counts block time from the first submit to the last
result, the worker start is not in it (the whole command's time is, as ``wall_s``).

    python benchmarks/bench_cluster.py [--positions 16 --t 20 --shape 512x512 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def images(store: Path) -> dict[tuple[str, int], np.ndarray]:
    from scopestream.streaming.saved_run import SavedRun

    out = {}
    for im in SavedRun(store).images:
        arr = zarr.open_group(str(im.path), mode="r")["0"]
        out[im.name, im.p] = np.asarray(arr[...])
    return out


def max_diff(a: Path, b: Path) -> float:
    ia, ib = images(a), images(b)
    assert ia.keys() == ib.keys()
    return max(float(np.nanmax(np.abs(ia[k] - ib[k]))) for k in ia)


def main() -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--t", type=int, default=20)
    ap.add_argument("--shape", default="512x512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="denoise")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "scopestream"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        side = int(np.ceil(np.sqrt(args.positions)))
        pts = [{"x": 100.0 * (k % side), "y": 100.0 * (k // side)} for k in range(args.positions)]
        plan = root / "plan.yaml"
        plan.write_text(
            json.dumps({
                "stage_positions": pts,
                "time_plan": {"interval": 0, "loops": args.t},
                "channels": [{"config": "nuclei", "exposure": 20}],
            })
        )  # fmt: skip
        run = root / "run.ome.zarr"
        subprocess.run(
            [*cli, "run", "--source", "sim", "--shape", args.shape, "--mda", str(plan),
             "--out", str(run)],
            check=True, capture_output=True,
        )  # fmt: skip
        h, w = (int(v) for v in args.shape.split("x"))
        mpx = args.positions * args.t * h * w / 1e6
        single = root / "single.ome.zarr"
        t0 = time.perf_counter()
        subprocess.run(
            [*cli, "predict", "--model", args.model, "--input", str(run), "--output", str(single)],
            check=True, capture_output=True,
        )  # fmt: skip
        single_wall = time.perf_counter() - t0
        result: dict[str, object] = {
            "benchmark": "cluster",
            "data": {"positions": args.positions, "t": args.t, "shape": args.shape,
                     "megapixels": round(mpx, 3)},
            "single_process": {"wall_s": round(single_wall, 3),
                               "mpx_per_s_wall": round(mpx / single_wall, 3)},
        }  # fmt: skip
        for n in (1, 2):
            rates, walls, diffs = [], [], []
            for k in range(args.repeats):
                out = root / f"c{n}_{k}.ome.zarr"
                t0 = time.perf_counter()
                r = subprocess.run(
                    [*cli, "predict", "--model", args.model, "--input", str(run), "--output",
                     str(out), "--cluster", f"local:{n}", "--json"],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                walls.append(time.perf_counter() - t0)
                s = json.loads(r.stdout.strip().splitlines()[-1])
                rates.append(float(s["mpx_per_s"]))
                diffs.append(max_diff(single, out))
                per_worker = s["per_worker"]
            result[f"workers_{n}"] = {
                "mpx_per_s_median": round(statistics.median(rates), 3),
                "mpx_per_s": rates,
                "wall_s_median": round(statistics.median(walls), 3),
                "max_abs_diff_vs_single": max(diffs),
                "per_worker_mpx_per_s": [v["mpx_per_s"] for v in per_worker.values()],
            }
        one = result["workers_1"]["mpx_per_s_median"]  # type: ignore[index]
        two = result["workers_2"]["mpx_per_s_median"]  # type: ignore[index]
        result["scaling_efficiency"] = round(two / (2 * one), 3) if one else None
        result["speedup_2_over_1"] = round(two / one, 3) if one else None
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
