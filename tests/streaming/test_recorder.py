"""The Recorder seam: per-frame metadata on disk, read-back with real metadata, contracts."""

from __future__ import annotations

import json
import threading
import tracemalloc
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zarr

from scopestream.acquisition.base import ThreadedSource
from scopestream.streaming.frame import make_meta
from scopestream.streaming.frame_index import FRAME_DTYPE, read_frame_index
from scopestream.streaming.layout import StreamInfo
from scopestream.streaming.ringbuffer import FrameLapped, OverflowPolicy, RingBuffer
from scopestream.streaming.runner import SinkSpec, StreamRunner
from scopestream.streaming.seams import InputContract, Recorder, Stage
from scopestream.streaming.zarr_sink import TIMELINE_FILE, SinkError, ZarrSink, inspect_run

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from scopestream.streaming.assembler import Stack
    from scopestream.streaming.frame import FrameMeta

SHAPE = (16, 16)


class PlanSource(ThreadedSource):
    """t × c × z frames whose pixels encode their seq, with distinct per-frame metadata."""

    kind = "plan"
    hands_over_frames = True

    def __init__(
        self, n_t: int, n_c: int = 1, n_z: int = 1, *, fps: float = 0.0, stop_after: int = 0
    ) -> None:
        super().__init__(fps=fps)
        self.info = StreamInfo(
            frame_shape=SHAPE,
            n_t=n_t,
            channel_names=tuple(f"c{i}" for i in range(n_c)),
            n_z=n_z,
        )
        self.stop_after = stop_after

    def frames(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        i = 0
        for t in range(self.info.n_t or 0):
            for c in range(self.info.n_c):
                for z in range(self.info.n_z):
                    if self.stop_after and i >= self.stop_after:
                        return
                    meta = make_meta(
                        t=t,
                        c=c,
                        z=z,
                        exposure_ms=1.5 + c,
                        stage_x_um=100.0 + i,
                        stage_y_um=-5.0,
                        stage_z_um=0.25 * z,
                        engine_time_ms=10.0 * i,
                        image_number=i,
                    )
                    yield np.full(SHAPE, i, np.uint16), meta
                    i += 1


class SlowStage:
    """A stage that sees every frame slowly (a model, a truth writer) and keeps what it got."""

    def __init__(self, contract: InputContract, delay_s: float = 0.0) -> None:
        self.contract = contract
        self.delay = threading.Event()
        self.delay_s = delay_s
        self.frames: list[tuple[int, FrameMeta]] = []
        self.stacks: list[Stack] = []
        self.closed: str | None = None

    def accepts_channel(self, c: int) -> bool:
        return True

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        self.delay.wait(self.delay_s)
        self.frames.append((int(data[0, 0]), dict(meta)))  # type: ignore[arg-type]

    def write_stack(self, stack: Stack) -> None:
        self.delay.wait(self.delay_s)
        self.stacks.append(stack)

    def close(
        self, status: str = "complete", error: str | None = None, summary: Any = None
    ) -> None:
        self.closed = status


def run(
    src: ThreadedSource, tmp_path: Path, *stages: SinkSpec, buffer_mb: float = 4
) -> tuple[dict[str, Any], ZarrSink]:
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    summary = StreamRunner(
        src, [SinkSpec("zarr", sink, records=True), *stages], buffer_mb=buffer_mb
    ).run(timeout=60)
    return summary, sink


def test_stages_declare_contracts() -> None:
    assert isinstance(SlowStage(InputContract.every()), Stage)
    assert InputContract.complete_stack(5).describe() == "complete_stack(5)"
    with pytest.raises(ValueError, match="positive size"):
        InputContract.window(0)


def test_every_frames_metadata_is_on_disk_beside_its_pixels(tmp_path: Path) -> None:
    src = PlanSource(n_t=4, n_c=2, n_z=3)
    summary, sink = run(src, tmp_path)
    assert isinstance(sink, Recorder)
    assert summary["status"] == "complete" and summary["frames_written"] == 24
    # plain numpy (pandas: DataFrame), beside the raw image's array
    table = np.load(tmp_path / "r.ome.zarr" / "0" / "frames.npy")
    assert table.dtype == FRAME_DTYPE and len(table) == 24
    assert table["seq"].tolist() == list(range(24))
    assert table["image_number"].tolist() == list(range(24))
    assert table["stage_x_um"].tolist() == [100.0 + i for i in range(24)]
    assert (table["stage_y_um"] == -5.0).all()
    assert table["stage_z_um"].tolist() == [0.25 * z for _ in range(8) for z in range(3)]
    assert table["exposure_ms"].tolist() == [
        1.5 + c for _ in range(4) for c in (0, 1) for _ in range(3)
    ]
    assert (np.diff(table["timestamp_ns"]) >= 0).all()
    assert (table["wall_ns"] > 1.6e18).all()  # Unix time, not the monotonic clock
    raw = zarr.open_array(str(tmp_path / "r.ome.zarr" / "0" / "0"), mode="r")
    for rec in table[::5]:  # the record describes the pixels at its (t, c, z)
        assert int(raw[rec["t"], rec["c"], rec["z"], 0, 0]) == rec["seq"]
    meta = sink.frame_meta(13)
    assert meta is not None and meta["t"] == 2 and meta["c"] == 0 and meta["z"] == 1
    assert meta["stage_z_um"] == 0.25 and meta["engine_time_ms"] == 130.0
    assert sink.frame_meta(99) is None


def test_a_second_frame_at_the_same_index_is_an_error_not_an_overwrite(tmp_path: Path) -> None:
    info = StreamInfo(frame_shape=SHAPE, n_t=4)
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    first = make_meta(t=1)
    first["seq"] = 0
    sink.write(np.full(SHAPE, 7, np.uint16), first)
    again = make_meta(t=1)
    again["seq"] = 1
    with pytest.raises(SinkError, match="second frame at t=1, c=0, z=0"):
        sink.write(np.zeros(SHAPE, np.uint16), again)
    sink.close()
    raw = zarr.open_array(str(tmp_path / "r.ome.zarr" / "0" / "0"), mode="r")
    assert int(raw[1, 0, 0, 0, 0]) == 7  # the first one is kept


def test_frames_read_back_from_the_recording_carry_their_real_metadata(tmp_path: Path) -> None:
    # a 4-slot ring and a stage that takes 10 ms a frame: it is lapped and reads back from disk
    src = PlanSource(n_t=40, n_z=2)
    slow = SlowStage(InputContract.every(), delay_s=0.01)
    summary, _ = run(src, tmp_path, SinkSpec("slow", slow), buffer_mb=4 * 512 / 2**20)
    assert summary["status"] == "complete"
    assert summary["frames_from_recording"]["slow"] > 0
    assert [v for v, _ in slow.frames] == list(range(80))  # every frame, in order, right pixels
    for value, meta in slow.frames:
        assert meta["seq"] == value
        assert meta["image_number"] == value
        assert meta["stage_x_um"] == 100.0 + value
        assert meta["stage_z_um"] == 0.25 * meta["z"]  # not z = 0 for the read-back ones
        assert meta["exposure_ms"] == 1.5  # not 0
    table = read_frame_index(tmp_path / "r.ome.zarr")
    stamps = {int(r["seq"]): int(r["timestamp_ns"]) for r in table}
    # latency is measured from the acquisition time, also for frames read back
    assert all(m["timestamp_ns"] == stamps[m["seq"]] for _, m in slow.frames)
    lat = summary["stages"]["slow"]["latency_ms"]
    assert lat["p99"] >= 10.0  # at least one frame's worth of the stage's own delay


def test_the_ring_keeps_nothing_per_frame(tmp_path: Path) -> None:
    ring = RingBuffer((4, 4), "uint16", n_slots=8)
    spill = ring.subscribe("model", OverflowPolicy.SPILL)
    frame = np.zeros((4, 4), np.uint16)
    for i in range(2000):  # warm up
        ring.put(frame, make_meta(t=i))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(2000, 60000):
        ring.put(frame, make_meta(t=i))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    assert grown < 64 * 1024, f"the ring grew by {grown} bytes over 58k frames"
    with pytest.raises(FrameLapped) as lapped:  # the lapped frame is named by its seq
        spill.get(timeout=1)
    assert lapped.value.seq == 0


def test_stack_stages_get_complete_stacks_only(tmp_path: Path) -> None:
    # 5 stacks of 3 planes; the source stops after 13 frames: the last stack is incomplete
    src = PlanSource(n_t=5, n_z=3, stop_after=13)
    stage = SlowStage(InputContract.complete_stack(3), delay_s=0.005)
    summary, _ = run(src, tmp_path, SinkSpec("s3", stage), buffer_mb=4 * 512 / 2**20)
    assert [st.key[0] for st in stage.stacks] == [0, 1, 2, 3]
    for st in stage.stacks:
        assert st.complete
        t = st.key[0]
        assert [int(p[0, 0]) for p in st.data] == [3 * t, 3 * t + 1, 3 * t + 2]  # real planes
        assert [m["z"] for m in st.metas if m is not None] == [0, 1, 2]
    assert summary["not_fed"] == {"s3": {"incomplete_stacks": 1}}
    assert summary["contracts"]["s3"] == "complete_stack(3)"
    assert summary["status"] == "stopped"  # 13 of 15 frames


def test_window_stages_get_gap_free_windows(tmp_path: Path) -> None:
    src = PlanSource(n_t=6)
    stage = SlowStage(InputContract.window(3))
    summary, _ = run(src, tmp_path, SinkSpec("t3", stage))
    assert [[m["t"] for m in st.metas if m is not None] for st in stage.stacks] == [
        [0, 1, 2],
        [1, 2, 3],
        [2, 3, 4],
        [3, 4, 5],
    ]
    assert summary["not_fed"] == {"t3": {"incomplete_windows": 2}}


def test_a_run_stopped_early_is_recorded_as_stopped(tmp_path: Path) -> None:
    src = PlanSource(n_t=100_000, fps=2000)
    sink = ZarrSink(tmp_path / "r.ome.zarr", src.info)
    got = threading.Event()
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=4)
    runner.frameReady.connect(lambda name, ev: got.set() if ev.seq >= 5 else None)
    runner.start()
    assert got.wait(30)
    runner.stop()
    assert runner.wait(30)
    s = runner.summary
    assert s is not None and s["status"] == "stopped"
    assert s["stopped"].startswith(f"stopped after {s['frames_acquired']} of 100000")
    assert s["frames_written"] == s["frames_acquired"]
    report = inspect_run(tmp_path / "r.ome.zarr")
    assert report.status == "stopped"
    assert report.frames_complete == s["frames_acquired"]


