"""What the display is handed, without Qt: newest frames, throttled copies, stacks, outputs."""

from __future__ import annotations

import time

import numpy as np

from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import StreamInfo
from scopestream.viewer.frames import LatestFrames
from scopestream.viewer.style import colormap_for, estimate_limits


def _info(n_z: int = 1) -> StreamInfo:
    return StreamInfo(
        frame_shape=(8, 8), dtype="uint16", n_t=10, n_z=n_z, channel_names=("bf", "nuclei")
    )


def test_raw_frames_are_copied_and_only_the_newest_is_kept() -> None:
    lf = LatestFrames(_info(), max_hz=0)  # no throttle
    buf = np.full((8, 8), 5, np.uint16)
    lf.write(buf, make_meta(t=0, c=1))
    buf[:] = 99  # the ring slot is reused: what was shown must not change
    seen: dict[str, tuple[int, int]] = {}
    (shown,) = lf.changed(seen)
    assert (shown.key, shown.kind, shown.channel) == ("nuclei (raw)", "raw", "nuclei")
    assert int(shown.data[0, 0]) == 5
    assert lf.changed(seen) == []  # nothing new since
    lf.write(np.full((8, 8), 7, np.uint16), make_meta(t=1, c=1))
    lf.write(np.full((8, 8), 8, np.uint16), make_meta(t=2, c=1))
    (shown,) = lf.changed(seen)
    assert int(shown.data[0, 0]) == 8 and shown.t == 2


def test_copies_are_throttled_per_image() -> None:
    lf = LatestFrames(_info(), max_hz=20)
    for i in range(200):
        lf.write(np.full((8, 8), i, np.uint16), make_meta(t=i, c=0))
    assert lf.frames_seen == 200
    assert lf.frames_copied < 5  # a burst of 200 frames costs a handful of copies
    time.sleep(0.06)
    lf.write(np.full((8, 8), 500, np.uint16), make_meta(t=200, c=0))
    (shown,) = lf.changed({})
    assert int(shown.data[0, 0]) == 500


def test_z_stacks_fill_plane_by_plane_and_outputs_are_named_for_what_they_are() -> None:
    lf = LatestFrames(_info(n_z=3))
    for z in range(3):
        lf.write(np.full((8, 8), z + 1, np.uint16), make_meta(t=0, c=0, z=z))
    y = np.stack([np.full((8, 8), 0.5, np.float32), np.full((8, 8), 2.0, np.float32)])
    lf.put_prediction("stain", "predicted", ("nuclei", "membrane"), y, make_meta(c=0, z=1))
    lf.put_prediction("denoise", "denoised", ("nuclei",), y[:1], make_meta(c=1, z=2))
    shown = {s.key: s for s in lf.changed({})}
    assert set(shown) == {
        "bf (raw)",
        "nuclei (predicted)",
        "membrane (predicted)",
        "nuclei (denoised)",
    }
    assert shown["bf (raw)"].data.shape == (3, 8, 8)
    assert [int(p[0, 0]) for p in shown["bf (raw)"].data] == [1, 2, 3]
    assert shown["membrane (predicted)"].data[1, 0, 0] == 2.0
    assert shown["nuclei (denoised)"].data[2, 0, 0] == 0.5


def test_stain_colours_and_contrast() -> None:
    assert colormap_for("Brightfield") == "gray"
    assert colormap_for("nuclei (predicted)") == "cyan"
    assert colormap_for("membrane") == "magenta"
    img = np.concatenate([np.zeros(1000), np.linspace(10, 20, 9000), np.full(10, 1e6)])
    lo, hi = estimate_limits(img)
    assert lo >= 0 and 19 < hi < 1e5  # the hot pixels do not set the range
