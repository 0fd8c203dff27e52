"""Conformance suites for the run loop's seams: `Recorder` and the stages it feeds.

Each suite states what the `StreamRunner` relies on and is subclassed per
implementation (as `SourceConformance` in ``tests/acquisition/test_sources.py``):

* `RecorderConformance` — ``ZarrSink``: submitted and written frames committed in
  order and counted, their metadata and pixels read back, no frame written twice,
  the final status recorded.
* `StageConformance` — ``InferenceEngine`` (2d latest / every, 3d and 2.5d-z on
  complete stacks, 2.5d-t on windows), ``TruthSink``, ``LatestFrames`` and
  ``PublisherSink``: the protocol, a valid contract, a real run through the
  runner with a copying ring buffer (its slots and scratch buffers are reused, so
  a stage that keeps a view of what it was given records other frames' pixels),
  and exactly one ``close`` with the run's final status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pytest
import zarr

from scopestream.acquisition.base import ThreadedSource
from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.streaming.frame import META_KEYS, make_meta
from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import (
    DecodedFrame,
    EndOfStream,
    FramePublisher,
    FrameReceiver,
    PublisherSink,
)
from scopestream.streaming.ringbuffer import OverflowPolicy
from scopestream.streaming.runner import SinkSpec, StreamRunner
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.seams import Display, InputContract, Recorder, Stage
from scopestream.streaming.sinks import FrameSink
from scopestream.streaming.zarr_sink import SinkError, ZarrSink, complete_frames, inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from scopestream.inference.package import ModelPackage
    from scopestream.streaming.frame import FrameMeta
    from scopestream.streaming.seams import FrameSource

Key = tuple[int, int, int]  # (t, c, z)


class CopiedSource(ThreadedSource):
    """t × c × z random frames the ring buffer copies (its slots are then reused).

    It keeps what it emitted: each frame's pixels (a copy) and its metadata (the
    dict the ring buffer stamps ``seq`` into), to compare with what a stage kept.
    """

    kind = "copied"
    hands_over_frames = False  # the runner copies into preallocated slots and reuses them

    def __init__(
        self,
        shape: tuple[int, int],
        n_t: int,
        channels: tuple[str, ...] = ("nuclei",),
        n_z: int = 1,
        *,
        stop_after: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.info = StreamInfo(frame_shape=shape, n_t=n_t, channel_names=channels, n_z=n_z)
        self.stop_after = stop_after
        self.seed = seed
        self.sent: dict[Key, tuple[np.ndarray, FrameMeta]] = {}
        self.order: list[Key] = []

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        rng = np.random.default_rng(self.seed)
        # one buffer for every frame, as a camera driver's: only valid during the callback
        buf = np.empty(self.info.frame_shape, np.uint16)
        i = 0
        for t in range(self.info.n_t or 0):
            for c in range(self.info.n_c):
                for z in range(self.info.n_z):
                    if self.stop_after and i >= self.stop_after:
                        return
                    buf[...] = rng.normal(400, 80, buf.shape).clip(0, 4095)
                    meta = make_meta(
                        t=t, c=c, z=z, exposure_ms=5.0 + c, stage_z_um=0.5 * z, image_number=i
                    )
                    self.sent[(t, c, z)] = (buf.copy(), meta)
                    self.order.append((t, c, z))
                    yield buf, meta
                    i += 1

    def by_seq(self, seq: int) -> tuple[Key, np.ndarray]:
        key = self.order[seq]
        return key, self.sent[key][0]


def run(source: FrameSource, specs: list[SinkSpec]) -> dict[str, Any]:
    """A real run with a ring buffer of 4 slots (tiny frames: the slots are reused)."""
    summary = StreamRunner(source, specs, buffer_mb=0.001).run(timeout=120)
    assert summary["buffer"]["slots"] == 4
    return summary


# ---------------------------------------------------------------------------------------
# Recorder
# ---------------------------------------------------------------------------------------


class RecorderConformance:
    """What the runner relies on from the run's lossless store."""

    shape: ClassVar[tuple[int, int]] = (16, 24)
    duplicate_error: ClassVar[type[BaseException]] = Exception

    def make(self, tmp_path: Path, info: StreamInfo) -> Recorder:
        raise NotImplementedError

    def recorded_status(self, recorder: Recorder) -> tuple[str, str | None]:
        """(status, error) as the closed recording says."""
        raise NotImplementedError

    def frames(self, info: StreamInfo) -> list[tuple[np.ndarray, FrameMeta]]:
        """Every frame of ``info`` with its own pixels and distinct metadata, seq set."""
        rng = np.random.default_rng(1)
        out = []
        for seq, (t, c, z) in enumerate(
            (t, c, z) for t in range(info.n_t or 1) for c in range(info.n_c)
            for z in range(info.n_z)
        ):
            meta = make_meta(
                t=t,
                c=c,
                z=z,
                exposure_ms=2.5 + c,
                stage_x_um=100.0 + seq,
                stage_y_um=-5.25 * seq,
                stage_z_um=0.25 * z,
                engine_time_ms=10.5 * seq,
                image_number=seq,
                timestamp_ns=1_000_000 * (seq + 1),
            )
            meta["wall_ns"] = 1_700_000_000_000_000_000 + seq
            meta["seq"] = seq
            out.append((rng.integers(0, 65535, info.frame_shape, dtype=np.uint16), meta))
        return out

    def info(self, n_t: int = 3) -> StreamInfo:
        return StreamInfo(frame_shape=self.shape, n_t=n_t, channel_names=("a", "b"), n_z=2)

    def test_is_a_recorder(self, tmp_path: Path) -> None:
        rec = self.make(tmp_path, self.info())
        try:
            assert isinstance(rec, Recorder)
            assert rec.max_outstanding >= 1
            assert rec.frames_committed == 0
        finally:
            rec.close("complete")

    def test_submitted_frames_are_committed_in_order_and_counted(self, tmp_path: Path) -> None:
        info = self.info()
        rec = self.make(tmp_path, info)
        frames = self.frames(info)
        held = [(d.copy(), m) for d, m in frames]  # lent to the recorder until collected
        committed = 0
        for data, meta in held[: rec.max_outstanding]:
            rec.submit(data, meta)
        nxt = rec.max_outstanding
        while committed < len(held):
            done = rec.collect(block=True)
            assert done >= 1  # block: waits for at least one
            committed += done
            assert rec.frames_committed == committed
            # committed in submission order: every frame counted so far is readable,
            # and its slot may now be reused (scribbled over) by the caller
            for data, meta in held[:committed]:
                np.testing.assert_array_equal(rec.read_frame(meta["t"], meta["c"], meta["z"]),
                                              frames[meta["seq"]][0])
                data.fill(0xDEAD)
            while nxt < len(held) and nxt - committed < rec.max_outstanding:
                rec.submit(*held[nxt])
                nxt += 1
        assert rec.collect(block=False) == 0
        rec.close("complete")
        assert rec.frames_committed == len(frames)

    def test_write_copies_before_returning(self, tmp_path: Path) -> None:
        info = self.info()
        rec = self.make(tmp_path, info)
        frames = self.frames(info)
        buf = np.empty(self.shape, np.uint16)
        for data, meta in frames:
            buf[...] = data
            rec.write(buf, meta)
            buf.fill(0xBEEF)  # the ring buffer reuses its slot at once
        rec.flush()
        assert rec.frames_committed == len(frames)
        for data, meta in frames:
            np.testing.assert_array_equal(rec.read_frame(meta["t"], meta["c"], meta["z"]), data)
        rec.close("complete")

    def test_frame_meta_is_what_it_was_given(self, tmp_path: Path) -> None:
        info = self.info()
        rec = self.make(tmp_path, info)
        frames = self.frames(info)
        for data, meta in frames:
            rec.write(data, meta)
        rec.flush()
        for _, meta in frames:
            got = rec.frame_meta(meta["seq"])
            assert got is not None
            assert set(got) == set(META_KEYS)
            # every field but ``source``: a frame read back says it came from the recording
            for key in META_KEYS:
                if key != "source":
                    assert got[key] == meta[key], key  # type: ignore[literal-required]
        assert rec.frame_meta(len(frames)) is None  # never recorded
        rec.close("complete")

    def test_missing_metadata_stays_missing(self, tmp_path: Path) -> None:
        """A stage position the engine did not report is None, never 0 or NaN."""
        info = self.info(n_t=1)
        rec = self.make(tmp_path, info)
        meta = make_meta(t=0, c=1, z=1)
        meta["seq"] = 0
        rec.write(np.ones(self.shape, np.uint16), meta)
        rec.flush()
        got = rec.frame_meta(0)
        assert got is not None
        for key in ("stage_x_um", "stage_y_um", "stage_z_um", "engine_time_ms"):
            assert got[key] is None, key  # type: ignore[literal-required]
        assert got["image_number"] == -1
        rec.close("complete")

    def test_a_second_frame_at_the_same_index_is_refused(self, tmp_path: Path) -> None:
        info = self.info(n_t=1)
        rec = self.make(tmp_path, info)
        first, second = self.frames(info)[:2]
        rec.write(*first)
        again = dict(second[1])
        again.update(t=first[1]["t"], c=first[1]["c"], z=first[1]["z"])
        with pytest.raises(self.duplicate_error):
            rec.write(second[0], again)  # type: ignore[arg-type]
        rec.flush()
        m = first[1]
        np.testing.assert_array_equal(rec.read_frame(m["t"], m["c"], m["z"]), first[0])
        assert rec.frames_committed == 1
        rec.close("complete")

    @pytest.mark.parametrize(
        ("status", "error"), [("complete", None), ("stopped", None), ("failed", "disk on fire")]
    )
    def test_close_records_the_status(
        self, tmp_path: Path, status: str, error: str | None
    ) -> None:
        info = self.info()
        rec = self.make(tmp_path, info)
        for data, meta in self.frames(info)[:5]:
            rec.write(data, meta)
        rec.close(status, error, {"status": status, "frames_written": 5})
        assert rec.frames_committed == 5
        assert self.recorded_status(rec) == (status, error)

    @pytest.mark.parametrize("adopt", [True, False], ids=["zero-copy", "copying"])
    def test_a_run_records_every_frame(self, tmp_path: Path, adopt: bool) -> None:
        """Through the runner: submit/collect (adopted frames) or write (a copying ring)."""
        src = CopiedSource(self.shape, n_t=5, channels=("a", "b"), n_z=2)
        src.hands_over_frames = adopt  # adopted: fresh arrays (each frame a copy)
        if adopt:
            frames = src.frames

            def fresh() -> Iterator[tuple[np.ndarray, FrameMeta]]:
                for data, meta in frames():
                    yield data.copy(), meta

            src.frames = fresh  # type: ignore[method-assign]
        rec = self.make(tmp_path, src.info)
        summary = run(src, [SinkSpec("rec", rec, records=True)])  # type: ignore[arg-type]
        assert summary["buffer"]["mode"] == ("adopt" if adopt else "copy")
        assert summary["status"] == "complete"
        assert rec.frames_committed == summary["frames_written"] == 20
        for seq, key in enumerate(src.order):
            data, meta = src.sent[key]
            np.testing.assert_array_equal(rec.read_frame(*key), data)
            got = rec.frame_meta(seq)
            assert got is not None
            assert (got["t"], got["c"], got["z"], got["seq"]) == (*key, seq)
            assert got["timestamp_ns"] == meta["timestamp_ns"]
        assert self.recorded_status(rec) == ("complete", None)


