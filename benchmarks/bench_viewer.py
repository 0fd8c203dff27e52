"""Live display: updates/s into napari while 1000 frames of 1024² stream, and memory growth.

Usage: python benchmarks/bench_viewer.py [--frames 1000] [--shape 1024x1024] [--fps 100]
Prints one JSON object (also what ``scopestream bench viewer --json`` prints). Starts an
Xvfb when there is no display. Goal: ≥ 15 updates/s, < 50 MB growth after warm-up.
"""

from __future__ import annotations

import argparse
import json

from scopestream.config import parse_shape
from scopestream.viewer.bench import bench_viewer, ensure_display


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--shape", default="1024x1024")
    ap.add_argument("--fps", type=float, default=100.0)
    a = ap.parse_args()
    xvfb = ensure_display()
    try:
        res = bench_viewer(n_frames=a.frames, shape=parse_shape(a.shape), fps=a.fps)
    finally:
        if xvfb is not None:
            xvfb.terminate()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
