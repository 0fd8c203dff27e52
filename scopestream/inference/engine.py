"""`InferenceEngine`: live prediction as a frame sink, and hot model swaps.

The runner gives the engine its own thread and a ring-buffer consumer with
one of two policies: ``latest`` (live: always the newest frame, skipped frames
counted) or ``all`` (every frame; if the model falls behind the ring buffer,
the frames it missed are read back from the recording, so raw data is never
held hostage and the run reports how far behind the model is).

Per the model's spatial mode the engine predicts each frame (``2d``), each
causal window of the last k time points (``2.5d-t``, via the
`StackAssembler`), or each complete z-stack (``2.5d-z``: a window of k planes
around every plane; ``3d``: the whole stack). Each output is written to its
own image of the run (e.g. ``RUN.ome.zarr/stain`` with channels ``nuclei``,
``membrane``) with the model's identity; the newest prediction is kept for the
viewer.

Hot swap: `swap` hands over a new `Predictor` (loaded and compiled elsewhere,
e.g. by `RegistryWatcher` in the background); it takes over at the next frame
boundary, and the image's attributes record from which frame each version ran.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.streaming.assembler import StackAssembler
from scopestream.streaming.metrics import StageMetrics

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from scopestream.inference.predictor import Predictor
    from scopestream.streaming.frame import FrameMeta


class ModelChannelError(ValueError):
    """A model whose input channel the source does not have."""


def output_names(predictor: Predictor, source_channels: tuple[str, ...]) -> tuple[str, ...]:
    """Channel names of a model's output image for a source with ``source_channels``."""
    m = predictor.manifest
    if m.inputs == ("*",):
        return tuple(m.output_channel_names(c)[0] for c in source_channels)
    return m.outputs


def check_channels(predictor: Predictor, source_channels: tuple[str, ...]) -> list[int]:
    """Indices of the source channels the model takes; a clear error if none."""
    m = predictor.manifest
    idx = [i for i, c in enumerate(source_channels) if m.accepts(c)]
    if not idx:
        raise ModelChannelError(
            f"model {m.name!r} takes channel {list(m.inputs)}; the source has "
            f"{list(source_channels)} (name the channel in the plan, e.g. --channels "
            f"{m.inputs[0]}:20)"
        )
    return idx


