"""Streaming throughput: ring buffer + zarr sink vs the tensorstore and plain-file ceilings.

Usage: python benchmarks/bench_streaming.py [--frames N] [--shape 2048x2048] [--repeats R]
Prints one JSON object (also what ``scopestream bench streaming --json`` prints).
"""

from __future__ import annotations

import argparse
import json

from scopestream.bench import bench_streaming
from scopestream.config import parse_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--shape", default="2048x2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    res = bench_streaming(
        n_frames=a.frames,
        shape=parse_shape(a.shape),
        repeats=a.repeats,
        in_flight=a.in_flight,
        workdir=a.workdir,
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
