"""``scopestream bench streaming``: pipeline throughput against the writer and disk ceilings.

In one run, on the same frames and the same disk, it measures

* ``pipeline``: in-memory replay → ring buffer → `ZarrSink` (the real run path, no model);
* ``tensorstore``: the same frames written with tensorstore directly, same chunking,
  codec and writes in flight (the writer ceiling);
* ``file``: the raw bytes written to one file per frame with fsync and rename from
  the same number of threads (the disk ceiling).

Each is repeated, in a rotating order and after a ``sync``, so that no variant
always pays for another's writeback; the medians and their ratios are reported.
The disks of shared machines are noisy: read ``all_fps`` before the ratios.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from scopestream.streaming.zarr_sink import _blosc_codecs, _frame_chunk


def realistic_frames(shape: tuple[int, int], k: int = 8, seed: int = 0) -> np.ndarray:
    """``k`` distinct noisy cell frames from the simulator (not zeros: compression is honest)."""
    from scopestream.acquisition.sample import SimulatedMicroscope

    scope = SimulatedMicroscope(shape, seed=seed, noise_pool=2)
    return np.stack([scope.snap(i * 0.1, "nuclei", 0.0, 10.0) for i in range(k)])


def _bench_pipeline(frames: np.ndarray, n: int, out: Path, in_flight: int) -> float:
    from scopestream.acquisition.replay import ArraySource
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import ZarrSink

    src = ArraySource(frames, n)
    sink = ZarrSink(out, src.info, max_in_flight=in_flight, source=src.describe())
    runner = StreamRunner(src, [SinkSpec("zarr", sink, records=True)], buffer_mb=256)
    t0 = time.perf_counter()
    summary = runner.run()
    dt = time.perf_counter() - t0
    if summary["status"] != "complete" or summary["frames_written"] != n:
        raise RuntimeError(f"pipeline run failed: {summary['error']}")
    return n / dt


def _bench_tensorstore(frames: np.ndarray, n: int, out: Path, in_flight: int) -> float:
    h, w = frames.shape[1:]
    arr = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(out)},
            "metadata": {
                "shape": [n, 1, 1, h, w],
                "data_type": frames.dtype.name,
                "chunk_grid": {
                    "name": "regular",
                    "configuration": {
                        "chunk_shape": [1, 1, 1, *_frame_chunk((h, w), frames.dtype.itemsize)]
                    },
                },
                "codecs": _blosc_codecs(frames.dtype.itemsize),
                "fill_value": 0,
            },
            "create": True,
        }
    ).result()
    pending: list[Any] = []
    t0 = time.perf_counter()
    for i in range(n):
        f = arr[i, 0, 0].write(frames[i % len(frames)])
        f.copy.result()
        pending.append(f)
        if len(pending) >= in_flight:
            pending.pop(0).commit.result()
    for f in pending:
        f.commit.result()
    return n / (time.perf_counter() - t0)


def _bench_files(frames: np.ndarray, n: int, out: Path, in_flight: int) -> float:
    out.mkdir(parents=True)

    def write(i: int) -> None:
        p = out / f"{i}"
        tmp = out / f".{i}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(frames[i % len(frames)].tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(write, range(n)))
    return n / (time.perf_counter() - t0)


def bench_streaming(
    n_frames: int = 200,
    shape: tuple[int, int] = (2048, 2048),
    repeats: int = 3,
    in_flight: int = 8,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Run the three measurements ``repeats`` times, interleaved; medians and ratios."""
    frames = realistic_frames(shape)
    base = Path(tempfile.mkdtemp(prefix="scopestream-bench-", dir=workdir))
    results: dict[str, list[float]] = {"pipeline": [], "tensorstore": [], "file": []}
    runs = {"pipeline": _bench_pipeline, "tensorstore": _bench_tensorstore, "file": _bench_files}
    names = list(runs)
    try:
        for r in range(repeats):
            # rotate the order so no variant always follows another's writeback
            for name in names[r % 3 :] + names[: r % 3]:
                target = base / f"{name}-{r}"
                os.sync()  # start each measurement with no dirty pages of the last one
                results[name].append(runs[name](frames, n_frames, target, in_flight))
                shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    mb = frames[0].nbytes / 2**20
    return {
        "benchmark": "streaming",
        "frames": n_frames,
        "shape": list(shape),
        "dtype": frames.dtype.name,
        "repeats": repeats,
        "writes_in_flight": in_flight,
        "cpu_count": os.cpu_count(),
        "fps": {k: round(v, 2) for k, v in med.items()},
        "mb_per_s": {k: round(v * mb, 1) for k, v in med.items()},
        "all_fps": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "ratio_pipeline_vs_tensorstore": round(med["pipeline"] / med["tensorstore"], 3),
        "ratio_tensorstore_vs_file": round(med["tensorstore"] / med["file"], 3),
        "ratio_pipeline_vs_file": round(med["pipeline"] / med["file"], 3),
    }


