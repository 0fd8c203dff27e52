"""scopestream: live AI for microscopes.

Frames leave the camera, are denoised or virtually stained while the experiment
runs, and land in OME-Zarr and napari next to the raw data. ``import scopestream``
is cheap: heavy optional dependencies are imported where they are used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
