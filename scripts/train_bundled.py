"""Reproduce the bundled models (scopestream/models/) from the simulated microscope.

    python scripts/train_bundled.py [--steps-denoise N] [--steps-stain N] [--out DIR]

Seeds are fixed, so the data (and, up to floating-point non-determinism of the
CPU kernels, the weights) are reproducible. Both models are trained by
scopestream's own trainer, evaluated on held-out fields against the
simulator's noise-free truth, and written with their evaluation report.

* ``denoise`` (N2V2, self-supervised): noisy nuclei frames at a low-light
  exposure (1 ms ≈ 20–30 photons at the brightest pixel); no clean targets used.
* ``stain`` (supervised): in-focus brightfield → nuclei + membrane, targets
  the recorded (noisy, 30 ms) fluorescence of the same fields.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FIELDS = 4  # fields of view (seeds) → split by field
SHAPE = "256x256"


def record(out: Path, seed: int, channels: str) -> Path:
    run = out / f"field{seed}.ome.zarr"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "scopestream",
            "run",
            "--source",
            "sim",
            "--channels",
            channels,
            "--time-points",
            "16",
            "--sim-time-step",
            "45",
            "--shape",
            SHAPE,
            "--seed",
            str(seed),
            "--sim-truth",
            "--out",
            str(run),
            "--overwrite",
        ],
        check=True,
        capture_output=True,
    )
    return run


def train(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "scopestream", "train", *args, "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps-denoise", type=int, default=800)
    ap.add_argument("--steps-stain", type=int, default=1500)
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "scopestream" / "models")
    )
    a = ap.parse_args()
    out = Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="scopestream-bundled-"))
    try:
        low = [record(work / "low", s, "nuclei:1") for s in range(FIELDS)]
        pairs = [
            record(work / "pairs", 10 + s, "brightfield:5,nuclei:30,membrane:30")
            for s in range(FIELDS)
        ]
        reg = work / "registry"
        results = {}
        results["denoise"] = train(
            [
                "--task",
                "denoise",
                "--mode",
                "n2v",
                "--out",
                str(reg / "denoise"),
                *[a for p in low for a in ("--data", str(p))],
                "--input-channel",
                "nuclei",
                "--eval-target",
                "truth:nuclei",
                "--max-steps",
                str(a.steps_denoise),
                "--seed",
                "0",
                "--work-dir",
                str(work / "train"),
            ]
        )
        results["stain"] = train(
            [
                "--task",
                "stain",
                "--mode",
                "supervised",
                "--out",
                str(reg / "stain"),
                *[a for p in pairs for a in ("--data", str(p))],
                "--input-channel",
                "brightfield",
                "--target-channel",
                "nuclei",
                "--target-channel",
                "membrane",
                "--max-channels",
                "64",
                "--max-steps",
                str(a.steps_stain),
                "--seed",
                "0",
                "--work-dir",
                str(work / "train"),
            ]
        )
        for name, res in results.items():
            dest = out / name / "v1"
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(res["package"], dest)
            print(
                json.dumps(
                    {
                        "model": name,
                        "metrics": res["metrics"],
                        "baseline": res["baseline_metrics"],
                        "steps": res["steps"],
                        "seconds": res["seconds"],
                    }
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
