"""scopestream: live AI for microscopes.

Frames leave the camera, are denoised or virtually stained while the experiment
runs, and land in OME-Zarr and napari next to the raw data. ``import scopestream``
is cheap: the public API below is imported on first use, and heavy optional
dependencies (torch, napari, pycromanager) only where they are used.

>>> import scopestream as ss
>>> pipe = ss.Pipeline.from_config({"source": "sim", "frames": 100, "models": ["denoise"]})
>>> summary = pipe.run()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name → module that defines it (imported lazily, PEP 562)
_API = {
    "Pipeline": "scopestream.pipeline",
    "PipelineError": "scopestream.pipeline",
    "RunConfig": "scopestream.config",
    "load_config": "scopestream.config",
    "RunSignals": "scopestream.streaming.signals",
    "FrameEvent": "scopestream.streaming.signals",
    "ModelVersion": "scopestream.streaming.signals",
    "RunResult": "scopestream.streaming.signals",
    "read_frame_index": "scopestream.streaming.frame_index",
    "SavedRun": "scopestream.streaming.saved_run",
    "AcquisitionPlan": "scopestream.acquisition.plan",
}

__all__ = [
    "AcquisitionPlan",
    "FrameEvent",
    "ModelVersion",
    "Pipeline",
    "PipelineError",
    "RunConfig",
    "RunResult",
    "RunSignals",
    "SavedRun",
    "__version__",
    "load_config",
    "read_frame_index",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'scopestream' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