class InferenceEngine:
    """Predicts what it is given and writes the outputs (a `FrameSink`).

    Parameters
    ----------
    predictor
        The model, ready to run.
    writer
        Where outputs go: something with ``write(data, meta)`` keyed by
        ``meta``'s (t, c, z), and ``close(status, **attrs)`` / ``update_attrs``.
    source_channels
        Channel names of the stream.
    n_z
        Planes per z-stack of the stream.
    on_prediction
        Called with (outputs, meta) for every prediction (the viewer's hook).
    calibrate
        Freeze the input normalization from the first ``calibrate`` frames of the
        run (held back, then predicted with the frozen constants) instead of the
        model's training constants. Never recomputed after.
    """

    def __init__(
        self,
        predictor: Predictor,
        writer: Any,
        *,
        source_channels: tuple[str, ...],
        n_z: int = 1,
        on_prediction: Callable[[np.ndarray, FrameMeta], None] | None = None,
        calibrate: int = 0,
    ) -> None:
        self.predictor = predictor
        self.calibrate = max(0, calibrate)
        self._burst: list[tuple[np.ndarray, FrameMeta]] = []
        self.writer = writer
        self.source_channels = source_channels
        self.targets = set(check_channels(predictor, source_channels))
        self.wildcard = predictor.manifest.inputs == ("*",)
        self.n_z = n_z
        self.on_prediction = on_prediction
        self.metrics = StageMetrics(f"predict:{predictor.manifest.name}")
        self.predicted = 0
        self.ignored = 0
        self.incomplete_stacks = 0
        self.latest: tuple[np.ndarray, FrameMeta] | None = None
        self.versions: list[dict[str, Any]] = [
            {**predictor.describe(), "from_seq": 0, "from_t": 0}
        ]
        self._pending: Predictor | None = None
        self._swap_lock = threading.Lock()
        self._assembler = self._make_assembler()
        self.predict_ms: list[float] = []

    @property
    def frames_written(self) -> int:
        """Frames (or planes) predicted."""
        return self.predicted

    def _make_assembler(self) -> StackAssembler | None:
        m = self.predictor.manifest
        y, x = (0, 0)
        if m.spatial == "2.5d-t":
            return StackAssembler((y, x), "float32", mode="t", size=m.window)
        if m.spatial in ("2.5d-z", "3d"):
            return StackAssembler((y, x), "float32", mode="z", size=self.n_z)
        return None

    # -- hot swap ----------------------------------------------------------------
    def swap(self, predictor: Predictor) -> None:
        """Hand over a new model; it takes over at the next frame boundary.

        Raises `SwapRefused` (see `swap_incompatibility`) for a model with
        another spatial mode, window, input channels or outputs; the running
        model goes on.
        """
        # watcher.py owns the swap rules (it imports this module only for types)
        from scopestream.inference.watcher import SwapRefused, swap_incompatibility

        reason = swap_incompatibility(self.predictor.manifest, predictor.manifest)
        if reason is not None:
            raise SwapRefused(reason)
        check_channels(predictor, self.source_channels)
        with self._swap_lock:
            self._pending = predictor

    def _apply_swap(self, meta: FrameMeta) -> None:
        with self._swap_lock:
            new, self._pending = self._pending, None
        if new is None:
            return
        self.predictor = new
        self.versions.append({**new.describe(), "from_seq": meta["seq"], "from_t": meta["t"]})
        self.writer.update_attrs(versions=self.versions)

    # -- FrameSink -----------------------------------------------------------------
    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Predict one frame (or feed it to the window/stack being assembled)."""
        self._apply_swap(meta)
        if meta["c"] not in self.targets:
            self.ignored += 1
            return
        if self.calibrate and len(self._burst) < self.calibrate:
            self._burst.append((np.array(data, copy=True), dict(meta)))  # type: ignore[arg-type]
            if len(self._burst) < self.calibrate:
                return
            self._freeze_calibration()
            return
        self._predict_frame(data, meta)

    def _freeze_calibration(self) -> None:
        burst, self._burst = self._burst, []
        self.calibrate = 0
        self.predictor = self.predictor.calibrated(np.stack([b[0] for b in burst]))
        norm = self.predictor.input_norm.model_dump(mode="json")
        self.versions[-1]["input_norm"] = norm
        self.writer.update_attrs(calibration={"frames": len(burst), "input_norm": norm})
        for data, meta in burst:
            self._predict_frame(data, meta)

    def _predict_frame(self, data: np.ndarray, meta: FrameMeta) -> None:
        m = self.predictor.manifest
        if self._assembler is None:
            self._emit(self._predict(data), meta, meta["z"])
            return
        if self._assembler.frame_shape != data.shape:
            self._assembler = StackAssembler(
                data.shape, "float32", mode=self._assembler.mode, size=self._assembler.size
            )
        for stack in self._assembler.add(data, meta):
            if m.spatial == "2.5d-t":
                self._emit(self._predict(stack.data), stack.newest, stack.newest["z"])
            else:
                self._predict_stack(stack.data, stack.metas)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        y = self.predictor.predict(x)
        self.predict_ms.append((time.perf_counter() - t0) * 1e3)
        if len(self.predict_ms) > 4096:
            del self.predict_ms[:2048]
        return y

    def _predict_stack(self, stack: np.ndarray, metas: tuple[FrameMeta | None, ...]) -> None:
        m = self.predictor.manifest
        present = [i for i, mm in enumerate(metas) if mm is not None]
        if len(present) < len(metas):
            self.incomplete_stacks += 1
        if m.spatial == "3d":
            y = self._predict(stack)  # (C_out, Z, Y, X)
            for z in present:
                meta = metas[z]
                assert meta is not None
                self._emit(y[:, z], meta, z)
            return
        k = m.window
        n = stack.shape[0]
        for z in present:
            idx = np.clip(np.arange(z - k // 2, z - k // 2 + k), 0, n - 1)
            meta = metas[z]
            assert meta is not None
            self._emit(self._predict(stack[idx]), meta, z)

    def _emit(self, y: np.ndarray, meta: FrameMeta, z: int) -> None:
        for j in range(y.shape[0]):
            c_out = meta["c"] if self.wildcard else j
            out_meta = dict(meta)
            out_meta.update(c=c_out, z=z)
            self.writer.write(y[j], out_meta)
        self.predicted += 1
        self.metrics.record(meta["timestamp_ns"])
        self.latest = (y, meta)
        if self.on_prediction is not None:
            self.on_prediction(y, meta)

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Predict stacks left incomplete at the end (missing planes stay unwritten); close."""
        if self._burst and status == "complete":  # a run shorter than the burst
            self._freeze_calibration()
        if self._assembler is not None and status == "complete":
            for stack in self._assembler.flush():
                if self.predictor.manifest.spatial == "2.5d-t":
                    continue  # windows are emitted as frames arrive; nothing is pending
                self._predict_stack(stack.data, stack.metas)
        self.writer.close(
            status,
            versions=self.versions,
            predicted=self.predicted,
            ignored_frames=self.ignored,
            incomplete_stacks=self.incomplete_stacks,
        )