class _NullSink:
    """Takes frames and drops them: measures acquisition, not storage."""

    frames_written = 0

    def write(self, data: np.ndarray, meta: Any) -> None:
        self.frames_written += 1

    def close(
        self, status: str = "complete", error: str | None = None, summary: Any = None
    ) -> None:
        pass


def _callback_cost(shape: tuple[int, int], n: int, adopt: bool) -> dict[str, float]:
    """Wall time of `RingBuffer.put` for fresh frames, copying or adopting them."""
    from scopestream.streaming.frame import make_meta
    from scopestream.streaming.ringbuffer import RingBuffer

    ring = RingBuffer.for_memory(shape, "uint16", budget_mb=256, adopt=adopt)
    src = np.random.default_rng(0).integers(0, 4096, (4, *shape), dtype=np.uint16)
    times = []
    for i in range(n):
        frame = src[i % 4].copy()  # a fresh array per frame, as the engines hand over
        t0 = time.perf_counter()
        ring.put(frame, make_meta(t=i))
        times.append(time.perf_counter() - t0)
    us = np.array(times) * 1e6
    p50, p99 = np.percentile(us, [50, 99])
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}


def bench_acquisition(
    shape: tuple[int, int] = (2048, 2048), frames: int = 300, repeats: int = 3
) -> dict[str, Any]:
    """Simulator frame rate and acquisition-callback cost, in one run.

    * ``renderer_fps``: the simulated microscope alone (noise, drift, and the
      re-renders of the moving sample over 15 s of simulated time);
    * ``sim_mda_fps``: the ``sim`` source driven by pymmcore-plus's MDA engine
      into the ring buffer (a null sink: no storage);
    * ``callback_us``: wall and thread-CPU time of the acquisition callback in
      that run, and the cost of copying vs adopting a frame.
    """
    from scopestream.acquisition.plan import AcquisitionPlan
    from scopestream.acquisition.sample import SimulatedMicroscope
    from scopestream.acquisition.sim import DEFAULT_SIM_CHANNEL, SimulatedSource
    from scopestream.streaming.runner import SinkSpec, StreamRunner

    render: list[float] = []
    mda: list[float] = []
    cb_wall: list[dict[str, float]] = []
    cb_cpu: list[dict[str, float]] = []
    for r in range(repeats):
        scope = SimulatedMicroscope(shape, seed=r)
        out = np.empty(shape, np.uint16)
        t0 = time.perf_counter()
        for i in range(frames):
            scope.snap(i * 0.05, "nuclei", 0.0, 10.0, out=out)
        render.append(frames / (time.perf_counter() - t0))

        plan = AcquisitionPlan.timelapse(frames, channels=(DEFAULT_SIM_CHANNEL,))
        src = SimulatedSource(shape, plan, seed=r)
        runner = StreamRunner(src, [SinkSpec("null", _NullSink(), records=True)], buffer_mb=512)
        s = runner.run()
        if s["status"] != "complete":
            raise RuntimeError(f"sim run failed: {s['error']}")
        mda.append(s["acquire_fps"])
        cb_wall.append(s["callback_us"])
        cb_cpu.append(s["callback_cpu_us"])
    med = statistics.median
    copy = _callback_cost(shape, 100, adopt=False)
    adopt = _callback_cost(shape, 100, adopt=True)
    return {
        "benchmark": "acquisition",
        "shape": list(shape),
        "frames": frames,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "renderer_fps": round(med(render), 1),
        "sim_mda_fps": round(med(mda), 1),
        "all": {
            "renderer_fps": [round(x, 1) for x in render],
            "sim_mda_fps": [round(x, 1) for x in mda],
        },
        "callback_us": {
            "wall_p50": med(c["p50"] for c in cb_wall),
            "wall_p99": med(c["p99"] for c in cb_wall),
            "cpu_p50": med(c["p50"] for c in cb_cpu),
            "cpu_p99": med(c["p99"] for c in cb_cpu),
        },
        "put_us": {"copy": copy, "adopt": adopt},
        "ratio_adopt_vs_copy_p50": round(adopt["p50"] / copy["p50"], 4),
    }


def _bench_package(kind: str, workdir: Path) -> Any:
    """The bundled model if there is one, else the same architecture with fresh weights."""
    from scopestream.inference.architectures import build, receptive_radius
    from scopestream.inference.manifest import Architecture, Manifest
    from scopestream.inference.package import PackageError, Registry, save_package
    from scopestream.inference.predictor import halo_for

    name = "denoise" if kind == "denoise_unet" else "stain"
    try:
        return Registry(workdir / "none").resolve(name)
    except PackageError:
        pass
    params: dict[str, Any] = {} if kind == "denoise_unet" else {"out_channels": 2}
    module = build(kind, params)  # type: ignore[arg-type]
    man = Manifest(
        name=name,
        task="denoise" if name == "denoise" else "stain",
        architecture=Architecture(kind=kind, params=params),  # type: ignore[arg-type]
        inputs=("*",) if name == "denoise" else ("raw",),
        outputs=("*",) if name == "denoise" else ("nuclei", "membrane"),
        size_multiple=module.size_multiple,
        halo=halo_for(receptive_radius(module), module.size_multiple),
    )
    return save_package(workdir / f"{name}-bench", module, man)


