"""Denoising quality on real fluorescence at 5/20/100 photons: our N2V, N2V2 and CARE
vs a plain N2V and CAREamics at the same optimizer steps: JSON out.

Options: ``scopestream bench quality --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.quality import bench_quality

if __name__ == "__main__":
    print(json.dumps(bench_quality()))
