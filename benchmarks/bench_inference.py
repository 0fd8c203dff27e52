"""Mpx/s per backend, model and size, model-only and end-to-end, vs eager torch: JSON out.

Options: ``scopestream bench inference --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.inference import bench_inference

if __name__ == "__main__":
    print(json.dumps(bench_inference()))