def _model_only(predictor: Any, frame: np.ndarray, n: int) -> float:
    predictor.predict(frame)  # warm up / compile
    t0 = time.perf_counter()
    for _ in range(n):
        predictor.predict(frame)
    return n / (time.perf_counter() - t0)


def _end_to_end(pkg: Any, backend: Any, frames: np.ndarray, n: int, out: Path) -> float:
    """In-memory camera → ring buffer → zarr (raw) + engine (every frame) → zarr (outputs)."""
    from scopestream.acquisition.replay import ArraySource
    from scopestream.inference.engine import InferenceEngine, output_names
    from scopestream.inference.predictor import Predictor
    from scopestream.streaming.ringbuffer import OverflowPolicy
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import ZarrSink

    channel = pkg.manifest.inputs[0] if pkg.manifest.inputs != ("*",) else "raw"
    src = ArraySource(frames, n, channel=channel)
    sink = ZarrSink(out, src.info)
    predictor = Predictor(pkg, backend)
    predictor.predict(frames[0].astype(np.float32))  # compiled before the clock starts
    writer = sink.add_output(
        pkg.name, channel_names=output_names(predictor, src.info.channel_names)
    )
    engine = InferenceEngine(predictor, writer, source_channels=src.info.channel_names)
    runner = StreamRunner(
        src,
        [SinkSpec("zarr", sink, records=True), SinkSpec("model", engine, OverflowPolicy.SPILL)],
        buffer_mb=512,
    )
    t0 = time.perf_counter()
    s = runner.run()
    dt = time.perf_counter() - t0
    if s["status"] != "complete" or engine.predicted != n:
        raise RuntimeError(f"end-to-end run failed: {s['error']}")
    return n / dt


def bench_inference(
    sizes: tuple[int, ...] = (512, 2048),
    backends: tuple[str, ...] | None = None,
    frames: dict[int, int] | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Mpx/s per backend × model × size, model-only and end-to-end, in one run.

    The reference is eager torch fp32 on the same machine; ``max_rel_diff`` is the
    largest difference to it relative to the output range.
    """
    import torch

    from scopestream.inference.backends import available_backends, make_backend
    from scopestream.inference.predictor import Predictor

    frames = frames or {512: 16, 2048: 3}
    base = Path(tempfile.mkdtemp(prefix="scopestream-bench-", dir=workdir))
    names = list(backends or available_backends())
    if "torch" in names and torch.cuda.is_available():
        names.append("torch-cpu")  # eager fp32 on the CPU is always measured
    results: list[dict[str, Any]] = []
    try:
        for kind in ("denoise_unet", "stain_unet"):
            pkg = _bench_package(kind, base)
            ref = make_backend(pkg, "torch-cpu")
            for size in sizes:
                n = frames.get(size, 2)
                stack = np.stack(
                    [realistic_frames((size, size), k=1, seed=i)[0] for i in range(min(n, 4))]
                )
                frame = stack[0].astype(np.float32)
                reference = Predictor(pkg, ref).predict(frame)
                for name in names:
                    be = make_backend(pkg, name)
                    predictor = Predictor(pkg, be)
                    out = predictor.predict(frame)
                    diff = float(np.abs(out - reference).max() / (np.ptp(reference) or 1.0))
                    fps_model = _model_only(predictor, frame, n)
                    fps_e2e = _end_to_end(
                        pkg, be, stack, n, base / f"{kind}-{size}-{name}.ome.zarr"
                    )
                    mpx = size * size / 1e6
                    results.append(
                        {
                            "model": pkg.name,
                            "size": size,
                            "backend": name,
                            **{k: v for k, v in be.describe().items() if k != "backend"},
                            "frames": n,
                            "model_fps": round(fps_model, 3),
                            "model_mpx_s": round(fps_model * mpx, 2),
                            "e2e_fps": round(fps_e2e, 3),
                            "e2e_mpx_s": round(fps_e2e * mpx, 2),
                            "max_rel_diff_vs_torch_fp32": float(f"{diff:.3g}"),
                        }
                    )
                    shutil.rmtree(base / f"{kind}-{size}-{name}.ome.zarr", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    speedups = []
    for r in results:
        if r["backend"] in ("torch", "torch-cpu") and r.get("device") == "cpu":
            cpu = [
                x
                for x in results
                if x["model"] == r["model"] and x["size"] == r["size"] and x.get("device") == "cpu"
            ]
            best = max(cpu, key=lambda x: x["e2e_mpx_s"])
            speedups.append(
                {
                    "model": r["model"],
                    "size": r["size"],
                    "best_cpu_backend": best["backend"],
                    "speedup": round(best["e2e_mpx_s"] / r["e2e_mpx_s"], 2),
                }
            )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "benchmark": "inference",
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "speedup_vs_eager_cpu": min((s["speedup"] for s in speedups), default=None),
        "speedups_vs_eager_cpu": speedups,
    }
