"""Unpaired translation (CycleGAN, STABLE, its ablations) vs the supervised U-Net on the
simulator's brightfield → nuclei: Pearson, SSIM and object metrics vs the truth, JSON out.

Options: ``scopestream bench translation --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.translation import bench_translation

if __name__ == "__main__":
    print(json.dumps(bench_translation()))
