"""``scopestream bench inference``: Mpx/s per backend × model × size, vs eager torch fp32.

Model-only (``Predictor.predict`` in a loop) and end-to-end (in-memory camera →
ring buffer → zarr raw + engine on every frame → zarr outputs), for every
backend available here; the baseline, measured in the same run, is eager torch
fp32 on the CPU, and each backend's largest output difference to it is reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.bench.common import realistic_frames


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

    m = pkg.manifest
    trained = m.fingerprint.channels if m.fingerprint is not None else ()
    # the channel the model runs on: its named input, or the one a denoiser was trained on
    channel = m.inputs[0] if m.inputs != ("*",) else (trained[0] if trained else "raw")
    src = ArraySource(frames, n, channel=channel)
    sink = ZarrSink(out, src.info)
    predictor = Predictor(pkg, backend)
    predictor.predict(frames[0].astype(np.float32))  # compiled before the clock starts
    writer = sink.add_output(
        pkg.name, channel_names=output_names(predictor, src.info.channel_names)
    )
    engine = InferenceEngine(
        predictor, writer, source_channels=src.info.channel_names, policy="every"
    )
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

    Parameters
    ----------
    sizes
        Square frame sizes to measure.
    backends
        Backends to measure (default: every one available here).
    frames
        Frames per size (default: 16 at 512², 3 at 2048², else 2).
    workdir
        Where packages and stores go (default: the system's temp dir); removed at the end.

    Returns
    -------
    dict
        JSON-able: one result per model × size × backend, and the best CPU speedup.
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
