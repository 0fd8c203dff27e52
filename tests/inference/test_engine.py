from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
import zarr

from scopestream.inference.backends import OnnxBackend
from scopestream.inference.engine import (
    InferenceEngine,
    ModelChannelError,
    check_channels,
    output_names,
)
from scopestream.inference.guard import STATS, Fingerprint
from scopestream.inference.package import Registry, split_model_spec
from scopestream.inference.predictor import Predictor
from scopestream.inference.watcher import RegistryWatcher
from scopestream.streaming.frame import make_meta
from scopestream.streaming.layout import Position, StreamInfo
from scopestream.streaming.saved_run import SavedRun
from scopestream.streaming.zarr_sink import ZarrSink, complete_frames

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from scopestream.inference.package import ModelPackage

SHAPE = (64, 72)


def image(store: Path, name: str) -> Path:
    """The group of the run's image ``name`` (a series of the collection)."""
    return SavedRun(store).image(name).path


def frames(info: StreamInfo, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    seq = 0
    for t in range(info.n_t or 1):
        for c in range(info.n_c):
            for z in range(info.n_z):
                m = make_meta(t=t, c=c, z=z)
                m["seq"] = seq
                seq += 1
                yield rng.normal(300, 20, SHAPE).astype(np.uint16), m


def run_engine(
    tmp_path: Path, pkg: ModelPackage, info: StreamInfo
) -> tuple[InferenceEngine, Path]:
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    pred = Predictor(pkg, OnnxBackend(pkg, threads=2))
    names = output_names(pred, info.channel_names, check_channels(pred, info.channel_names))
    writer = sink.add_output(pkg.name, channel_names=names, provenance=pred.describe())
    eng = InferenceEngine(pred, writer, source_channels=info.channel_names, n_z=info.n_z)
    for data, meta in frames(info):
        sink.write(data, meta)
        eng.write(data, meta)
    eng.close()
    sink.close()
    return eng, tmp_path / "r.ome.zarr"


def test_2d_denoiser_on_every_channel(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    info = StreamInfo(frame_shape=SHAPE, n_t=3, channel_names=("brightfield", "nuclei"))
    eng, store = run_engine(tmp_path, make_package(), info)
    assert eng.predicted == 6
    assert complete_frames(image(store, "denoise")).all()
    g = zarr.open_group(str(image(store, "denoise")), mode="r")
    assert [c["label"] for c in g.attrs["ome"]["omero"]["channels"]] == ["brightfield", "nuclei"]
    prov = g.attrs["scopestream"]["prediction"]
    assert prov["model"] == "denoise"
    assert len(prov["sha256"]) == 64
    assert g.attrs["scopestream"]["versions"][0]["from_seq"] == 0


def test_stain_model_only_takes_its_channel(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    pkg = make_package(
        name="stain",
        kind="stain_unet",
        params={"out_channels": 2, "base": 8},
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
    )
    info = StreamInfo(frame_shape=SHAPE, n_t=2, channel_names=("brightfield", "gfp"))
    eng, store = run_engine(tmp_path, pkg, info)
    assert eng.predicted == 2
    assert eng.ignored == 2
    flags = complete_frames(image(store, "stain"))
    assert flags.shape == (2, 2, 1)
    assert flags.all()  # both stains at both time points
    with pytest.raises(
        ModelChannelError, match=r"takes channel \['brightfield'\]; the source has \['gfp'\]"
    ):
        InferenceEngine(Predictor(pkg, OnnxBackend(pkg)), None, source_channels=("gfp",))


def test_a_model_of_any_input_runs_only_on_the_channels_it_was_trained_on(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    wide = dict.fromkeys(STATS, (0.0, 1e9))
    pkg = make_package(fingerprint=Fingerprint(frames=4, channels=("nuclei",), ranges=wide))
    info = StreamInfo(frame_shape=SHAPE, n_t=2, channel_names=("brightfield", "nuclei"))
    eng, store = run_engine(tmp_path, pkg, info)
    assert eng.predicted == 2 and eng.ignored == 2  # brightfield is not denoised
    g = zarr.open_group(str(image(store, "denoise")), mode="r")
    assert [c["label"] for c in g.attrs["ome"]["omero"]["channels"]] == ["nuclei"]
    assert complete_frames(image(store, "denoise")).shape == (2, 1, 1)
    assert complete_frames(image(store, "denoise")).all()
    pred = Predictor(pkg, OnnxBackend(pkg))
    # told otherwise (--model denoise:brightfield,nuclei): every channel named
    told = check_channels(pred, info.channel_names, channels=("brightfield", "nuclei"))
    assert told == [0, 1]
    assert output_names(pred, info.channel_names, told) == ("brightfield", "nuclei")
    with pytest.raises(ModelChannelError, match=r"'gfp' is not one of the source's"):
        check_channels(pred, info.channel_names, channels=("gfp",))
    # none of the trained channels: refused, and the error says how to run it anyway
    with pytest.raises(
        ModelChannelError,
        match=r"trained on channel \['nuclei'\]; the source has \['brightfield'\] "
        r"\(to run it there anyway, name the channel: --model denoise:brightfield\)",
    ):
        InferenceEngine(pred, None, source_channels=("brightfield",))


def test_model_specs_name_channels() -> None:
    assert split_model_spec("denoise") == ("denoise", None)
    assert split_model_spec("denoise:nuclei") == ("denoise", ("nuclei",))
    assert split_model_spec("denoise@2:nuclei,membrane") == ("denoise@2", ("nuclei", "membrane"))
    assert split_model_spec("./pkg/denoise:nuclei") == ("./pkg/denoise", ("nuclei",))
    assert split_model_spec("C:\\models\\denoise") == ("C:\\models\\denoise", None)
    assert split_model_spec("C:denoise") == ("C:denoise", None)  # a drive, not a model


def test_temporal_window_is_causal(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    pkg = make_package(name="dn_t", params={"in_channels": 3}, spatial="2.5d-t", window=3)
    info = StreamInfo(frame_shape=SHAPE, n_t=5, channel_names=("nuclei",))
    eng, store = run_engine(tmp_path, pkg, info)
    # only full windows: t=0 and t=1 have no two earlier frames and are never predicted
    assert eng.predicted == 3
    assert eng.incomplete_stacks == 2
    done = complete_frames(image(store, "dn_t"))[:, 0, 0].tolist()
    assert done == [False, False, True, True, True]
    raw = zarr.open_array(str(image(store, "raw") / "0"), mode="r")[:, 0, 0]
    out = zarr.open_array(str(image(store, "dn_t") / "0"), mode="r")[:, 0, 0]
    ref = Predictor(pkg, OnnxBackend(pkg, threads=2))
    for t in (2, 3, 4):  # the window that ends at t: t-2, t-1, t (never a later frame)
        np.testing.assert_allclose(
            out[t], ref.predict(raw[t - 2 : t + 1])[0], rtol=1e-5, atol=1e-4
        )


def test_temporal_window_with_a_gap_is_never_predicted(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    pkg = make_package(name="dn_t", params={"in_channels": 3}, spatial="2.5d-t", window=3)
    info = StreamInfo(frame_shape=SHAPE, n_t=6, channel_names=("nuclei",))
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    pred = Predictor(pkg, OnnxBackend(pkg, threads=2))
    writer = sink.add_output("dn_t", channel_names=("nuclei",), provenance=pred.describe())
    eng = InferenceEngine(pred, writer, source_channels=info.channel_names)
    for data, meta in frames(info):
        if meta["t"] != 3:  # t=3 was never acquired
            eng.write(data, meta)
    eng.close()
    sink.close()
    done = complete_frames(image(tmp_path / "r.ome.zarr", "dn_t"))[:, 0, 0].tolist()
    # t=2 (0,1,2) is whole; t=4 (2,4) and t=5 (2,4,5) would span the gap
    assert done == [False, False, True, False, False, False]
    assert eng.incomplete_stacks == 4


@pytest.mark.parametrize("spatial", ["2.5d-z", "3d"])
def test_z_models_predict_every_plane_of_each_stack(
    tmp_path: Path, make_package: Callable[..., ModelPackage], spatial: str
) -> None:
    if spatial == "3d":
        params = {"dims": 3, "out_channels": 1, "base": 4, "pool_z": (False, False, False)}
        pkg = make_package(
            name="s3",
            kind="stain_unet",
            params=params,
            inputs=("brightfield",),
            outputs=("nuclei",),
            spatial="3d",
        )
    else:
        pkg = make_package(
            name="s25",
            kind="stain_unet",
            params={"in_channels": 3, "out_channels": 1, "base": 4},
            inputs=("brightfield",),
            outputs=("nuclei",),
            spatial="2.5d-z",
            window=3,
        )
    info = StreamInfo(frame_shape=SHAPE, n_t=2, channel_names=("brightfield",), n_z=4)
    eng, store = run_engine(tmp_path, pkg, info)
    assert eng.predicted == 8
    assert complete_frames(image(store, pkg.name)).all()
    # the second stack (Z, Y, X)
    raw = zarr.open_array(str(image(store, "raw") / "0"), mode="r")[1, 0]
    out = zarr.open_array(str(image(store, pkg.name) / "0"), mode="r")[1, 0]
    ref = Predictor(pkg, OnnxBackend(pkg, threads=2))
    if spatial == "3d":
        np.testing.assert_allclose(out, ref.predict(raw)[0], rtol=1e-5, atol=1e-4)
    else:  # plane z from the planes z-1, z, z+1 of its own stack (edges repeat the end plane)
        for z in range(4):
            idx = np.clip([z - 1, z, z + 1], 0, 3)
            np.testing.assert_allclose(out[z], ref.predict(raw[idx])[0], rtol=1e-5, atol=1e-4)


def test_hot_swap_takes_over_at_a_frame_boundary(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    info = StreamInfo(frame_shape=SHAPE, n_t=6, channel_names=("nuclei",))
    v1, v2 = make_package(seed=1), make_package(seed=2)
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    p1 = Predictor(v1, OnnxBackend(v1, threads=2))
    writer = sink.add_output("denoise", channel_names=("nuclei",))
    eng = InferenceEngine(p1, writer, source_channels=info.channel_names)
    for i, (data, meta) in enumerate(frames(info)):
        if i == 4:
            eng.swap(Predictor(v2, OnnxBackend(v2, threads=2)))
        eng.write(data, meta)
    eng.close()
    sink.close()
    versions = zarr.open_group(str(image(tmp_path / "r.ome.zarr", "denoise")), mode="r").attrs[
        "scopestream"
    ]["versions"]
    assert [(v["sha256"], v["from_seq"]) for v in versions] == [(v1.sha256, 0), (v2.sha256, 4)]


class _Watched(Predictor):
    """A predictor that records where and on what it was first run (or fails there)."""

    def __init__(self, *a: object, fail: bool = False, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.fail = fail
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def predict(self, data: np.ndarray) -> np.ndarray:
        self.calls.append((threading.current_thread().name, data.dtype.name, data.shape))
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access")
        return super().predict(data)


def test_a_swap_is_warmed_on_the_inference_thread_with_the_live_input_or_refused(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    info = StreamInfo(frame_shape=SHAPE, n_t=8, channel_names=("nuclei",))
    v1, v2, v3 = make_package(seed=1), make_package(seed=2), make_package(seed=3)
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    writer = sink.add_output("denoise", channel_names=("nuclei",))
    eng = InferenceEngine(
        Predictor(v1, OnnxBackend(v1, threads=2)), writer, source_channels=info.channel_names
    )
    refused: list[str] = []
    eng.on_swap_refused = lambda ident, why: refused.append(why)
    good = _Watched(v2, OnnxBackend(v2, threads=2))
    bad = _Watched(v3, OnnxBackend(v3, threads=2), fail=True)
    handed_over = threading.Thread(target=eng.swap, args=(bad,), name="watcher")
    handed_over.start()  # handed over from another thread, like the registry watcher
    handed_over.join()
    for i, (data, meta) in enumerate(frames(info)):
        if i == 4:
            eng.swap(good)
        eng.write(data, meta)
    eng.close()
    sink.close()
    inference = threading.current_thread().name
    assert bad.calls == [(inference, "uint16", SHAPE)]  # warmed here, on the live dtype
    assert refused and "failed to run" in refused[0] and "illegal memory access" in refused[0]
    assert good.calls[0] == (inference, "uint16", SHAPE)
    assert [v["sha256"] for v in eng.versions] == [v1.sha256, v2.sha256]  # v3 never ran
    assert eng.predicted == 8  # the running model went on


def test_registry_watcher_swaps_in_a_new_version(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    reg = Registry(tmp_path / "reg", bundled=False)
    first = reg.publish(make_package(seed=1))
    info = StreamInfo(frame_shape=SHAPE, n_t=200, channel_names=("nuclei",))
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    writer = sink.add_output("denoise", channel_names=("nuclei",))
    eng = InferenceEngine(
        Predictor(first, OnnxBackend(first, threads=1)), writer, source_channels=("nuclei",)
    )
    swapped: list[int] = []
    watcher = RegistryWatcher(
        reg,
        "denoise",
        eng,
        lambda pkg: Predictor(pkg, OnnxBackend(pkg, threads=1)),
        interval_s=0.05,
        on_swap=lambda ident: swapped.append(ident["version"]),
    )
    watcher.start()
    try:
        it = frames(info)
        for _ in range(3):
            eng.write(*next(it))
        reg.publish(make_package(seed=2))  # the trainer drops a new version in
        deadline = time.monotonic() + 30
        while not swapped and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(3):
            eng.write(*next(it))
    finally:
        watcher.stop()
    assert swapped == [2]
    assert [v["version"] for v in eng.versions] == [1, 2]
    assert eng.versions[1]["from_seq"] == 3
    eng.close()
    sink.close()


def test_calibration_burst_freezes_normalization_once(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    info = StreamInfo(frame_shape=SHAPE, n_t=8, channel_names=("nuclei",))
    pkg = make_package()
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    writer = sink.add_output("denoise", channel_names=("nuclei",))
    eng = InferenceEngine(
        Predictor(pkg, OnnxBackend(pkg, threads=1)),
        writer,
        source_channels=("nuclei",),
        calibrate=3,
    )
    stream = list(frames(info))
    for data, meta in stream[:2]:
        eng.write(data, meta)
    assert eng.predicted == 0  # held back until the burst is complete
    for data, meta in stream[2:]:
        eng.write(data, meta)
    assert eng.predicted == 8  # nothing lost: the burst frames are predicted too
    burst = np.stack([d for d, _ in stream[:3]])
    norm = eng.predictor_for(0, 0).input_norm
    assert norm.source == "calibration"
    assert norm.offset[0] == pytest.approx(np.percentile(burst, 1))
    eng.close()
    sink.close()
    g = zarr.open_group(str(image(tmp_path / "r.ome.zarr", "denoise")), mode="r")
    (field,) = g.attrs["scopestream"]["calibration"]["fields"]
    assert (field["p"], field["channel"], field["frames"]) == (0, "nuclei", 3)
    assert field["input_norm"]["offset"][0] == pytest.approx(norm.offset[0])


def test_calibration_is_per_field_and_channel(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    """A dim and a bright field (and two channels) each get their own frozen constants:
    one burst over all of them would give the dim field the bright one's range."""
    info = StreamInfo(
        frame_shape=SHAPE,
        n_t=4,
        channel_names=("nuclei", "actin"),
        positions=(Position("dim", x_um=0.0), Position("bright", x_um=500.0)),
    )
    level = {(0, 0): 150.0, (0, 1): 400.0, (1, 0): 2000.0, (1, 1): 6000.0}
    rng = np.random.default_rng(1)
    stream = []
    for seq, (t, p, c) in enumerate(itertools.product(range(4), range(2), range(2))):
        m = make_meta(t=t, c=c, p=p)
        m["seq"] = seq
        stream.append((rng.normal(level[p, c], 10, SHAPE).astype(np.uint16), m))
    pkg = make_package()
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    writer = sink.add_output("denoise", channel_names=("nuclei", "actin"))
    eng = InferenceEngine(
        Predictor(pkg, OnnxBackend(pkg, threads=1)),
        writer,
        source_channels=info.channel_names,
        calibrate=2,
    )
    for data, meta in stream:
        eng.write(data, meta)
    eng.close()
    sink.close()
    assert eng.predicted == len(stream)
    for (p, c), lvl in level.items():
        burst = np.stack([d for d, m in stream if (m["p"], m["c"]) == (p, c)][:2])
        norm = eng.predictor_for(p, c).input_norm
        assert norm.offset[0] == pytest.approx(np.percentile(burst, 1))
        assert lvl - 60 < norm.offset[0] < lvl
    fields = zarr.open_group(str(image(tmp_path / "r.ome.zarr", "denoise")), mode="r").attrs[
        "scopestream"
    ]["calibration"]["fields"]
    assert {(f["p"], f["channel"]) for f in fields} == {
        (0, "nuclei"),
        (0, "actin"),
        (1, "nuclei"),
        (1, "actin"),
    }


def test_swapped_version_keeps_the_runs_calibration(
    tmp_path: Path, make_package: Callable[..., ModelPackage]
) -> None:
    info = StreamInfo(frame_shape=SHAPE, n_t=6, channel_names=("nuclei",))
    sink = ZarrSink(tmp_path / "r.ome.zarr", info)
    writer = sink.add_output("denoise", channel_names=("nuclei",))
    first = make_package(seed=0)
    eng = InferenceEngine(
        Predictor(first, OnnxBackend(first, threads=1)),
        writer,
        source_channels=("nuclei",),
        calibrate=2,
    )
    stream = list(frames(info))
    for data, meta in stream[:3]:
        eng.write(data, meta)
    frozen = eng.predictor_for(0, 0).input_norm
    assert frozen.source == "calibration"
    second = make_package(seed=1, norm=(0.0, 5000.0))
    eng.swap(Predictor(second, OnnxBackend(second, threads=1)))
    for data, meta in stream[3:]:
        eng.write(data, meta)
    eng.close()
    sink.close()
    now = eng.predictor_for(0, 0)
    assert now.package.version == second.version and now.package.path == second.path
    assert now.input_norm == frozen  # not the new version's training constants (0, 5000)
