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
from scopestream.acquisition.remote import RemoteSource
from scopestream.acquisition.replay import ArraySource, ReplaySource
from scopestream.acquisition.sim import SimulatedSource
from scopestream.streaming.frame import META_KEYS, make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.protocol import FramePublisher
from scopestream.streaming.zarr_sink import ZarrSink

if TYPE_CHECKING:
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

    def make(self, tmp_path: Path) -> FrameSource:
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
            assert meta["version"] == 1
            assert 0 <= meta["c"] < src.info.n_c
            assert 0 <= meta["z"] < src.info.n_z
        stamps = [m["timestamp_ns"] for _, m in got]
        assert stamps == sorted(stamps)
        desc = src.describe()
        assert desc["kind"] == src.kind  # type: ignore[attr-defined]

    def test_stop_ends_promptly(self, tmp_path: Path) -> None:
        src = self.make(tmp_path)
        first = threading.Event()

        def sink(d: np.ndarray, m: FrameMeta) -> None:
            first.set()
            time.sleep(0.01)

        src.start(sink)
        assert first.wait(10)
        src.stop()
        assert src.wait(5)


class TestSimulatedSource(SourceConformance):
    n_expected = 12

    def make(self, tmp_path: Path) -> FrameSource:
        return SimulatedSource((96, 128), n_frames=12, seed=3)

    def test_noise_statistics_match_the_camera_model(self) -> None:
        src = SimulatedSource((128, 128), n_frames=40, seed=1, peak_photons=400, read_noise_e=2.0)
        got = collect(src)
        frames = np.stack([d for d, _ in got]).astype(np.float64)
        truth = np.stack([src.ground_truth(m["t"]) for _, m in got]).astype(np.float64)
        resid = frames - truth
        assert abs(resid.mean()) < 0.6  # unbiased (0.5 is the rounding of the cast)
        signal = truth - src.params["offset_adu"]
        bright = signal > 200
        # shot noise: variance ≈ photons + read², within 10 %
        ratio = resid[bright].var() / (signal[bright] + 4.0).mean()
        assert 0.9 < ratio < 1.1
        assert frames.max() <= 4095  # 12-bit camera

    def test_content_is_cells_not_noise(self) -> None:
        src = SimulatedSource((256, 256), n_frames=1, seed=0)
        truth = src.ground_truth(0)
        sig = truth - truth.min()
        assert (sig > 0.5 * sig.max()).mean() > 0.05  # nuclei cover a real fraction
        assert (sig < 0.1 * sig.max()).mean() > 0.3  # with background between cells

    def test_same_seed_same_sample(self) -> None:
        a = SimulatedSource((64, 64), n_frames=1, seed=7).ground_truth(0)
        b = SimulatedSource((64, 64), n_frames=1, seed=7).ground_truth(0)
        c = SimulatedSource((64, 64), n_frames=1, seed=8).ground_truth(0)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)

    def test_fps_paces_frames(self) -> None:
        src = SimulatedSource((32, 32), n_frames=11, fps=100)
        t0 = time.monotonic()
        collect(src)
        assert time.monotonic() - t0 >= 0.09


class TestArraySource(SourceConformance):
    n_expected = 7

    def make(self, tmp_path: Path) -> FrameSource:
        return ArraySource(np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16), 7)


class TestReplayZarr(SourceConformance):
    n_expected = 3 * 2 * 2

    def make(self, tmp_path: Path) -> FrameSource:
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
        return ReplaySource(path, fps=0)

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

    def make(self, tmp_path: Path) -> FrameSource:
        path = tmp_path / "stack.ome.tif"
        if not path.exists():
            data = np.arange(5 * 3 * 16 * 20, dtype=np.uint16).reshape(5, 3, 16, 20)
            tifffile.imwrite(path, data, metadata={"axes": "TZYX"}, ome=True)
        return ReplaySource(path, fps=0)

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

    def make(self, tmp_path: Path) -> FrameSource:
        pub = FramePublisher(
            "tcp://127.0.0.1:*", stream=StreamInfo(frame_shape=(10, 12), n_t=6).to_json()
        )
        frames = [np.full((10, 12), i, np.uint16) for i in range(6)]

        def send() -> None:
            for i, f in enumerate(frames):
                pub.send(f, make_meta(t=i))
            pub.finish()
            pub.close()

        threading.Thread(target=send, daemon=True).start()
        return RemoteSource(pub.address, connect_timeout_s=10)

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
            time.sleep(0.2)
            pub.send(np.ones((4, 4), np.uint16), make_meta(t=1))  # wrong shape
            pub.send(np.ones((8, 8), np.float32), make_meta(t=2))  # wrong dtype
            pub.send(np.full((8, 8), 3, np.uint16), make_meta(t=3))
            pub.finish()

        threading.Thread(target=send, daemon=True).start()
        src = RemoteSource(pub.address, connect_timeout_s=10)
        # a second publisher on the same receiver sends garbage
        src._rx._sock.connect(f"tcp://127.0.0.1:{port}")
        raw.send_multipart([b"{not json", b"xx"])
        got = collect(src)
        assert [m["t"] for _, m in got] == [0, 3]
        assert src.counters()["malformed"] >= 2
        assert any("shape (4, 4)" in e for e in src.errors)
        pub.close()
        raw.close(linger=0)

    def test_nothing_to_connect_to_is_a_clear_error(self, free_port: int) -> None:
        with pytest.raises(SourceError, match="is 'scopestream publish' running"):
            RemoteSource(f"tcp://127.0.0.1:{free_port}", connect_timeout_s=0.3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("webcam", "unknown source 'webcam'; use one of: sim, replay:PATH, tcp://HOST:PORT"),
        ("sim:fast", "'sim' takes no argument"),
        ("replay:", "replay needs a path"),
        ("replay:/nonexistent/x.ome.zarr", "does not exist"),
        ("pycromanager:demo", "not part of this version yet"),
    ],
)
def test_bad_source_specs_say_what_is_valid(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message.replace("(", r"\(")):
        make_source(spec)


def test_replay_rejects_an_unknown_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(SourceError, match="cannot read"):
        ReplaySource(p)
