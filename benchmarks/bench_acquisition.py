"""Simulator frames/s at 2048² and the acquisition callback's cost: JSON on stdout.

Options: ``scopestream bench acquisition --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.acquisition import bench_acquisition

if __name__ == "__main__":
    print(json.dumps(bench_acquisition()))
