"""Live napari display at 1024² vs napari alone, and memory growth: JSON on stdout.

Starts an Xvfb when there is no display. Options: ``scopestream bench viewer --help``.
"""

from __future__ import annotations

import json

from scopestream.bench.viewer import bench_viewer_with_display

if __name__ == "__main__":
    print(json.dumps(bench_viewer_with_display()))
