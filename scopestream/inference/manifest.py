"""The model package manifest (``manifest.yaml``) and fixed normalization.

Normalization is never per frame (that flickers): the constants come from the
training data and travel in the manifest, or are frozen from a short
calibration burst at the start of a run and recorded with the run.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from scopestream.inference.guard import Fingerprint  # noqa: TC001 (pydantic reads it at runtime)

MANIFEST_FORMAT = 1
Task = Literal["denoise", "stain"]
Spatial = Literal["2d", "2.5d-z", "2.5d-t", "3d"]


class Normalization(BaseModel):
    """``(x - offset) / scale`` per channel (one value broadcasts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    offset: tuple[float, ...] = (0.0,)
    scale: tuple[float, ...] = (1.0,)
    source: Literal["training", "calibration", "identity"] = "training"

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if len(self.offset) != len(self.scale):
            raise ValueError("offset and scale need the same number of channels")
        if any(not math.isfinite(s) or s == 0 for s in self.scale):
            raise ValueError("normalization scales must be finite and non-zero")
        return self

    def _bc(self, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
        off = np.asarray(self.offset, np.float32)
        sc = np.asarray(self.scale, np.float32)
        if off.size == 1:
            off, sc = np.repeat(off, n_channels), np.repeat(sc, n_channels)
        if off.size != n_channels:
            raise ValueError(f"normalization has {off.size} channels, data has {n_channels}")
        return off, sc

    def apply(self, x: np.ndarray, channel_axis: int = 0) -> np.ndarray:
        """Normalize (float32 out)."""
        off, sc = self._bc(x.shape[channel_axis])
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        out: np.ndarray = (x.astype(np.float32) - off.reshape(shape)) / sc.reshape(shape)
        return out

    def invert(self, y: np.ndarray, channel_axis: int = 0) -> np.ndarray:
        """Back to data units."""
        off, sc = self._bc(y.shape[channel_axis])
        shape = [1] * y.ndim
        shape[channel_axis] = -1
        out: np.ndarray = y * sc.reshape(shape) + off.reshape(shape)
        return out

    @classmethod
    def from_percentiles(
        cls,
        data: np.ndarray,
        low: float = 1.0,
        high: float = 99.8,
        channel_axis: int | None = None,
        source: Literal["training", "calibration"] = "calibration",
    ) -> Normalization:
        """Constants that map the ``low``/``high`` percentiles to 0/1."""
        chans = [data] if channel_axis is None else list(np.moveaxis(data, channel_axis, 0))
        offs, scs = [], []
        for c in chans:
            lo, hi = np.percentile(c, [low, high])
            offs.append(float(lo))
            scs.append(float(hi - lo) if hi > lo else 1.0)
        return cls(offset=tuple(offs), scale=tuple(scs), source=source)


def _default_weights() -> dict[Literal["torch", "onnx"], str]:
    return {"torch": "weights.pt", "onnx": "model.onnx"}


class Architecture(BaseModel):
    """Which network and its constructor arguments."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["denoise_unet", "stain_unet", "stable", "resnet", "gpt", "external"] = Field(
        description="external: an imported network (TorchScript and/or ONNX weights, no source)"
    )
    params: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """Everything needed to run (and trust) a model, saved as ``manifest.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    version: int = Field(1, ge=1)
    task: Task
    description: str = ""
    architecture: Architecture
    inputs: tuple[str, ...] = Field(
        description="input channel names; '*' = any one channel, applied per channel"
    )
    outputs: tuple[str, ...]
    spatial: Spatial = "2d"
    window: int = Field(1, ge=1, description="frames in a 2.5d window (odd, centred or causal)")
    size_multiple: tuple[int, ...] = (8, 8)
    halo: tuple[int, ...] = (56, 56)
    input_norm: Normalization = Normalization()
    output_norm: Normalization = Normalization()
    training: dict[str, Any] = Field(default_factory=dict)
    fingerprint: Fingerprint | None = Field(
        None, description="what the training data looked like (the domain-shift guard's)"
    )
    weights: dict[Literal["torch", "onnx"], str] = Field(default_factory=_default_weights)
    files_sha256: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        n_sp = 3 if self.spatial == "3d" else 2
        if len(self.size_multiple) != n_sp or len(self.halo) != n_sp:
            raise ValueError(f"{self.spatial} needs {n_sp} entries in size_multiple and halo")
        if self.spatial in ("2.5d-z", "2.5d-t") and self.window < 2:
            raise ValueError(f"a {self.spatial} model needs a window of at least 2 frames")
        if self.spatial in ("2d", "3d") and self.window != 1:
            raise ValueError(f"a {self.spatial} model takes no window")
        if len(self.inputs) != 1:
            raise ValueError("models take one input channel (several stains may come out)")
        if self.task == "denoise" and len(self.outputs) != 1:
            raise ValueError("a denoiser has one output channel")
        return self

    @property
    def in_channels(self) -> int:
        """Channels the network itself takes (a 2.5D window goes in as channels)."""
        return self.window if self.spatial.startswith("2.5d") else 1

    @property
    def n_spatial(self) -> int:
        """Spatial axes of the network's input."""
        return 3 if self.spatial == "3d" else 2

    def output_channel_names(self, source_channel: str) -> tuple[str, ...]:
        """Names of this model's outputs for frames of ``source_channel``."""
        if self.inputs == ("*",):
            return tuple(o.replace("*", source_channel) for o in self.outputs)
        return self.outputs

    def accepts(self, channel: str) -> bool:
        """Whether frames of ``channel`` are this model's input."""
        return self.inputs == ("*",) or channel in self.inputs