class TestZarrSinkRecorder(RecorderConformance):
    duplicate_error = SinkError

    def make(self, tmp_path: Path, info: StreamInfo) -> Recorder:
        return ZarrSink(tmp_path / "r.ome.zarr", info)

    def recorded_status(self, recorder: Recorder) -> tuple[str, str | None]:
        assert isinstance(recorder, ZarrSink)
        report = inspect_run(recorder.path)
        return report.status, report.error


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


@dataclass
class Harness:
    """One stage wired for a run: its specs, and what the checks need afterwards."""

    stage: Any
    specs: list[SinkSpec]
    store: ZarrSink | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    closes: list[tuple[str, str | None]] = field(default_factory=list)

    def spy_on_close(self) -> None:
        """Count the calls to the stage's ``close`` (the runner must make exactly one)."""
        original = self.stage.close

        def close(
            status: str = "complete", error: str | None = None, summary: Any = None
        ) -> None:
            self.closes.append((status, error))
            original(status, error, summary)

        self.stage.close = close


class StageConformance:
    """What the runner relies on from every consumer it feeds on its own thread."""

    protocol: ClassVar[type] = Stage
    contract: ClassVar[InputContract]
    #: how a run cut short by `make_source(short=True)` ends
    cut_status: ClassVar[str] = "stopped"
    shape: ClassVar[tuple[int, int]] = (32, 40)
    channels: ClassVar[tuple[str, ...]] = ("nuclei",)
    n_t: ClassVar[int] = 4
    n_z: ClassVar[int] = 1

    def make_source(self, short: bool = False, direct: bool = False) -> FrameSource:
        """A small source (``short``: it ends before its plan; ``direct``: no runner)."""
        n = self.n_t * len(self.channels) * self.n_z
        cut = n // 2 + 1 if short else 0  # mid-stack, mid-time point
        return CopiedSource(self.shape, self.n_t, self.channels, self.n_z, stop_after=cut)

    def build(
        self, tmp_path: Path, source: FrameSource, request: pytest.FixtureRequest
    ) -> Harness:
        raise NotImplementedError

    def check(self, h: Harness, source: FrameSource, summary: dict[str, Any]) -> None:
        """Compare what the stage recorded with what the source sent."""
        raise NotImplementedError

    @pytest.fixture
    def cleanup(self) -> Iterator[list[Callable[[], None]]]:
        todo: list[Callable[[], None]] = []
        yield todo
        for fn in reversed(todo):
            fn()

    def _build(
        self,
        tmp_path: Path,
        source: FrameSource,
        request: pytest.FixtureRequest,
    ) -> Harness:
        h = self.build(tmp_path, source, request)
        h.spy_on_close()
        return h

    def test_is_the_protocol_with_a_valid_contract(
        self, tmp_path: Path, request: pytest.FixtureRequest, cleanup: list[Any]
    ) -> None:
        h = self._build(tmp_path, self.make_source(), request)
        cleanup.append(lambda: h.stage.close("complete"))
        assert isinstance(h.stage, self.protocol)
        assert isinstance(h.stage, FrameSink)  # what the runner calls: write and close
        spec = next(s for s in h.specs if s.sink is h.stage)
        contract = spec.contract()
        assert isinstance(contract, InputContract)
        assert contract == self.contract
        assert InputContract(contract.kind, contract.size) == contract  # passes validation
        if self.protocol is Stage:  # a Stage declares it itself, whatever the spec's policy
            assert h.stage.contract == self.contract
            if contract.stacked:
                assert callable(h.stage.write_stack)

    def test_a_run_feeds_it_and_closes_it_once(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        source = self.make_source()
        h = self._build(tmp_path, source, request)
        summary = run(source, h.specs)
        assert summary["status"] == "complete", summary["error"]
        assert h.closes == [("complete", None)]
        assert summary["contracts"].get("stage", self.contract.describe()) == (
            self.contract.describe()
        )
        self.check(h, source, summary)

    def test_a_cut_run_closes_it_once_with_that_status(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        source = self.make_source(short=True)
        h = self._build(tmp_path, source, request)
        summary = run(source, h.specs)
        assert summary["status"] == self.cut_status
        assert len(h.closes) == 1
        assert h.closes[0][0] == self.cut_status
        self.check(h, source, summary)

    def test_write_keeps_no_view_of_the_frame(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """Called directly with one reused buffer, scribbled over after every call."""
        source = self.make_source(direct=True)
        assert isinstance(source, CopiedSource)
        h = self._build(tmp_path, source, request)
        buf = np.empty(source.info.frame_shape, np.uint16)
        for seq, (data, meta) in enumerate(source.frames()):
            meta["seq"] = seq
            buf[...] = data
            if h.store is not None:
                h.store.write(buf, meta)
            h.stage.write(buf, dict(meta))
            buf.fill(4095)  # the slot is handed to the next frame
        h.stage.close("complete")
        if h.store is not None:
            h.store.close("complete")
        assert h.closes == [("complete", None)]
        self.check(h, source, {"frames_acquired": len(source.order), "direct": True})


# -- InferenceEngine ---------------------------------------------------------------------


class EngineConformance(StageConformance):
    """`InferenceEngine` writing into the run's store; outputs vs the model on the source."""

    pkg_kw: ClassVar[dict[str, Any]]
    policy: ClassVar[str] = "latest"

    @pytest.fixture(scope="class")
    @classmethod
    def pkg(cls, tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
        from tests.inference.conftest import package

        return package(tmp_path_factory.mktemp("pkg"), **cls.pkg_kw)

    def _predictor(self, pkg: ModelPackage) -> Any:
        from scopestream.inference.backends import OnnxBackend
        from scopestream.inference.predictor import Predictor

        return Predictor(pkg, OnnxBackend(pkg, threads=1))

    def build(
        self, tmp_path: Path, source: FrameSource, request: pytest.FixtureRequest
    ) -> Harness:
        from scopestream.inference.engine import InferenceEngine, output_names

        pkg: ModelPackage = request.getfixturevalue("pkg")
        info = source.info
        store = ZarrSink(tmp_path / "r.ome.zarr", info)
        pred = self._predictor(pkg)
        writer = store.add_output(
            pkg.name,
            channel_names=output_names(pred, info.channel_names),
            provenance=pred.describe(),
        )
        eng = InferenceEngine(
            pred,
            writer,
            source_channels=info.channel_names,
            n_z=info.n_z,
            policy=self.policy,  # type: ignore[arg-type]
        )
        specs = [SinkSpec("zarr", store, records=True), SinkSpec("stage", eng)]
        return Harness(eng, specs, store, {"pkg": pkg})

    def expected(self, pkg: ModelPackage, sent: dict[Key, Any], key: Key) -> np.ndarray | None:
        """The model's output at output index ``key`` from the source's own frames
        (None: that output must not exist, its input was incomplete)."""
        raise NotImplementedError

    def check(self, h: Harness, source: FrameSource, summary: dict[str, Any]) -> None:
        assert isinstance(source, CopiedSource)
        pkg: ModelPackage = h.extra["pkg"]
        assert h.store is not None
        group = SavedRun(h.store.path).image(pkg.name).path
        done = complete_frames(group)
        out = zarr.open_array(str(group / "0"), mode="r")
        self._ref = self._predictor(pkg)
        self._cache: dict[Any, np.ndarray] = {}
        n_out = done.shape[1]
        seen = 0
        for t in range(done.shape[0]):
            for c_out in range(n_out):
                for z in range(done.shape[2]):
                    want = self.expected(pkg, source.sent, (t, c_out, z))
                    if not done[t, c_out, z]:
                        if want is not None:
                            self.missing(t, c_out, z)
                        continue
                    assert want is not None, f"an output at {(t, c_out, z)} from missing input"
                    np.testing.assert_allclose(out[t, c_out, z], want, rtol=1e-4, atol=1e-3)
                    seen += 1
        assert seen >= 1

    def missing(self, t: int, c: int, z: int) -> None:
        """An output that may be absent only on ``latest`` (it skips)."""
        if self.contract.kind != "latest":
            pytest.fail(f"no output at t={t}, c={c}, z={z} although its input was complete")

    def _predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._ref.predict(x)
        return out


class Engine2dConformance(EngineConformance):
    pkg_kw: ClassVar[dict[str, Any]] = {"params": {"base": 8}, "seed": 3}
    channels = ("brightfield", "nuclei")
    n_t = 3

    def expected(self, pkg: ModelPackage, sent: dict[Key, Any], key: Key) -> np.ndarray | None:
        if key not in sent:
            return None
        return self._predict(sent[key][0])[0]  # wildcard: output channel c is input c


class TestEngine2dLatest(Engine2dConformance):
    contract = InputContract.latest()
    policy = "latest"


class TestEngine2dEvery(Engine2dConformance):
    contract = InputContract.every()
    policy = "every"


class TestEngineWindow(EngineConformance):
    """A ``2.5d-t`` model: the window of the last 3 time points (causal, gap-free)."""

    pkg_kw: ClassVar[dict[str, Any]] = {
        "name": "dn_t", "params": {"in_channels": 3, "base": 8}, "spatial": "2.5d-t",
        "window": 3, "seed": 4,
    }
    contract = InputContract.window(3)
    n_t = 5

    def expected(self, pkg: ModelPackage, sent: dict[Key, Any], key: Key) -> np.ndarray | None:
        t, c, z = key
        keys = [(tt, c, z) for tt in range(t - 2, t + 1)]
        if t < 2 or any(k not in sent for k in keys):
            return None
        return self._predict(np.stack([sent[k][0] for k in keys]))[0]


class ZStackConformance(EngineConformance):
    channels = ("brightfield",)
    n_t = 3
    n_z = 4
    contract = InputContract.complete_stack(4)

    def _stack(self, sent: dict[Key, Any], t: int) -> np.ndarray | None:
        keys = [(t, 0, z) for z in range(self.n_z)]
        if any(k not in sent for k in keys):
            return None  # an incomplete stack is never predicted
        return np.stack([sent[k][0] for k in keys])


class TestEngine3d(ZStackConformance):
    pkg_kw: ClassVar[dict[str, Any]] = {
        "name": "s3", "kind": "stain_unet",
        "params": {"dims": 3, "out_channels": 1, "base": 4, "pool_z": (False, False, False)},
        "inputs": ("brightfield",), "outputs": ("nuclei",), "spatial": "3d", "seed": 5,
    }

    def expected(self, pkg: ModelPackage, sent: dict[Key, Any], key: Key) -> np.ndarray | None:
        t, c, z = key
        if t not in self._cache:
            stack = self._stack(sent, t)
            self._cache[t] = None if stack is None else self._predict(stack)  # type: ignore[assignment]
        y = self._cache[t]
        return None if y is None else y[c, z]


class TestEngine25dZ(ZStackConformance):
    pkg_kw: ClassVar[dict[str, Any]] = {
        "name": "s25", "kind": "stain_unet",
        "params": {"in_channels": 3, "out_channels": 1, "base": 4},
        "inputs": ("brightfield",), "outputs": ("nuclei",), "spatial": "2.5d-z", "window": 3,
        "seed": 6,
    }

    def expected(self, pkg: ModelPackage, sent: dict[Key, Any], key: Key) -> np.ndarray | None:
        t, c, z = key
        stack = self._stack(sent, t)
        if stack is None:
            return None
        idx = np.clip([z - 1, z, z + 1], 0, self.n_z - 1)  # edges repeat the end planes
        return self._predict(stack[idx])[c]


# -- TruthSink ----------------------------------------------------------------------------

NUC = ChannelSpec(name="nuclei", exposure_ms=20)


class TestTruthSink(StageConformance):
    """The simulator's noise-free truth of every frame, at the frame's (t, c, z)."""

    protocol = FrameSink  # no contract of its own: fed every frame by its spec's policy
    contract = InputContract.every()
    cut_status = "failed"  # the simulated camera dies mid-run
    shape = (32, 32)
    channels = ("nuclei",)
    n_t = 4

    def _sim(self, die_after: int | None = None) -> Any:
        pytest.importorskip("pymmcore_plus")
        from scopestream.acquisition.sim import SimulatedSource

        return SimulatedSource(
            self.shape, AcquisitionPlan.timelapse(self.n_t, channels=(NUC,)), seed=3,
            die_after=die_after,
        )

    def make_source(self, short: bool = False, direct: bool = False) -> FrameSource:
        if short:
            return self._sim(die_after=2)  # type: ignore[no-any-return]
        return self._sim()  # type: ignore[no-any-return]

    def test_write_keeps_no_view_of_the_frame(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """Its frames' pixels are never read (the truth comes from the metadata)."""
        source = self._sim()
        h = self._build(tmp_path, source, request)
        plan = CopiedSource(self.shape, self.n_t, self.channels)
        buf = np.empty(self.shape, np.uint16)
        assert h.store is not None
        for seq, (data, meta) in enumerate(plan.frames()):
            meta["seq"] = seq
            meta["exposure_ms"] = NUC.exposure_ms
            buf[...] = data
            h.store.write(buf, meta)
            h.stage.write(buf, dict(meta))
            buf.fill(4095)
        h.stage.close("complete")
        h.store.close("complete")
        source.stop()
        assert h.closes == [("complete", None)]
        self.check(h, source, {"frames_acquired": len(plan.order)})

    def build(
        self, tmp_path: Path, source: FrameSource, request: pytest.FixtureRequest
    ) -> Harness:
        from scopestream.acquisition.sim import TruthSink

        store = ZarrSink(tmp_path / "r.ome.zarr", source.info)
        truth = store.add_output("truth", channel_names=source.info.channel_names)
        sink = TruthSink(source, truth)  # type: ignore[arg-type]
        specs = [
            SinkSpec("zarr", store, records=True),
            SinkSpec("stage", sink, OverflowPolicy.SPILL),
        ]
        return Harness(sink, specs, store)

    def check(self, h: Harness, source: FrameSource, summary: dict[str, Any]) -> None:
        assert h.store is not None
        raw = read_frame_index(h.store.path)
        assert len(raw) == summary["frames_acquired"] >= 1
        group = SavedRun(h.store.path).image("truth").path
        done = complete_frames(group)
        assert int(done.sum()) == len(raw)  # every frame, none twice
        out = zarr.open_array(str(group / "0"), mode="r")
        from scopestream.streaming.frame_index import to_meta

        for rec in raw:
            meta = to_meta(rec)
            t, c, z = meta["t"], meta["c"], meta["z"]
            assert done[t, c, z]
            np.testing.assert_allclose(
                out[t, c, z], source.ground_truth(meta), rtol=1e-6  # type: ignore[attr-defined]
            )


# -- LatestFrames (the display) -------------------------------------------------------------


class TestLatestFrames(StageConformance):
    """The display's newest frame per channel: a copy, never a view of the ring buffer."""

    protocol = Display
    contract = InputContract.latest()
    channels = ("brightfield", "nuclei")
    n_t = 5

    def build(
        self, tmp_path: Path, source: FrameSource, request: pytest.FixtureRequest
    ) -> Harness:
        from scopestream.viewer.frames import LatestFrames

        shown = LatestFrames(source.info, max_hz=0)  # no throttle: no clock in the test
        return Harness(shown, [SinkSpec("stage", shown, OverflowPolicy.LATEST)])

    def check(self, h: Harness, source: FrameSource, summary: dict[str, Any]) -> None:
        assert isinstance(source, CopiedSource)
        assert h.stage.closed
        images = h.stage.changed({})
        assert images
        for im in images:
            key, data = source.by_seq(im.seq)
            assert (key[0], source.info.channel_names[key[1]]) == (im.t, im.channel)
            assert im.kind == "raw"
            np.testing.assert_array_equal(im.data, data)
        if summary.get("direct"):  # called with every frame: each channel's last one
            last = {source.info.channel_names[c]: (t, c, z) for t, c, z in source.order}
            assert {im.channel: source.order[im.seq] for im in images} == last


# -- PublisherSink --------------------------------------------------------------------------

class TestPublisherSink(StageConformance):
    """The microscope side of a remote run: every frame on the wire, intact, then the end."""

    protocol = FrameSink  # no contract of its own: the run's lossless sink (records=True)
    contract = InputContract.every()
    n_t = 12

    def build(
        self, tmp_path: Path, source: FrameSource, request: pytest.FixtureRequest
    ) -> Harness:
        port = request.getfixturevalue("free_port")
        cleanup = request.getfixturevalue("cleanup")
        pub = FramePublisher(f"tcp://127.0.0.1:{port}", stream=source.info.to_json())
        cleanup.append(pub.close)
        rx = FrameReceiver(f"tcp://127.0.0.1:{port}")
        cleanup.append(rx.close)
        assert pub.wait_for_receiver(10)
        sink = PublisherSink(pub)
        return Harness(sink, [SinkSpec("stage", sink, records=True)], extra={"rx": rx})

    def check(self, h: Harness, source: FrameSource, summary: dict[str, Any]) -> None:
        assert isinstance(source, CopiedSource)
        rx: FrameReceiver = h.extra["rx"]
        got: list[DecodedFrame] = []
        while True:
            msg = rx.recv(timeout_ms=10_000)
            assert msg is not None, f"no end of stream after {len(got)} frames"
            if isinstance(msg, EndOfStream):
                assert msg.frames == len(got)
                break
            got.append(msg)
        assert rx.stats.malformed == 0
        assert [(m.meta["t"], m.meta["c"], m.meta["z"]) for m in got] == source.order
        bad = [
            key for m in got
            if not np.array_equal(m.data, source.sent[key := (m.meta["t"], m.meta["c"],
                                                              m.meta["z"])][0])
        ]
        assert not bad, f"{len(bad)} of {len(got)} frames arrived with other pixels: {bad[:4]}"
        assert h.stage.frames_written == len(got)
