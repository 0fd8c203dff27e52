"""What the live display shows: the newest frame of every raw channel and model output.

`LatestFrames` is a `FrameSink` (for the raw stream, on the ``latest`` policy so
the display never holds the pipeline back) and a target for the inference
engines' ``on_prediction`` hook. It runs on the pipeline's threads, keeps one
buffer per displayed image and a version counter, and never touches Qt: the
viewer's main-thread timer asks it for what changed since its last look.

Copies are throttled (``max_hz`` per image): at 1000 fps a display needs 30 of
them, not 1000. For z-stack runs an image is the current stack ``(Z, Y, X)``,
filled plane by plane; otherwise the newest frame ``(Y, X)``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.streaming.saved_run import layer_name, output_kind

__all__ = ["LatestFrames", "Shown", "layer_name", "output_kind"]

if TYPE_CHECKING:
    from collections.abc import Mapping

    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.layout import StreamInfo


@dataclass
class Shown:
    """One displayed image: its key, kind, channel, and newest pixels."""

    key: str  # layer name, e.g. "nuclei (raw)", "nuclei (predicted)"
    kind: str  # raw | denoised | predicted
    channel: str
    model: str | None
    data: np.ndarray
    version: int = 0
    t: int = 0
    seq: int = -1
    #: the GUI holds ``data`` (a stack): the next plane goes into a fresh copy
    shared: bool = False


class LatestFrames:
    """Thread-safe newest frames per displayed image (see the module docstring)."""

    def __init__(self, info: StreamInfo, max_hz: float = 60.0) -> None:
        self.info = info
        self.n_z = int(info.n_z)
        self.min_interval_ns = int(1e9 / max_hz) if max_hz > 0 else 0
        #: the runner hands this stage at most this many raw frames a second (0: every
        #: newest frame): each channel's newest frame at ``max_hz``; stacks show every plane
        self.max_hz = max_hz * info.n_c if self.n_z == 1 and max_hz > 0 else 0.0
        self._lock = threading.Lock()
        self._images: dict[str, Shown] = {}
        self._last_copy: dict[str, int] = {}
        self.frames_seen = 0
        self.frames_copied = 0
        self.closed = False

    # -- writers (pipeline threads) ------------------------------------------------
    def _due(self, key: str, z: int) -> bool:
        if self.n_z > 1:
            return True  # every plane of the stack is shown
        now = time.monotonic_ns()
        if now - self._last_copy.get(key, 0) < self.min_interval_ns:
            return False
        self._last_copy[key] = now
        return True

    def _put(
        self,
        key: str,
        kind: str,
        channel: str,
        model: str | None,
        plane: np.ndarray,
        meta: FrameMeta,
        *,
        owned: bool,
    ) -> None:
        z = int(meta["z"])
        with self._lock:
            self.frames_seen += 1
            if not self._due(key, z):
                return
            shown = self._images.get(key)
            if self.n_z > 1:
                if shown is None:
                    buf = np.zeros((self.n_z, *plane.shape), plane.dtype)
                    shown = self._images[key] = Shown(key, kind, channel, model, buf)
                elif shown.shared:  # copy on write: the GUI thread never copies under the lock
                    shown.data = shown.data.copy()
                    shown.shared = False
                shown.data[z] = plane
            else:
                data = plane if owned else np.array(plane, copy=True)
                if shown is None:
                    shown = self._images[key] = Shown(key, kind, channel, model, data)
                shown.data = data
            shown.version += 1
            shown.t, shown.seq = int(meta["t"]), int(meta["seq"])
            self.frames_copied += 1

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """A raw frame (borrowed from the ring buffer: copied when shown)."""
        ch = self.info.channel_names[meta["c"]]
        self._put(layer_name("raw", ch), "raw", ch, None, data, meta, owned=False)

    def put_prediction(
        self,
        model: str,
        kind: str,
        channel_names: tuple[str, ...],
        wildcard: bool,
        y: np.ndarray,
        meta: FrameMeta,
    ) -> None:
        """A model's outputs ``(C_out, Y, X)`` for the frame ``meta`` (owned by the engine)."""
        for j in range(y.shape[0]):
            ch = channel_names[meta["c"] if wildcard else j]
            self._put(layer_name(kind, ch), kind, ch, model, y[j], meta, owned=True)

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """The stream ended (the viewer stays open)."""
        self.closed = True

    # -- reader (the GUI thread) --------------------------------------------------------
    def changed(self, seen: dict[str, int]) -> list[Shown]:
        """Images whose version differs from ``seen`` (updated in place)."""
        out = []
        with self._lock:
            for key, shown in self._images.items():
                if seen.get(key) != shown.version:
                    seen[key] = shown.version
                    data = shown.data
                    shown.shared = self.n_z > 1  # stacks are filled in place: copy on write
                    out.append(
                        Shown(
                            key,
                            shown.kind,
                            shown.channel,
                            shown.model,
                            data,
                            shown.version,
                            shown.t,
                            shown.seq,
                        )
                    )
        return out

    def keys(self) -> list[str]:
        """Displayed images so far."""
        with self._lock:
            return list(self._images)
