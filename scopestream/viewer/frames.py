"""What the live display shows: the newest frame of every raw channel and model output.

`LatestFrames` is a `FrameSink` (for the raw stream, on the ``latest`` policy so
the display never holds the pipeline back) and a target for the inference
engines' ``on_prediction`` hook. It runs on the pipeline's threads, keeps one
buffer per displayed image and a version counter, and never touches Qt: the
viewer's main-thread timer asks it for what changed since its last look.

Copies are throttled (``max_hz`` per image): at 1000 fps a display needs 30 of
them, not 1000. For z-stack runs an image is the current stack ``(Z, Y, X)``,
filled plane by plane; otherwise the newest frame ``(Y, X)``.

In a run of several positions (fields) every image is kept per field and the
display shows one field at a time, all its layers from that field: the field
being imaged (``shown_p`` None, the default) or the one chosen (`select`).
Each field's newest raw frame of the first channel also gives a small
thumbnail (`thumbnails`: the plate overview).
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
    p: int = 0  # the field (position) it shows
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
        self.n_p = int(info.n_p)
        if self.n_p > 1 and self.max_hz:
            self.max_hz *= self.n_p  # each field's newest frames
        self._lock = threading.Lock()
        self._images: dict[tuple[str, int], Shown] = {}
        self._last_copy: dict[tuple[str, int], int] = {}
        #: the field shown: None follows the one being imaged (`imaging`)
        self.shown_p: int | None = None
        self.imaging = 0
        self._thumbs: dict[int, tuple[int, np.ndarray]] = {}  # p → (version, uint8 picture)
        self._thumb_version = 0
        self.frames_seen = 0
        self.frames_copied = 0
        self.closed = False

    # -- writers (pipeline threads) ------------------------------------------------
    def _due(self, key: tuple[str, int], z: int) -> bool:
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
        z, p = int(meta["z"]), int(meta["p"])
        at = (key, p)
        with self._lock:
            self.frames_seen += 1
            if kind == "raw":
                self.imaging = p
            if not self._due(at, z):
                return
            shown = self._images.get(at)
            if self.n_z > 1:
                if shown is None:
                    buf = np.zeros((self.n_z, *plane.shape), plane.dtype)
                    shown = self._images[at] = Shown(key, kind, channel, model, buf, p=p)
                elif shown.shared:  # copy on write: the GUI thread never copies under the lock
                    shown.data = shown.data.copy()
                    shown.shared = False
                shown.data[z] = plane
            else:
                data = plane if owned else np.array(plane, copy=True)
                if shown is None:
                    shown = self._images[at] = Shown(key, kind, channel, model, data, p=p)
                shown.data = data
            shown.version += 1
            shown.t, shown.seq = int(meta["t"]), int(meta["seq"])
            self.frames_copied += 1
            if self.n_p > 1 and kind == "raw" and meta["c"] == 0:
                self._thumb_version += 1
                # the display's own copy (a raw plane is borrowed from the ring buffer)
                own = shown.data if self.n_z == 1 else shown.data[z]
                self._thumbs[p] = (self._thumb_version, own)

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """A raw frame (borrowed from the ring buffer: copied when shown)."""
        ch = self.info.channel_names[meta["c"]]
        self._put(layer_name("raw", ch), "raw", ch, None, data, meta, owned=False)

    def put_prediction(
        self,
        model: str,
        kind: str,
        channel_names: tuple[str, ...],
        y: np.ndarray,
        meta: FrameMeta,
    ) -> None:
        """A model's outputs ``(C_out, Y, X)`` for the frame ``meta`` (owned by the engine),
        named ``channel_names``."""
        for j, ch in enumerate(channel_names):
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
    def select(self, p: int | None) -> None:
        """Show field ``p`` (None: the field being imaged)."""
        with self._lock:
            self.shown_p = None if p is None else min(max(0, int(p)), self.n_p - 1)

    @property
    def showing(self) -> int:
        """The field on screen now."""
        return self.imaging if self.shown_p is None else self.shown_p

    def changed(self, seen: dict[str, tuple[int, int]]) -> list[Shown]:
        """The shown field's images whose (field, version) differs from ``seen``
        (updated in place): choosing another field shows all of its images."""
        out = []
        with self._lock:
            p = self.showing
            for (key, q), shown in self._images.items():
                if q != p:
                    continue
                if seen.get(key) != (p, shown.version):
                    seen[key] = (p, shown.version)
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
                            p,
                        )
                    )
        return out

    def thumbnails(self, seen: dict[int, int], size: int = 40) -> dict[int, np.ndarray]:
        """Per field, a small picture of its newest raw frame, if new since ``seen``.

        Made here, on the GUI thread, from the frame the display copied (a few
        hundred pixels each)."""
        from scopestream.viewer.plate import thumbnail

        with self._lock:
            new = {p: plane for p, (v, plane) in self._thumbs.items() if seen.get(p) != v}
            for p in new:
                seen[p] = self._thumbs[p][0]
        return {p: thumbnail(plane, size) for p, plane in new.items()}

    def keys(self) -> list[str]:
        """Displayed images so far (their layer names)."""
        with self._lock:
            return list(dict.fromkeys(k for k, _ in self._images))
