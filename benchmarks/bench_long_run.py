"""100 000 frames of 64² recorded open-ended: RSS flat, root zarr.json small, fps vs tensorstore.

Options: ``scopestream bench long-run --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.long_run import bench_long_run

if __name__ == "__main__":
    print(json.dumps(bench_long_run()))
