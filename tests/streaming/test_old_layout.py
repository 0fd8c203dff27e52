"""Runs written before the collection layout (root = raw image, outputs as child groups)
still read: SavedRun, inspect, view's layers, replay, training and report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.saved_run import SavedRun, complete_frames, inspect_run

OLD = Path(__file__).parent.parent / "data" / "old_layout.ome.zarr"  # 6 frames, 32², denoise


def test_an_old_run_reads_through_every_reader(tmp_path: Path) -> None:
    run = tmp_path / "old.ome.zarr"
    shutil.copytree(OLD, run)  # readers never write, but a copy keeps the data pristine
    saved = SavedRun(run)
    assert not saved.is_collection
    assert saved.status == "complete"
    kinds = [(im.name, im.kind) for im in saved.images]
    assert kinds == [("raw", "raw"), ("denoise", "prediction")]
    assert saved.raw.path == run and saved.image("denoise").path == run / "denoise"
    assert saved.n_positions == 1
    assert complete_frames(run).sum() == 6
    assert read_frame_index(run)["seq"].tolist() == list(range(6))
    report = inspect_run(run)
    assert report.frames_complete == 6 and [i.name for i in report.images] == ["raw", "denoise"]
    assert [c.name for c in saved.channels()] == ["nuclei (raw)", "nuclei (denoised)"]

    from scopestream.viewer.saved import run_layers

    specs = run_layers(run)
    assert [s.name for s in specs] == ["nuclei (raw)", "nuclei (denoised)"]
    assert all(s.complete_t == list(range(6)) for s in specs)

    from scopestream.acquisition.replay import ReplaySource

    src = ReplaySource(run)
    got: list[np.ndarray] = []
    src.start(lambda d, m: got.append(d.copy()))
    assert src.wait(30) and src.error is None
    raw = np.asarray(saved.raw.array())
    assert len(got) == 6 and all(np.array_equal(g, raw[t, 0, 0]) for t, g in enumerate(got))

    from scopestream.training.data import load_run

    field = load_run(run, "nuclei", ["denoise:nuclei"])
    assert len(field.input) == 6 and len(field.targets[0]) == 6
