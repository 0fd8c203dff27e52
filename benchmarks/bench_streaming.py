"""Ring buffer + zarr sink vs tensorstore and plain files, 200 frames of 2048²: JSON on stdout.

Options: ``scopestream bench streaming --help`` (same function, same JSON).
"""

from __future__ import annotations

import json

from scopestream.bench.streaming import bench_streaming

if __name__ == "__main__":
    print(json.dumps(bench_streaming()))
