"""A well plate through the whole pipeline: every field recorded and predicted, one series
per field and output in a collection that validates and that napari-ome-zarr opens whole."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zarr

from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.saved_run import SavedRun, inspect_run

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

PLATE_YAML = """\
stage_positions:
  plate: 96-well
  a1_center_xy: [0, 0]
  selected_wells: [[0, 0, 1, 1], [0, 1, 0, 1]]
  well_points_plan: {rows: 1, columns: 2}
time_plan: {interval: 0, loops: 3}
z_plan: {range: 2, step: 1}
channels:
  - {config: brightfield, exposure: 5}
  - {config: nuclei, exposure: 20}
"""


def test_a_plate_run_records_and_predicts_every_field(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    plan = tmp_path / "plate.yaml"
    plan.write_text(PLATE_YAML)
    out = tmp_path / "P.ome.zarr"
    r = cli(
        "run", "--source", "sim", "--shape", "32x32", "--mda", str(plan),
        "--model", "denoise", "--model", "stain", "--model-policy", "all",
        "--backend", "torch-cpu", "--out", str(out),
    )  # fmt: skip
    assert r.code == 0, r.stderr
    run = SavedRun(out)
    assert run.is_collection and run.status == "complete" and run.n_positions == 8
    fields = [f"{w}_{k:04d}" for w in ("A1", "A2", "B1", "B2") for k in range(2)]
    assert [im.position for im in run.images if im.name == "raw"] == fields
    report = inspect_run(out)
    assert report.frames_expected == report.frames_complete == 8 * 3 * 2 * 3
    for im in run.images:  # every field: every raw frame, every frame predicted
        flags = im.complete()
        if im.name == "stain":  # brightfield in, nuclei and membrane out: both whole
            assert flags.shape[:3] == (3, 2, 3) and flags.all(), im.position
        elif im.name == "denoise":  # on nuclei only, the channel it was trained on
            assert im.channels == ("nuclei",), im.channels
            assert flags.shape[:3] == (3, 1, 3) and flags.all(), im.position
        else:
            assert flags.shape[:3] == (3, 2, 3) and flags.all(), (im.name, im.position)
    # the per-frame metadata of each field says where the stage was: where the plan sent it
    positions = run.attrs["stream"]["positions"]
    table = read_frame_index(out)
    assert len(table) == 144 and np.array_equal(np.unique(table["p"]), np.arange(8))
    for rec in table:
        pos = positions[int(rec["p"])]
        assert rec["stage_x_um"] == pytest.approx(pos["x_um"])
        assert rec["stage_y_um"] == pytest.approx(pos["y_um"])
    # fields differ: the sample under each position is another part of the dish
    a = np.asarray(run.image("raw", 0).array()[0, 1, 1], float)
    b = np.asarray(run.image("raw", 2).array()[0, 1, 1], float)
    assert not np.allclose(a, b)

    # OME-Zarr 0.5: a bioformats2raw collection of the fields of three HCS plates (raw,
    # denoise, stain), each a valid plate of 4 wells × 2 fields, each field a valid image
    from ome_zarr_models.v05 import HCS, BioFormats2Raw, Image

    root = zarr.open_group(str(out), mode="r")
    BioFormats2Raw.from_zarr(root)
    series = [e["path"] for e in run.attrs["series"]]
    assert len(series) == 8 * 3 and series[:2] == ["raw/A/1/0", "raw/A/1/1"]
    for name in ("raw", "denoise", "stain"):
        plate = HCS.from_zarr(root[name])
        assert plate.n_wells == 4
        assert plate.ome_attributes.plate.field_count == 2
        wells = [w.ome_attributes.well for w in plate.well_groups]
        assert all(len(w.images) == 2 for w in wells)
    for path in series:
        Image.from_zarr(root[path])

    # napari-ome-zarr opens every series, raw and both outputs of every field
    from napari_ome_zarr import napari_get_reader

    reader = napari_get_reader(str(out))
    assert reader is not None
    layers = reader(str(out))
    names = [n for _, kw, _ in layers for n in kw["name"]]
    for f in fields:
        for image, channels in (
            ("raw", ("brightfield", "nuclei")),
            ("denoise", ("nuclei",)),
            ("stain", ("nuclei", "membrane")),
        ):
            for ch in channels:
                assert f"{image} @ {f}: {ch}" in names
    # and shows it: every channel's contrast window lies within the data, not the dtype range
    for data, kw, _ in layers[:8]:
        arr = np.asarray(data[0])
        for c, (lo, hi) in enumerate(kw["contrast_limits"]):
            assert arr[:, c].min() <= lo < hi <= arr[:, c].max() + 1

    # and each image's plate opens as a plate: every well's first field on the plate's grid
    (plate_layer,) = napari_get_reader(str(out / "raw"))(str(out / "raw"))
    data = plate_layer[0][0] if isinstance(plate_layer[0], list) else plate_layer[0]
    assert tuple(data.shape) == (3, 2, 3, 2 * 32, 2 * 32)  # t, c, z; 2 × 2 wells of 32²
    for p, (y, x) in ((0, (0, 0)), (2, (0, 32)), (4, (32, 0))):  # A1, A2, B1: first fields
        tile = np.asarray(data[0, 0, 1, y : y + 32, x : x + 32])
        np.testing.assert_array_equal(tile, np.asarray(run.image("raw", p).array()[0, 0, 1]))

    # `scopestream view` shows one field at a time (a p slider, the field selector, a plate
    # overview with every well's thumbnail), every layer of the same field
    shot = tmp_path / "plate.png"
    v = cli("view", str(out), "--screenshot", str(shot), "--json")
    assert v.code == 0, v.stderr
    shown = v.json
    assert shown["layers"] == [
        "brightfield (raw)", "nuclei (raw)", "nuclei (denoised)", "nuclei (predicted)",
        "membrane (predicted)",
    ]  # fmt: skip
    assert shown["shapes"]["nuclei (raw)"] == [3, 8, 3, 32, 32]  # t, p, z, y, x
    assert shown["positions"] == fields and shown["field_shown"] == "A1_0000"
    assert shown["canvas_text"].startswith("field A1_0000")
    assert shown["plate_wells_imaged"] == ["A1", "A2", "B1", "B2"]
    assert shot.stat().st_size > 0


@pytest.mark.parametrize("engine", ["mmcore:demo", "pycromanager:demo"])
def test_micro_manager_engines_record_each_position_where_the_plan_put_it(
    tmp_path: Path, engine: str
) -> None:
    import scopestream as ss

    out = tmp_path / "demo.ome.zarr"
    plan = {
        "time_points": 2,
        "channels": "DAPI:5",
        "plate": {"plate": "96-well", "wells": "A1,B3", "a1_center_um": [1000.0, 500.0]},
    }
    with ss.Pipeline.from_config(
        {"source": engine, "plan": plan, "models": ["denoise:DAPI"], "backend": "torch-cpu",
         "model_policy": "all", "out": str(out)}
    ) as pipe:  # fmt: skip
        summary = pipe.run()
    assert summary["status"] == "complete" and summary["frames_written"] == 4
    run = SavedRun(out)
    assert [(im.name, im.position) for im in run.images] == [
        ("raw", "A1"), ("raw", "B3"), ("denoise", "A1"), ("denoise", "B3"),
    ]  # fmt: skip
    table = read_frame_index(out)
    assert [(int(r["t"]), int(r["p"])) for r in table] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    want = {0: (1000.0, 500.0), 1: (1000.0 + 2 * 9000.0, 500.0 - 9000.0)}  # A1, B3: 9 mm pitch
    for r in table:
        x, y = want[int(r["p"])]
        assert r["stage_x_um"] == pytest.approx(x, abs=0.5)
        assert r["stage_y_um"] == pytest.approx(y, abs=0.5)
    for im in run.images:
        assert im.complete().all()


def _two_field_run(out: Path, *, skip: tuple[int, int] | None = None) -> Path:
    """Fields a (x 0) and b (x 50), 3 time points of one channel; pixel = 100·(p+1) + t.
    ``skip`` (t, p): a frame never written (a cut run)."""
    from scopestream.streaming.frame import make_meta
    from scopestream.streaming.layout import Position, StreamInfo
    from scopestream.streaming.zarr_sink import ZarrSink

    fields = (Position("a", 0.0, 0.0), Position("b", 50.0, 0.0))
    info = StreamInfo((16, 16), n_t=3, positions=fields, channel_names=("nuclei",))
    sink = ZarrSink(out, info)
    seq = 0
    for t in range(3):
        for p in range(2):
            if (t, p) == skip:
                continue
            m = make_meta(t=t, p=p)
            m.update(seq=seq, stage_x_um=fields[p].x_um, stage_y_um=0.0)
            seq += 1
            sink.write(np.full((16, 16), 100 * (p + 1) + t, np.uint16), m)
    sink.close("complete" if skip is None else "stopped")
    return out


def test_a_run_of_several_positions_replays_field_by_field(tmp_path: Path) -> None:
    import scopestream as ss
    from scopestream.acquisition.replay import ReplaySource

    run = _two_field_run(tmp_path / "two.ome.zarr", skip=(1, 1))
    src = ReplaySource(run)
    assert [p.name for p in src.info.positions] == ["a", "b"]
    assert src.frames_planned == 5  # the frame never written is not replayed
    got = [(m["t"], m["p"], int(f[0, 0]), m["stage_x_um"]) for f, m in src.frames()]
    assert got == [
        (0, 0, 100, 0.0), (0, 1, 200, 50.0), (1, 0, 101, 0.0), (2, 0, 102, 0.0),
        (2, 1, 202, 50.0),
    ]  # fmt: skip
    src.finished()
    # through the pipeline with a model: a collection of the same two fields again
    out = tmp_path / "again.ome.zarr"
    with ss.Pipeline.from_config(
        {"source": f"replay:{run}", "models": ["denoise"], "backend": "torch-cpu",
         "model_policy": "all", "out": str(out), "fps": 0}
    ) as pipe:  # fmt: skip
        summary = pipe.run()
    assert summary["frames_written"] == 5
    again = SavedRun(out)
    assert [(im.name, im.position) for im in again.images] == [
        ("raw", "a"), ("raw", "b"), ("denoise", "a"), ("denoise", "b"),
    ]  # fmt: skip
    for p in range(2):
        before = np.asarray(SavedRun(run).image("raw", p).array()[:, 0, 0, 0, 0])
        after = np.asarray(again.image("raw", p).array()[:, 0, 0, 0, 0])
        done = again.image("raw", p).complete()[:, 0, 0]
        np.testing.assert_array_equal(after[done], before[done])
        assert done.tolist() == ([True, True, True] if p == 0 else [True, False, True])
        assert (again.image("denoise", p).complete()[:, 0, 0] == done).all()


def test_training_reads_every_field_of_a_run(tmp_path: Path) -> None:
    from scopestream.streaming.saved_run import complete_frames
    from scopestream.training.data import DataError, load_run, load_run_fields

    run = _two_field_run(tmp_path / "two.ome.zarr", skip=(2, 0))
    fields = load_run_fields(run, "nuclei")
    assert [f.name for f in fields] == ["two.ome.zarr@a", "two.ome.zarr@b"]
    assert [np.asarray(f.input[:, 0, 0]).tolist() for f in fields] == [[100, 101], [200, 201, 202]]
    # readers that take one field say so and name the way to several
    with pytest.raises(DataError, match=r"2 positions; load_run \(use load_run_fields\)"):
        load_run(run)
    with pytest.raises(ValueError, match="2 positions; complete_frames"):
        complete_frames(run)
    assert SavedRun(run).image("raw", 1).complete().all()  # one image: asked by name