def test_timeline_lives_beside_the_run_not_in_its_attributes(tmp_path: Path) -> None:
    summary, _ = run(PlanSource(n_t=30), tmp_path)
    assert summary["status"] == "complete"
    root = json.loads((tmp_path / "r.ome.zarr" / "zarr.json").read_text())
    stored = root["attributes"]["scopestream"]["summary"]
    assert "timeline" not in stored and stored["frames_written"] == 30
    timeline = json.loads((tmp_path / "r.ome.zarr" / TIMELINE_FILE).read_text())
    assert sum(timeline["stages"]["zarr:disk"]["frames"]) == 30


@pytest.mark.parametrize(
    "name", ["nuclei", "DAPI", "membrane", "brightfield", "GFP", "mCherry", "Cy5", "actin", "x"]
)
def test_the_store_and_the_viewer_colour_a_channel_alike(name: str) -> None:
    from napari.utils.colormaps import ensure_colormap

    from scopestream.streaming.ome import image_attrs
    from scopestream.viewer.style import colormap_for

    info = StreamInfo(frame_shape=SHAPE, channel_names=(name,))
    stored = image_attrs("raw", info, (name,), np.dtype("uint16"))["omero"]["channels"][0]["color"]
    rgb = ensure_colormap(colormap_for(name)).colors[-1][:3]
    assert stored == "".join(f"{round(float(v) * 255):02X}" for v in rgb)


def test_the_publisher_never_sends_a_buffer_reused_after_write(free_port: int) -> None:
    from scopestream.streaming.protocol import FramePublisher, FrameReceiver, PublisherSink

    pub = FramePublisher(f"tcp://127.0.0.1:{free_port}")
    rx = FrameReceiver(f"tcp://127.0.0.1:{free_port}", hwm=1)
    try:
        assert pub.wait_for_receiver(10)
        sink = PublisherSink(pub)  # the frames it gets are only valid during write()
        buf = np.zeros((1024, 1024), np.uint16)  # over zmq's copy threshold
        for i in range(16):
            buf[...] = i
            meta = make_meta(t=i)
            meta["seq"] = i
            sink.write(buf, meta)
            buf[...] = 999  # the ring reuses the slot
        got = []
        for _ in range(16):
            msg = rx.recv(10_000)
            assert msg is not None
            got.append(int(msg.data[0, 0]))  # type: ignore[union-attr]
        assert got == list(range(16))
    finally:
        rx.close()
        pub.close()
