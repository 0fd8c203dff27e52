"""GPT vs our stain U-Net at equal training time on the simulator's brightfield →
nuclei + membrane: Pearson r per stain vs the truth, JSON out.

Options: ``scopestream bench gpt --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.gpt import bench_gpt

if __name__ == "__main__":
    print(json.dumps(bench_gpt()))
