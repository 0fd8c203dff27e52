"""`InferenceEngine`: live prediction as a frame sink, and hot model swaps.

The engine is a `Stage`: its `InputContract` tells the runner what to feed it.
A 2D model takes the newest frame (``latest``: skipped frames counted) or
every frame (``every``: frames it missed are read back from the recording with
their recorded metadata, so raw data is never held hostage); a stack model
gets complete z-stacks (``complete_stack``) and a temporal model gap-free
windows (``window``), whatever the policy: no prediction is ever made from a
zero-filled or padded stack.

Per the model's spatial mode the engine predicts each frame (``2d``), each
causal window of the last k time points (``2.5d-t``), or each complete z-stack
(``2.5d-z``: a window of k planes around every plane; ``3d``: the whole
stack). Each output is written to its own image of the run (e.g.
``RUN.ome.zarr/stain`` with channels ``nuclei``, ``membrane``) with the model's
identity; ``on_prediction`` hands each prediction to the viewer.

Hot swap: `swap` hands over a new `Predictor` (loaded elsewhere, e.g. by
`RegistryWatcher` in the background); at the next frame boundary it is warmed
on this thread with the live frame's dtype and shape (CUDA graphs are captured
here, never in the background) and takes over; the image's attributes record
from which frame each version ran. A version that fails there is refused and
the running one goes on.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scopestream.inference.guard import DomainGuard, ShiftWarning
from scopestream.streaming.assembler import StackAssembler
from scopestream.streaming.metrics import StageMetrics
from scopestream.streaming.seams import InputContract

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from scopestream.inference.manifest import Normalization
    from scopestream.inference.predictor import Predictor
    from scopestream.streaming.assembler import Stack
    from scopestream.streaming.frame import FrameMeta


log = logging.getLogger(__name__)


class ModelChannelError(ValueError):
    """A model whose input channel the source does not have."""


def uncertainty_score(y: np.ndarray, spread: np.ndarray) -> float:
    """One number per prediction: the ensemble's mean spread over the output's range
    (its 1st to 99.8th percentile, from a strided sample), so scores of frames and
    channels of different brightness compare. 0: every member agreed."""
    sample = y[..., ::4, ::4]
    lo, hi = np.percentile(sample, [1.0, 99.8])
    return float(np.mean(spread) / max(float(hi - lo), 1e-12))


def output_names(
    predictor: Predictor, source_channels: tuple[str, ...], targets: list[int] | None = None
) -> tuple[str, ...]:
    """Channel names of a model's output image for a source with ``source_channels``.

    A model of any input (``*``) has one output channel per source channel it runs
    on: ``targets`` (indices, as `check_channels` returns them; default every one).
    """
    m = predictor.manifest
    if m.inputs == ("*",):
        idx = range(len(source_channels)) if targets is None else sorted(targets)
        return tuple(m.output_channel_names(source_channels[i])[0] for i in idx)
    return m.outputs


#: how a live run names the channel a model takes (the plan's channel names)
RUN_CHANNEL_HINT = "name the channel in the plan, e.g. --channels {input}:20"
#: how a live run tells a model of any input to run on a channel it was not trained on
RUN_FORCE_HINT = "to run it there anyway, name the channel: --model {model}:{channel}"


def trained_channels(predictor: Predictor) -> tuple[str, ...]:
    """The channels a model of any input (``*``) was trained on (its fingerprint's).

    Empty for a model with named inputs (they say it) or without a fingerprint.
    """
    m = predictor.manifest
    if m.inputs != ("*",) or m.fingerprint is None:
        return ()
    return tuple(m.fingerprint.channels)


def check_channels(
    predictor: Predictor,
    source_channels: tuple[str, ...],
    *,
    input_channel: str | None = None,
    channels: tuple[str, ...] | None = None,
    hint: str = RUN_CHANNEL_HINT,
    force_hint: str = RUN_FORCE_HINT,
) -> list[int]:
    """Indices of the source channels the model runs on; a clear error if none.

    A model with named inputs runs on those. A model of any input (``*``) runs
    only on the channels it was trained on (its fingerprint's), never on every
    channel: a denoiser trained on nuclei makes brightfield worse. ``channels``
    (``--model NAME:CH,...``) overrides that; ``input_channel``: the one source
    channel to give the model, whatever its name (a file whose channels are not
    named as the model's input). ``hint`` ends the error for a channel the model
    cannot take (``{input}``: its first input), ``force_hint`` the one for a
    channel it was not trained on (``{model}``, ``{channel}``), naming what the
    caller's command offers.
    """
    m = predictor.manifest
    if input_channel is not None:
        if input_channel not in source_channels:
            raise ModelChannelError(
                f"input channel {input_channel!r} is not one of the source's "
                f"{list(source_channels)}"
            )
        return [source_channels.index(input_channel)]
    if channels is not None:
        if not channels:
            raise ModelChannelError(f"model {m.name!r}: no channel named")
        for c in channels:
            if c not in source_channels:
                raise ModelChannelError(
                    f"channel {c!r} is not one of the source's {list(source_channels)}"
                )
            if not m.accepts(c):
                raise ModelChannelError(
                    f"model {m.name!r} takes channel {list(m.inputs)}, not {c!r}"
                )
        return sorted({source_channels.index(c) for c in channels})
    idx = [i for i, c in enumerate(source_channels) if m.accepts(c)]
    trained = trained_channels(predictor)
    if trained:
        idx = [i for i in idx if source_channels[i] in trained]
        if not idx:
            raise ModelChannelError(
                f"model {m.name!r} was trained on channel {list(trained)}; the source has "
                f"{list(source_channels)} ("
                + force_hint.format(model=m.name, channel=source_channels[0])
                + ")"
            )
    if not idx:
        raise ModelChannelError(
            f"model {m.name!r} takes channel {list(m.inputs)}; the source has "
            f"{list(source_channels)} ({hint.format(input=m.inputs[0])})"
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
        Freeze the input normalization from the first ``calibrate`` frames of
        each field and channel (position ``p``, channel ``c``: fields of a plate
        differ in brightness, channels always do) instead of the model's training
        constants: held back, then predicted with the frozen constants, never
        recomputed after. A version swapped in later runs with the same frozen
        constants. A denoiser's output constants follow (see
        `Predictor.with_input_norm`).
    input_channel
        The one source channel the model takes, whatever its name (offline
        prediction of a file whose channel is named otherwise, `check_channels`).
    channels
        The source channels a model of any input runs on (``--model NAME:CH,...``),
        instead of those it was trained on (`check_channels`).
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
        policy: Literal["latest", "every"] = "latest",
        input_channel: str | None = None,
        channels: tuple[str, ...] | None = None,
        pixel_size_um: float | None = None,
        tta: int = 0,
        spread_writer: Any = None,
    ) -> None:
        self.predictor = predictor
        self.calibrate = max(0, calibrate)
        self.policy = policy
        #: per (p, c): frames / stacks held until that field's burst is complete
        self._burst: dict[tuple[int, int], list[tuple[np.ndarray, FrameMeta]]] = {}
        self._held_stacks: dict[tuple[int, int], list[Stack]] = {}
        #: per (p, c): the frozen input constants and the predictor that uses them
        self._norms: dict[tuple[int, int], Normalization] = {}
        self._calibrated: dict[tuple[int, int], Predictor] = {}
        self._calib_frames: dict[tuple[int, int], int] = {}
        self.writer = writer
        self.source_channels = source_channels
        self.input_channel = input_channel
        self.channels = channels
        self.targets = set(
            check_channels(
                predictor, source_channels, input_channel=input_channel, channels=channels
            )
        )
        self.wildcard = predictor.manifest.inputs == ("*",)
        #: members of the flip ensemble (0: none); its spread goes to ``spread_writer``
        self.tta = tta
        self.spread_writer = spread_writer
        #: (t, p, c, z, score) of every prediction of an ensemble (`uncertainty_score`)
        self.uncertainty_scores: list[tuple[int, int, int, int, float]] = []
        #: a model of any input: the output channel of each source channel it runs on
        self.out_channel = {c: k for k, c in enumerate(sorted(self.targets))}
        self.n_z = n_z
        self.on_prediction = on_prediction
        self.metrics = StageMetrics(f"predict:{predictor.manifest.name}")
        self.predicted = 0
        self.ignored = 0
        #: stacks / windows with a missing plane or time point: counted, never predicted
        self.incomplete_stacks = 0
        self.versions: list[dict[str, Any]] = [
            {**predictor.describe(), "from_seq": 0, "from_t": 0}
        ]
        self._pending: Predictor | None = None
        self._swap_lock = threading.Lock()
        #: called on the inference thread when a version takes over / is refused there
        self.on_swapped: Callable[[dict[str, Any]], None] | None = None
        #: compares the stream with the model's training data (warnings, never a stop)
        self.guard = DomainGuard(
            predictor.manifest.fingerprint, source_channels, pixel_size_um=pixel_size_um
        )
        #: called with each new `ShiftWarning` (on the inference thread)
        self.on_domain_shift: Callable[[ShiftWarning], None] | None = None
        load_warnings = self.guard.check_stream(sorted(self.targets))
        for w in load_warnings:
            log.warning("%s: %s: %s", predictor.manifest.name, w.channel, w.message)
        if load_warnings:
            self._store_domain_shift()
        self.on_swap_refused: Callable[[dict[str, Any], str], None] | None = None
        self.swaps_refused: list[str] = []
        self._assembler = self._make_assembler()

    @property
    def frames_written(self) -> int:
        """Frames (or planes) predicted."""
        return self.predicted

    @property
    def contract(self) -> InputContract:
        """What the runner feeds this model: stack and window models get complete input only.

        A 2D model on the ``latest`` policy takes the newest frame (it may skip);
        on ``every`` it predicts every frame. A ``2.5d-z`` / ``3d`` model gets
        complete z-stacks and a ``2.5d-t`` model gap-free windows, whatever the
        policy: a prediction from a zero-filled or gapped stack is never written.
        """
        m = self.predictor.manifest
        if m.spatial in ("2.5d-z", "3d"):
            return InputContract.complete_stack(self.n_z)
        if m.spatial == "2.5d-t":
            return InputContract.window(m.window)
        return InputContract.latest() if self.policy == "latest" else InputContract.every()

    def accepts_channel(self, c: int) -> bool:
        """Whether frames of channel index ``c`` go into this model."""
        return c in self.targets

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
        check_channels(
            predictor,
            self.source_channels,
            input_channel=self.input_channel,
            channels=self.channels,
        )
        with self._swap_lock:
            self._pending = predictor

    def _apply_swap(self, meta: FrameMeta, sample: np.ndarray) -> None:
        """At a frame boundary, on this (the inference) thread: warm the pending model on
        an input like ``sample`` (live dtype and shape: compiled kernels and CUDA graphs
        are made here, never on a background thread), then let it take over. A model
        that fails here is refused and the running one goes on."""
        with self._swap_lock:
            new, self._pending = self._pending, None
        if new is None:
            return
        try:
            new.predict(np.zeros_like(sample))
        except Exception as e:
            reason = f"{new.package.name} v{new.package.version} failed to run: {e}"
            self.swaps_refused.append(reason)
            if self.on_swap_refused is not None:
                self.on_swap_refused(new.package.identity, reason)
            return
        self.predictor = new
        # the run's frozen constants carry over: a new version sees the same input range
        self._calibrated = {k: new.with_input_norm(n) for k, n in self._norms.items()}
        self.versions.append({**new.describe(), "from_seq": meta["seq"], "from_t": meta["t"]})
        self.writer.update_attrs(versions=self.versions)
        if self.on_swapped is not None:
            self.on_swapped({**new.package.identity, **new.backend.describe()})

    # -- Stage -------------------------------------------------------------------------
    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Predict one frame (offline, stack models assemble complete stacks themselves)."""
        self._apply_swap(meta, data)
        if meta["c"] not in self.targets:
            self.ignored += 1
            return
        self._check_domain(data, meta)
        if self._assembler is not None:
            if self._assembler.frame_shape != data.shape:
                self._assembler = StackAssembler(
                    data.shape, "float32", mode=self._assembler.mode, size=self._assembler.size
                )
            for stack in self._assembler.add(data, meta):
                self._take_stack(stack)
            return
        key = (meta["p"], meta["c"])
        if self.calibrate and key not in self._norms:
            burst = self._burst.setdefault(key, [])
            burst.append((np.array(data, copy=True), dict(meta)))  # type: ignore[arg-type]
            if len(burst) >= self.calibrate:
                self._freeze_calibration(key)
            return
        self._emit(*self._predict(data, key), meta, meta["z"])

    def write_stack(self, stack: Stack) -> None:
        """Predict one complete z-stack or window (handed over by the runner)."""
        m = self.predictor.manifest
        live = stack.data if m.spatial != "2.5d-z" else stack.data[:1].repeat(m.window, 0)
        self._apply_swap(stack.newest, live)
        self._check_domain(stack.data[-1], stack.newest)
        self._take_stack(stack)

    def _take_stack(self, stack: Stack) -> None:
        if not stack.complete:  # never a prediction from made-up planes
            self.incomplete_stacks += 1
            return
        newest = stack.newest
        key = (newest["p"], newest["c"])
        if self.calibrate and key not in self._norms:
            held = self._held_stacks.setdefault(key, [])
            held.append(stack)
            if sum(len(s.metas) for s in held) >= self.calibrate:
                self._freeze_calibration(key)
            return
        self._predict_stack(stack)

    def _check_domain(self, frame: np.ndarray, meta: FrameMeta) -> None:
        """The guard's per-frame check; a new warning is logged, stored and announced."""
        w = self.guard.check_frame(frame, meta)
        if w is None:
            return
        where = f"field {w.p}, " if w.p >= 0 else ""
        log.warning("%s: %s%s: %s", self.predictor.manifest.name, where, w.channel, w.message)
        self._store_domain_shift()
        if self.on_domain_shift is not None:
            self.on_domain_shift(w)

    def _store_domain_shift(self) -> None:
        """The guard's findings in the output's attributes, each field's in its own image."""
        per_field = getattr(self.writer, "writers", None)  # `PositionWriters`: one per field
        if per_field is None:
            self.writer.update_attrs(domain_shift=self.guard.describe())
            return
        for p, w in enumerate(per_field):
            w.update_attrs(domain_shift=self.guard.describe(p))

    def _freeze_calibration(self, key: tuple[int, int]) -> None:
        """Freeze field ``key``'s constants from its burst, then predict what was held."""
        burst = self._burst.pop(key, [])
        held = self._held_stacks.pop(key, [])
        planes = [b[0] for b in burst]
        for st in held:
            planes.extend(st.data if self.predictor.manifest.spatial != "2.5d-t" else st.data[-1:])
        if not planes:
            return
        calibrated = self.predictor.calibrated(np.stack(planes))
        self._norms[key] = calibrated.input_norm
        self._calibrated[key] = calibrated
        self._calib_frames[key] = len(planes)
        names = self.source_channels
        self.writer.update_attrs(
            calibration={
                "frames": self.calibrate,
                "fields": [
                    {
                        "p": p,
                        "c": c,
                        "channel": names[c] if c < len(names) else str(c),
                        "frames": self._calib_frames[p, c],
                        "input_norm": n.model_dump(mode="json"),
                        "output_norm": self._calibrated[p, c].output_norm.model_dump(mode="json"),
                    }
                    for (p, c), n in sorted(self._norms.items())
                ],
            }
        )
        for data, meta in burst:
            self._emit(*self._predict(data, key), meta, meta["z"])
        for st in held:
            self._predict_stack(st)

    def predictor_for(self, p: int, c: int) -> Predictor:
        """The predictor that runs field ``p``'s channel ``c`` (its frozen constants)."""
        return self._calibrated.get((p, c), self.predictor)

    def _predict(
        self, x: np.ndarray, key: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The prediction, and with an ensemble (``tta``) its mean and spread."""
        predictor = self.predictor_for(*key)
        if not self.tta:
            return predictor.predict(x), None
        return predictor.predict_tta(x, self.tta)

    def _predict_stack(self, stack: Stack) -> None:
        m = self.predictor.manifest
        data = stack.data  # in the camera's dtype: the GPU path uploads raw pixels
        newest = stack.newest
        key = (newest["p"], newest["c"])
        if m.spatial == "2.5d-t":
            self._emit(*self._predict(data, key), newest, newest["z"])
            return
        metas = stack.metas
        if m.spatial == "3d":
            y, spread = self._predict(data, key)  # (C_out, Z, Y, X)
            for z, meta in enumerate(metas):
                assert meta is not None
                self._emit(y[:, z], None if spread is None else spread[:, z], meta, z)
            return
        k = m.window
        n = data.shape[0]
        for z, meta in enumerate(metas):
            assert meta is not None
            # planes beyond the stack's ends repeat its first/last plane (the stack is whole)
            idx = np.clip(np.arange(z - k // 2, z - k // 2 + k), 0, n - 1)
            self._emit(*self._predict(data[idx], key), meta, z)

    def _emit(self, y: np.ndarray, spread: np.ndarray | None, meta: FrameMeta, z: int) -> None:
        for j in range(y.shape[0]):
            c_out = self.out_channel[meta["c"]] if self.wildcard else j
            out_meta = dict(meta)
            out_meta.update(c=c_out, z=z)
            self.writer.write(y[j], out_meta)
            if spread is not None and self.spread_writer is not None:
                self.spread_writer.write(spread[j], out_meta)
        if spread is not None:
            score = uncertainty_score(y, spread)
            self.uncertainty_scores.append(
                (int(meta["t"]), int(meta["p"]), int(meta["c"]), int(z), score)
            )
        self.predicted += 1
        self.metrics.record(meta["timestamp_ns"])  # latency: acquisition → prediction written
        if self.on_prediction is not None:
            self.on_prediction(y, meta)

    def close(
        self,
        status: str = "complete",
        error: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Close the output; stacks still incomplete at the end are counted, never predicted."""
        if status != "failed":  # fields whose run was shorter than the burst
            for key in sorted({*self._burst, *self._held_stacks}):
                self._freeze_calibration(key)
        if self._assembler is not None:
            for stack in self._assembler.flush():
                if not stack.complete:
                    self.incomplete_stacks += 1
        if self.guard.fingerprint is not None:
            self._store_domain_shift()
        self.writer.close(
            status,
            versions=self.versions,
            predicted=self.predicted,
            ignored_frames=self.ignored,
            incomplete_stacks=self.incomplete_stacks,
        )
        if self.spread_writer is not None:
            self.spread_writer.close(
                status,
                uncertainty={
                    **self.describe_uncertainty(),
                    "per_frame": [list(r) for r in self.uncertainty_scores],
                },
            )

    def describe_uncertainty(self) -> dict[str, Any]:
        """The ensemble's per-frame scores, summarized (empty without one)."""
        if not self.tta:
            return {}
        scores = [r[4] for r in self.uncertainty_scores]
        out: dict[str, Any] = {"method": "tta", "members": self.tta, "frames": len(scores)}
        if scores:
            worst = self.uncertainty_scores[int(np.argmax(scores))]
            out.update(
                score_median=round(float(np.median(scores)), 6),
                score_max=round(max(scores), 6),
                max_at=dict(zip(("t", "p", "c", "z"), worst[:4], strict=True)),
            )
        return out
