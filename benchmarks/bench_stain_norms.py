"""Virtual staining with each of the seeds' normalizations on the simulator's pairs:
Pearson r vs the noise-free truth, JSON out.

Options: ``scopestream bench stain-norms --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.stain_norms import bench_stain_norms

if __name__ == "__main__":
    print(json.dumps(bench_stain_norms()))
