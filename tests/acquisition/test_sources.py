"""Conformance suite for `FrameSource`, subclassed per implementation."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tifffile

from scopestream.acquisition.base import FrameSource, SourceError
from scopestream.acquisition.factory import make_source
from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec
from scopestream.acquisition.pycromanager_source import PycromanagerSource
from scopestream.acquisition.remote import RemoteSource
from scopestream.acquisition.replay import ArraySource, ReplaySource
from scopestream.acquisition.sim import SimulatedSource
from scopestream.streaming.frame import FRAME_META_VERSION, META_KEYS, make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import FramePublisher
from scopestream.streaming.zarr_sink import ZarrSink

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from scopestream.streaming.frame import FrameMeta


def collect(src: FrameSource, timeout: float = 30) -> list[tuple[np.ndarray, FrameMeta]]:
    got: list[tuple[np.ndarray, FrameMeta]] = []
    src.start(lambda d, m: got.append((d.copy(), dict(m))))  # type: ignore[arg-type]
    assert src.wait(timeout), "source did not finish"
    assert src.error is None
    return got


class SourceConformance:
    """Every source: frames match `info`, metadata is complete, it finishes and stops."""

    n_expected: int

    def make(self, tmp_path: Path, frames: int = 12) -> FrameSource:
        raise NotImplementedError

    def test_frames_match_info_and_metadata(self, tmp_path: Path) -> None:
        src = self.make(tmp_path)
        assert isinstance(src, FrameSource)
        got = collect(src)
        assert len(got) == self.n_expected
        for data, meta in got:
            assert data.shape == src.info.frame_shape
            assert data.dtype == np.dtype(src.info.dtype)
            assert set(meta) == set(META_KEYS)
            assert meta["version"] == FRAME_META_VERSION
            assert 0 <= meta["c"] < src.info.n_c
            assert 0 <= meta["z"] < src.info.n_z
        stamps = [m["timestamp_ns"] for _, m in got]
        assert stamps == sorted(stamps)
        desc = src.describe()
        assert desc["kind"].startswith(src.kind)  # type: ignore[attr-defined]

    def test_stop_ends_promptly(self, tmp_path: Path) -> None:
        # the sink takes 10 ms a frame, so on its own the source runs for at least 50 s:
        # it can only end within the wait because stop() worked
        n = 5000
        src = self.make(tmp_path, frames=n)
        expected = src.info.expected_frames
        assert expected is None or expected >= n
        first = threading.Event()
        got: list[int] = []

        def sink(d: np.ndarray, m: FrameMeta) -> None:
            got.append(m["t"])
            first.set()
            time.sleep(0.01)

        src.start(sink)
        assert first.wait(60)
        src.stop()
        assert src.wait(30)
        assert src.error is None
        assert 0 < len(got) < n


class TestSimulatedSource(SourceConformance):
    """``sim``: the simulated microscope as a UniMMCore, driven by pymmcore-plus."""

    n_expected = 12

    def make(self, tmp_path: Path, frames: int = 12) -> FrameSource:
        return SimulatedSource(
            (96, 128), AcquisitionPlan.timelapse(frames, channels=(NUC,)), seed=3
        )

    def test_every_frame_matches_its_ground_truth(self) -> None:
        plan = AcquisitionPlan(
            time_points=2,
            z_offsets_um=(-2.0, 0.0, 2.0),
            channels=(
                ChannelSpec(name="brightfield", exposure_ms=5),
                ChannelSpec(name="nuclei", exposure_ms=30),
            ),
        )
        src = SimulatedSource((96, 96), plan, seed=1, time_step_s=20)
        got = collect(src)
        assert [(m["t"], m["c"], m["z"]) for _, m in got] == [
            (t, c, z) for t in range(2) for c in range(2) for z in range(3)
        ]
        cam = src.microscope.camera
        for data, meta in got:
            truth = src.ground_truth(meta)
            photons = (truth - cam.offset_adu) / cam.gain_adu_per_e
            sigma = cam.gain_adu_per_e * np.sqrt(photons + cam.read_noise_e**2)
            z = (data - truth) / sigma  # what is left is exactly the camera's noise
            assert abs(float(z.mean())) < 0.1
            assert 0.85 < float(z.var()) < 1.15
        assert [m["exposure_ms"] for _, m in got][:6] == [5, 5, 5, 30, 30, 30]
        assert [m["stage_z_um"] for _, m in got][:3] == [-2.0, 0.0, 2.0]
        # the sample lives on: t=1 is 20 s later and the cells have moved
        t0, t1 = got[4][0].astype(float), got[10][0].astype(float)
        assert np.corrcoef(t0.ravel(), t1.ravel())[0, 1] < 0.99

    def test_same_seed_same_frames(self) -> None:
        a = collect(
            SimulatedSource((64, 64), AcquisitionPlan.timelapse(3, channels=(NUC,)), seed=9)
        )
        b = collect(
            SimulatedSource((64, 64), AcquisitionPlan.timelapse(3, channels=(NUC,)), seed=9)
        )
        for (x, _), (y, _) in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)

    def test_a_camera_that_dies_ends_the_run_with_the_reason(self) -> None:
        src = SimulatedSource(
            (64, 64), AcquisitionPlan.timelapse(20, channels=(NUC,)), die_after=5
        )
        got: list[int] = []
        src.start(lambda d, m: got.append(m["t"]))
        assert src.wait(30)
        assert got == [0, 1, 2, 3, 4]
        assert isinstance(src.error, SourceError)
        assert "simulated camera failure after 5 frames" in str(src.error)

    def test_stalls_slow_the_camera_but_lose_nothing(self) -> None:
        src = SimulatedSource(
            (64, 64), AcquisitionPlan.timelapse(10, channels=(NUC,)), stall_every=3, stall_s=0.05
        )
        t0 = time.monotonic()
        got = collect(src)
        assert len(got) == 10
        assert time.monotonic() - t0 >= 0.15


NUC = ChannelSpec(name="nuclei", exposure_ms=10)


class TestMMCoreDemo(SourceConformance):
    """pymmcore-plus on the DemoCamera of the mm-test-adapters wheel."""

    n_expected = 2 * 2 * 3

    def make(self, tmp_path: Path, frames: int = 12) -> FrameSource:
        plan = AcquisitionPlan(
            time_points=max(1, -(-frames // 6)),
            z_offsets_um=(-1.0, 0.0, 1.0),
            channels=(
                ChannelSpec(name="DAPI", exposure_ms=5),
                ChannelSpec(name="FITC", exposure_ms=10),
            ),
        )
        return make_source("mmcore:demo", plan=plan)

    def test_channels_and_z_come_from_the_plan(self, tmp_path: Path) -> None:
        src = self.make(tmp_path)
        assert src.info.channel_names == ("DAPI", "FITC")
        got = collect(src)
        assert [(m["c"], m["z"]) for _, m in got][:6] == [
            (c, z) for c in range(2) for z in range(3)
        ]
        assert [m["exposure_ms"] for _, m in got][:6] == [5, 5, 5, 10, 10, 10]


class TestPycromanagerDemo(SourceConformance):
    """The real pycromanager engine, headless Python backend, DemoCamera (no Java)."""

    n_expected = 2 * 2 * 3

    def make(self, tmp_path: Path, frames: int = 12) -> FrameSource:
        plan = AcquisitionPlan(
            time_points=max(1, -(-frames // 6)),
            z_offsets_um=(-1.0, 0.0, 1.0),
            channels=(
                ChannelSpec(name="DAPI", exposure_ms=5),
                ChannelSpec(name="FITC", exposure_ms=10),
            ),
        )
        return make_source("pycromanager:demo", plan=plan)

    def test_axes_map_to_indices(self, tmp_path: Path) -> None:
        got = collect(self.make(tmp_path))
        assert [(m["t"], m["c"], m["z"]) for _, m in got] == [
            (t, c, z) for t in range(2) for c in range(2) for z in range(3)
        ]
        assert [m["exposure_ms"] for _, m in got][:6] == [5, 5, 5, 10, 10, 10]


class TestPycromanagerSim(SourceConformance):
    """pycromanager's engine driving the simulated microscope (a thin adapter)."""

    n_expected = 8

    def make(self, tmp_path: Path, frames: int = 8) -> FrameSource:
        plan = AcquisitionPlan(
            time_points=max(1, -(-frames // 4)),
            z_offsets_um=(0.0, 1.0),
            channels=(
                ChannelSpec(name="brightfield", exposure_ms=5),
                ChannelSpec(name="nuclei", exposure_ms=20),
            ),
        )
        return make_source("pycromanager:sim", plan=plan, shape=(64, 96))

    def test_light_path_switches_per_channel(self, tmp_path: Path) -> None:
        got = collect(self.make(tmp_path))
        bf = [d.mean() for d, m in got if m["c"] == 0]
        nuc = [d.mean() for d, m in got if m["c"] == 1]
        assert min(bf) > 2 * max(nuc)  # transmitted light is far brighter than the stain


class TestArraySource(SourceConformance):
    n_expected = 7

    def make(self, tmp_path: Path, frames: int = 7) -> FrameSource:
        return ArraySource(np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16), frames)


class TestReplayZarr(SourceConformance):
    n_expected = 3 * 2 * 2

    def make(self, tmp_path: Path, frames: int = 12) -> FrameSource:
        path = tmp_path / "rec.ome.zarr"
        if not path.exists():
            info = StreamInfo(
                frame_shape=(20, 24), n_t=3, channel_names=("bf", "gfp"), n_z=2, interval_s=0.5
            )
            sink = ZarrSink(path, info)
            for t in range(3):
                for c in range(2):
                    for z in range(2):
                        sink.write(
                            np.full((20, 24), 100 * t + 10 * c + z, np.uint16),
                            make_meta(t=t, c=c, z=z),
                        )
            sink.close()
        return ReplaySource(path, fps=0, loop=-(-frames // self.n_expected))

    def test_replays_indices_and_pixels_in_order(self, tmp_path: Path) -> None:
        src = self.make(tmp_path)
        assert src.info.channel_names == ("bf", "gfp")
        assert src.info.n_z == 2
        got = collect(src)
        idx = [(m["t"], m["c"], m["z"]) for _, m in got]
        assert idx == [(t, c, z) for t in range(3) for c in range(2) for z in range(2)]
        for d, m in got:
            assert (d == 100 * m["t"] + 10 * m["c"] + m["z"]).all()

    def test_recorded_rate_is_used_by_default(self, tmp_path: Path) -> None:
        self.make(tmp_path)
        src = ReplaySource(tmp_path / "rec.ome.zarr")
        assert src.fps == pytest.approx(1 / (0.5 * 4))

    def test_only_complete_frames_of_a_cut_run_are_replayed(self, tmp_path: Path) -> None:
        path = tmp_path / "cut.ome.zarr"
        info = StreamInfo(frame_shape=(8, 8), n_t=10)
        sink = ZarrSink(path, info)
        for t in range(4):
            sink.write(np.full((8, 8), t, np.uint16), make_meta(t=t))
        sink.close("failed", error="camera died")
        got = collect(ReplaySource(path, fps=0))
        assert [m["t"] for _, m in got] == [0, 1, 2, 3]


class TestReplayTiff(SourceConformance):
    n_expected = 5 * 3

    def make(self, tmp_path: Path, frames: int = 15) -> FrameSource:
        path = tmp_path / "stack.ome.tif"
        if not path.exists():
            data = np.arange(5 * 3 * 16 * 20, dtype=np.uint16).reshape(5, 3, 16, 20)
            tifffile.imwrite(path, data, metadata={"axes": "TZYX"}, ome=True)
        return ReplaySource(path, fps=0, loop=-(-frames // self.n_expected))

    def test_axes_are_read(self, tmp_path: Path) -> None:
        src = self.make(tmp_path)
        assert (src.info.n_t, src.info.n_z, src.info.frame_shape) == (5, 3, (16, 20))
        got = collect(src)
        t, z = got[4][1]["t"], got[4][1]["z"]
        assert (t, z) == (1, 1)
        expected = np.arange(5 * 3 * 16 * 20, dtype=np.uint16).reshape(5, 3, 16, 20)[1, 1]
        np.testing.assert_array_equal(got[4][0], expected)


class TestRemoteSource(SourceConformance):
    n_expected = 6

    @pytest.fixture(autouse=True)
    def _senders(self) -> Iterator[None]:
        """Publishers made by `make` stop sending and close their socket after each test."""
        self.senders: list[tuple[threading.Event, threading.Thread]] = []
        yield
        for stop, thread in self.senders:
            stop.set()
            thread.join(30)
            assert not thread.is_alive(), "a publisher thread did not end"

    def make(self, tmp_path: Path, frames: int = 6) -> FrameSource:
        pub = FramePublisher(
            "tcp://127.0.0.1:*", stream=StreamInfo(frame_shape=(10, 12), n_t=frames).to_json()
        )
        stop = threading.Event()

        def send() -> None:
            try:
                for i in range(frames):
                    f = np.full((10, 12), i % 65536, np.uint16)
                    while not pub.send(f, make_meta(t=i), timeout_ms=100):
                        if stop.is_set():  # the receiver has gone: the test is over
                            return
                    if stop.is_set():  # never more than one frame after the test ended
                        return
                pub.finish()
            finally:
                pub.close()

        sender = threading.Thread(target=send, daemon=True)
        self.senders.append((stop, sender))
        sender.start()
        return RemoteSource(pub.address, connect_timeout_s=30)

    def test_stream_layout_comes_from_the_header(self, tmp_path: Path) -> None:
        src = self.make(tmp_path)
        assert src.info.n_t == 6
        collect(src)

    def test_wrong_shape_and_garbage_never_reach_the_sink(self) -> None:
        import zmq

        pub = FramePublisher("tcp://127.0.0.1:*")
        raw = zmq.Context.instance().socket(zmq.PUSH)
        port = raw.bind_to_random_port("tcp://127.0.0.1")

        def send() -> None:
            pub.send(np.ones((8, 8), np.uint16), make_meta(t=0))
            pub.send(np.ones((4, 4), np.uint16), make_meta(t=1))  # wrong shape
            pub.send(np.ones((8, 8), np.float32), make_meta(t=2))  # wrong dtype
            pub.send(np.full((8, 8), 3, np.uint16), make_meta(t=3))
            pub.finish()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            src = RemoteSource(pub.address, connect_timeout_s=30)
            # a second publisher on the same receiver sends garbage
            src._rx._sock.connect(f"tcp://127.0.0.1:{port}")
            raw.send_multipart([b"{not json", b"xx"])
            got = collect(src)
            assert [m["t"] for _, m in got] == [0, 3]
            assert src.counters()["malformed"] >= 2
            assert any("shape (4, 4)" in e for e in src.errors)
        finally:
            sender.join(30)
            pub.close()
            raw.close(linger=0)

    def test_nothing_to_connect_to_is_a_clear_error(self, free_port: int) -> None:
        with pytest.raises(SourceError, match="is 'scopestream publish' running"):
            RemoteSource(f"tcp://127.0.0.1:{free_port}", connect_timeout_s=0.3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("webcam", "unknown source 'webcam'; use one of: sim, mmcore:demo"),
        ("sim:fast", "'sim' takes no argument"),
        ("replay:", "replay needs a path"),
        ("replay:/nonexistent/x.ome.zarr", "does not exist"),
        ("mmcore", "mmcore needs a target"),
        ("mmcore:/nonexistent/scope.cfg", "config file /nonexistent/scope.cfg does not exist"),
    ],
)
def test_bad_source_specs_say_what_is_valid(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message.replace("(", r"\(")):
        make_source(spec)


def test_micro_manager_errors_are_clear(tmp_path: Path, free_port: int) -> None:
    cfg = tmp_path / "scope.cfg"
    cfg.write_text("# a config\n")
    with pytest.raises(SourceError, match="--mm-dir is needed"):
        make_source(f"mmcore:{cfg}")
    with pytest.raises(SourceError, match="holds no Micro-Manager device adapters"):
        make_source(f"mmcore:{cfg}", mm_dir=str(tmp_path))
    with pytest.raises(SourceError, match=f"not reachable on port {free_port}"):
        PycromanagerSource(None, AcquisitionPlan(), port=free_port)
    bad = AcquisitionPlan(channels=(ChannelSpec(name="GFP-long-pass"),))
    with pytest.raises(
        SourceError, match=r"presets \['GFP-long-pass'\] are not in group 'Channel'"
    ):
        make_source("mmcore:demo", plan=bad)
    with pytest.raises(SourceError, match="are not in group"):
        make_source("pycromanager:demo", plan=bad)
    # the failed start released the headless core: the next one starts
    src = make_source("pycromanager:demo", plan=AcquisitionPlan.timelapse(2))
    assert len(collect(src)) == 2


def test_replay_rejects_an_unknown_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(SourceError, match="cannot read"):
        ReplaySource(p)
