"""`StackAssembler`: frames → z-stacks or temporal windows, for models that take stacks.

``mode="z"``
    Frames sharing ``(t, p, c)`` are gathered into a ``(n_z, y, x)`` stack in
    z order, whatever order the planes arrive in. A stack is emitted the moment
    its last plane arrives. At most ``max_open`` stacks are open at once; a new
    one beyond that evicts the oldest, which is emitted *incomplete* (with the
    missing planes named) rather than held forever. `flush` emits every stack
    still open when acquisition stops. Nothing is dropped silently.
``mode="t"``
    A causal sliding window of the last ``size`` time points for each
    ``(p, c, z)``: every frame yields the window that ends at it, so a live
    model predicts the newest frame. The first ``size - 1`` windows of a series
    are padded by repeating its first frame and flagged ``padded``; a window
    whose time points are not consecutive names them in ``missing``. Either is
    not `complete`, and the runner never hands it to a model.

Stacks are frozen work items (STYLE.md 8); their arrays are owned by the stack.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from scopestream.streaming.frame import FrameMeta


@dataclass(frozen=True)
class Stack:
    """A z-stack or temporal window ready for a model."""

    key: tuple[int, int, int]
    data: np.ndarray
    metas: tuple[FrameMeta | None, ...]
    missing: tuple[int, ...] = ()
    padded: int = 0

    @property
    def complete(self) -> bool:
        """Every plane was acquired (and, for windows, none is padding)."""
        return not self.missing and not self.padded

    @property
    def newest(self) -> FrameMeta:
        """Metadata of the newest frame in the stack (the one a live prediction is for)."""
        present = [m for m in self.metas if m is not None]
        return max(present, key=lambda m: m["seq"])


class StackAssembler:
    """Groups frames into stacks by their indices (see module docstring)."""

    def __init__(
        self,
        frame_shape: tuple[int, int],
        dtype: np.dtype | str,
        *,
        mode: Literal["z", "t"],
        size: int,
        max_open: int = 4,
    ) -> None:
        if mode not in ("z", "t"):
            raise ValueError(f"mode must be 'z' or 't', got {mode!r}")
        if size < 1 or max_open < 1:
            raise ValueError("size and max_open must be positive")
        self.frame_shape = tuple(frame_shape)
        self.dtype = np.dtype(dtype)
        self.mode = mode
        self.size = int(size)
        self.max_open = int(max_open)
        self._open: OrderedDict[
            tuple[int, int, int], tuple[np.ndarray, list[FrameMeta | None]]
        ] = OrderedDict()
        self._history: dict[tuple[int, int, int], tuple[np.ndarray, list[FrameMeta], int]] = {}
        self.emitted = 0
        self.incomplete = 0
        self.evicted = 0
        self.rejected = 0

    def counters(self) -> dict[str, int]:
        """Stacks emitted, of which incomplete, evicted by newer stacks; frames rejected."""
        return {
            "stacks": self.emitted,
            "incomplete": self.incomplete,
            "evicted": self.evicted,
            "rejected_frames": self.rejected,
            "open": len(self._open),
        }

    def add(self, data: np.ndarray, meta: FrameMeta) -> list[Stack]:
        """Add one frame (copied); return the stacks it completes (possibly several)."""
        if data.shape != self.frame_shape:
            raise ValueError(
                f"frame {meta['seq']} has shape {data.shape}, expected {self.frame_shape}"
            )
        if self.mode == "z":
            return self._add_z(data, meta)
        return [self._add_t(data, meta)]

    def _add_z(self, data: np.ndarray, meta: FrameMeta) -> list[Stack]:
        z = meta["z"]
        if not 0 <= z < self.size:
            self.rejected += 1
            raise ValueError(f"frame {meta['seq']} is at z={z}; stacks have {self.size} planes")
        key = (meta["t"], meta["p"], meta["c"])
        out: list[Stack] = []
        if key not in self._open:
            if len(self._open) >= self.max_open:
                old_key = next(iter(self._open))
                self.evicted += 1
                out.append(self._emit(old_key))
            self._open[key] = (
                np.zeros((self.size, *self.frame_shape), self.dtype),
                [None] * self.size,
            )
        buf, metas = self._open[key]
        if metas[z] is not None:
            # a repeated plane: the earlier stack was over; emit it as it stands
            out.append(self._emit(key))
            self._open[key] = (
                np.zeros((self.size, *self.frame_shape), self.dtype),
                [None] * self.size,
            )
            buf, metas = self._open[key]
        np.copyto(buf[z], data, casting="unsafe")
        metas[z] = meta
        if all(m is not None for m in metas):
            out.append(self._emit(key))
        return out

    def _emit(self, key: tuple[int, int, int]) -> Stack:
        buf, metas = self._open.pop(key)
        missing = tuple(i for i, m in enumerate(metas) if m is None)
        self.emitted += 1
        if missing:
            self.incomplete += 1
        return Stack(key, buf, tuple(metas), missing=missing)

    def _add_t(self, data: np.ndarray, meta: FrameMeta) -> Stack:
        key = (meta["p"], meta["c"], meta["z"])
        hist = self._history.get(key)
        if hist is None:
            ring = np.empty((self.size, *self.frame_shape), self.dtype)
            hist = (ring, [], 0)
        ring, metas, n = hist
        np.copyto(ring[n % self.size], data, casting="unsafe")
        if len(metas) < self.size:
            metas.append(meta)
        else:
            metas[n % self.size] = meta
        n += 1
        self._history[key] = (ring, metas, n)
        have = min(n, self.size)
        order = [(n - have + i) % self.size for i in range(have)]  # oldest → newest
        window = np.empty((self.size, *self.frame_shape), self.dtype)
        pad = self.size - have
        window[pad:] = ring[order]
        window[:pad] = ring[order[0]]
        wmetas = tuple([metas[order[0]]] * pad + [metas[i] for i in order])
        ts = [metas[i]["t"] for i in order]
        # a window is consecutive time points: a skipped or lost one is a gap, never hidden
        gaps = tuple(sorted(set(range(ts[0], ts[-1] + 1)) - set(ts))) if ts[-1] >= ts[0] else ()
        if ts != sorted(ts):
            gaps = gaps or (ts[-1],)
        self.emitted += 1
        if pad or gaps:
            self.incomplete += 1
        return Stack(key, window, wmetas, missing=gaps, padded=pad)

    def flush(self) -> list[Stack]:
        """Emit every open z-stack (incomplete, missing planes named); reset windows."""
        out = [self._emit(k) for k in list(self._open)]
        self._history.clear()
        return out
