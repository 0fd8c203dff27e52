"""16 positions × 100 time points at 512² vs one position's 1600 frames, through the
pipeline (target: ratio ≥ 0.8): JSON on stdout.

Options: ``scopestream bench positions --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.positions import bench_positions

if __name__ == "__main__":
    print(json.dumps(bench_positions()))
