"""Re-processing an archive on dask.distributed: blocks of whole planes, resumable.

``scopestream predict --cluster local:N | tcp://SCHEDULER:8786`` predicts a
recording (OME-Zarr run of any layout, plates included, NDTiff, TIFF) with the
same engine as ``predict``, spread over the workers of a dask cluster:

- **Blocks** are planned on the client: one position × a run of time points ×
  every channel and z plane. The output holds one chunk per plane (split in y/x
  only for planes over 16 MiB, still inside the plane), so a block writes whole
  chunks no other block touches: no locks, no read-modify-write. A block reads a
  halo of ``window - 1`` earlier time points for a temporal model (its windows are
  whole, as in one pass), a stack model gets whole z-stacks, and the predictor
  tiles each plane exactly as ``predict`` does: the result is identical to it.
- **Futures over blocks** (``client.submit``, as cellpose's distributed
  segmentation), not ``dask.array.map_overlap``; the model is loaded once per worker
  by a worker plugin (`PredictorPlugin`); on a cluster whose workers declare a
  ``GPU`` resource each block takes one (``dask worker --resources GPU=1``).
- **Resumable**: a worker writes a marker per finished block (its frames'
  metadata and a pixel sample) after its chunks are on disk, under a key of the
  model's sha256 and every setting; a re-run with the same settings redoes only
  the blocks without one, a change of model or settings starts over
  (``--overwrite``). A block asked for twice (a worker died before the client
  heard of it) reuses its marker.
- The client counts what each worker did (frames, Mpx/s), the blocks retried
  after a worker died, and writes the provenance (model, settings, cluster) into
  the output, which is the same layout ``predict`` writes.

Input, output and model package must be reachable by the workers at the same
paths (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from distributed import WorkerPlugin

from scopestream.streaming.frame_index import FRAME_DTYPE, to_meta, to_record
from scopestream.streaming.zarr_sink import write_json_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from scopestream.acquisition.replay import ReplaySource
    from scopestream.inference.predictor import Predictor
    from scopestream.streaming.frame import FrameMeta

#: the folder of a re-processed output that records its blocks
BLOCKS_DIR = ".scopestream-blocks"
JOB_FILE = "job.json"
#: values of each frame's pixel sample a marker keeps (the omero windows come from them)
SAMPLE_VALUES = 1024


#: backends that run on the CPU threads they are given
CPU_BACKENDS = ("auto", "onnxruntime", "torch-cpu")


class ClusterError(RuntimeError):
    """The cluster cannot be reached or started, or the output cannot be resumed."""


@dataclass(frozen=True)
class Block:
    """Position ``p``, time points ``t0 .. t1 - 1``: every channel and plane of them."""

    p: int
    t0: int
    t1: int

    @property
    def key(self) -> str:
        """The block's name (its marker's)."""
        return f"p{self.p}-t{self.t0}-{self.t1}"


def plan_blocks(n_t: int, n_p: int, t_per_block: int) -> list[Block]:
    """Every position's time points in runs of ``t_per_block``, time-major (the order a
    run was acquired in, so a partial output holds whole early time points)."""
    step = max(1, t_per_block)
    return [Block(p, t0, min(t0 + step, n_t)) for t0 in range(0, n_t, step) for p in range(n_p)]


def default_t_per_block(planes_per_t: int, n_t: int, n_p: int, n_workers: int) -> int:
    """Time points per block: about 16 planes each, and at least 4 blocks per worker."""
    t = max(1, 16 // max(1, planes_per_t))
    while t > 1 and n_p * -(-n_t // t) < 4 * max(1, n_workers):
        t //= 2
    return t


@dataclass(frozen=True)
class Job:
    """What every block needs (small: pickled with each task)."""

    input: str
    axes: str | None
    groups: tuple[str, ...]  # the output image of each position
    markers: str
    attempts: str
    model_path: str
    backend: str
    tile: str | None
    border: str
    input_channel: str | None
    channels: tuple[str, ...] | None
    halo_t: int
    settings: str  # the settings' hash: the plugin's name
    threads: int | None  # CPU threads per worker (a local cluster's share of the cores)
    spread_gpus: bool = False  # a local cluster of one worker per GPU: worker k on GPU k


def settings_hash(settings: dict[str, Any]) -> str:
    """The key of a re-processing's settings (markers of another key are not reused)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class PredictorPlugin(WorkerPlugin):  # type: ignore[misc]
    """Loads the model once per worker and keeps the input and output arrays open.

    Registered with `distributed.Client.register_plugin`; a block finds it under
    ``get_worker().plugins[job.settings]``.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.name = job.settings
        self.predictor: Predictor | None = None
        self.source: ReplaySource | None = None
        self.arrays: dict[str, Any] = {}

    def setup(self, worker: Any = None) -> None:
        """Load the model (on the worker, once)."""
        from scopestream.inference.backends import make_backend
        from scopestream.inference.package import load_package
        from scopestream.inference.predictor import Predictor, tile_from_string

        job = self.job
        # a local cluster's workers share the cores (ONNX Runtime gives the same pixels
        # on any thread count; torch's CPU convolutions differ in the last bits)
        kw = {"threads": job.threads} if job.threads and job.backend in CPU_BACKENDS else {}
        if job.spread_gpus and str(getattr(worker, "name", "")).isdigit():
            import torch  # a local cluster's worker k takes GPU k (one worker per GPU)

            if torch.cuda.is_available() and torch.cuda.device_count() > 1:
                torch.cuda.set_device(int(worker.name) % torch.cuda.device_count())
        pkg = load_package(job.model_path)
        self.predictor = Predictor(
            pkg,
            make_backend(pkg, job.backend, **kw),
            tile=tile_from_string(job.tile, pkg.manifest.n_spatial),
            border=job.border,
        )

    def teardown(self, worker: Any = None) -> None:
        """Close the input's files."""
        if self.source is not None:
            self.source.finished()

    def open_source(self) -> ReplaySource:
        """The input, read frame by frame."""
        from scopestream.acquisition.replay import ReplaySource

        if self.source is None:
            self.source = ReplaySource(self.job.input, fps=0, axes=self.job.axes, preload=False)
        return self.source

    def array(self, p: int) -> Any:
        """Position ``p``'s output array (created by the client)."""
        import tensorstore as ts

        group = self.job.groups[p]
        if group not in self.arrays:
            self.arrays[group] = ts.open(
                {
                    "driver": "zarr3",
                    "kvstore": {"driver": "file", "path": str(Path(group) / "0")},
                    "open": True,
                    "store_data_equal_to_fill_value": True,  # a chunk for every plane
                }
            ).result()
        return self.arrays[group]


class BlockWriter:
    """The engine's writer in a block: planes at or after ``t0`` go to their chunks; the
    halo's predictions are dropped. Records each plane's metadata and a pixel sample."""

    def __init__(self, arr: Any, t0: int) -> None:
        self.arr = arr
        self.t0 = t0
        self.records: list[np.ndarray] = []
        self.samples: list[np.ndarray] = []
        self._futures: list[Any] = []

    def write(self, data: np.ndarray, meta: FrameMeta) -> None:
        """Start writing one predicted plane (its chunks are whole: nobody else writes them)."""
        if meta["t"] < self.t0:
            return
        plane = np.asarray(data, np.float32)
        self._futures.append(self.arr[meta["t"], meta["c"], meta["z"]].write(plane))
        h, w = plane.shape[-2:]
        step = max(1, int(np.sqrt(h * w / SAMPLE_VALUES)))
        self.samples.append(np.array(plane[::step, ::step], np.float32))
        self.records.append(to_record(meta))

    def update_attrs(self, **kw: Any) -> None:
        """The engine's attributes (domain shift, versions): the client writes its own."""

    def close(self, status: str = "complete", **kw: Any) -> None:
        """Wait until every plane is on disk."""
        for f in self._futures:
            f.result()


def _write_marker(path: Path, block: Block, result: dict[str, Any], writer: BlockWriter) -> None:
    """The block's marker, atomically: it exists only once every chunk is on disk."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    records = np.concatenate(writer.records) if writer.records else np.zeros(0, FRAME_DTYPE)
    samples = np.stack(writer.samples) if writer.samples else np.zeros((0, 1, 1), np.float32)
    with open(tmp, "wb") as f:
        np.savez(f, records=records, samples=samples, info=np.array(json.dumps(result)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(path: Path) -> tuple[dict[str, Any], list[FrameMeta], np.ndarray]:
    """A finished block: its summary, its planes' metadata and their pixel samples."""
    with np.load(path, allow_pickle=False) as z:
        info: dict[str, Any] = json.loads(str(z["info"]))
        records = z["records"]
        metas = [to_meta(r) for r in records]
        return info, metas, np.array(z["samples"])


def run_block(job: Job, block: Block) -> dict[str, Any]:
    """Predict one block on this worker; returns its summary (the marker's)."""
    import dask
    from distributed import get_worker

    from scopestream.inference.engine import InferenceEngine

    marker = Path(job.markers) / f"{block.key}.npz"
    if marker.exists():  # done before this task (asked again after a worker died)
        return {**read_marker(marker)[0], "reused": True}
    worker = get_worker()
    Path(job.attempts, f"{block.key}.{uuid.uuid4().hex}").touch()
    plugin = cast("PredictorPlugin", worker.plugins[job.settings])
    assert plugin.predictor is not None
    src = plugin.open_source()
    info = src.info
    writer = BlockWriter(plugin.array(block.p), block.t0)
    engine = InferenceEngine(
        plugin.predictor,
        writer,
        source_channels=info.channel_names,
        n_z=info.n_z,
        policy="every",
        input_channel=job.input_channel,
        channels=job.channels,
        pixel_size_um=info.pixel_size_um,
    )
    start = time.perf_counter()
    frames_in = 0
    # an NDTiff reads through a dask array: computed here, never sent back to the cluster
    with dask.config.set(scheduler="synchronous"):
        for frame, meta in src.frames_at(block.p, range(max(0, block.t0 - job.halo_t), block.t1)):
            engine.write(frame, meta)
            frames_in += 1
    engine.close("complete")
    seconds = time.perf_counter() - start
    h, w = info.frame_shape
    result = {
        "block": block.key,
        "worker": str(worker.address),
        "pid": os.getpid(),
        "frames_in": frames_in,
        "planes": len(writer.records),
        "megapixels": len(writer.records) * h * w / 1e6,
        "seconds": seconds,
        "backend": plugin.predictor.backend.describe(),
        "reused": False,
    }
    _write_marker(marker, block, result, writer)
    return result


def _start_cluster(spec: str, gpu: bool) -> tuple[Any, Any, dict[str, Any]]:
    """The client (and the local cluster it started) for ``local[:N]`` or an address."""
    import logging

    from distributed import Client, LocalCluster

    if spec == "local" or spec.startswith("local:"):
        n_text = spec.partition(":")[2]
        try:
            n = int(n_text) if n_text else None
        except ValueError:
            raise ClusterError(
                f"--cluster {spec}: give local, local:N or tcp://HOST:PORT"
            ) from None
        if n is not None and n < 1:
            raise ClusterError(f"--cluster {spec}: at least one worker")
        if n is None:
            n = max(1, gpu_count()) if gpu else max(1, (os.cpu_count() or 1))
        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
            resources={"GPU": 1} if gpu else None,
        )
        return Client(cluster), cluster, {"cluster": f"local:{n}", "workers": n}  # type: ignore[no-untyped-call]
    if "://" not in spec:
        raise ClusterError(f"--cluster {spec}: give local, local:N or tcp://HOST:PORT")
    try:
        client = Client(spec, timeout="20s")  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"cannot reach the dask scheduler at {spec}: {e}") from e
    n = len(client.scheduler_info().get("workers", {}))
    return client, None, {"cluster": spec, "workers": n}


@dataclass
class ClusterHandle:
    """A client of a dask cluster (and the local cluster it started, if any)."""

    client: Any
    local: Any
    where: dict[str, Any]

    def close(self) -> None:
        """Disconnect (and stop the local cluster)."""
        self.client.close()
        if self.local is not None:
            self.local.close()

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(spec: str, backend: str = "auto") -> ClusterHandle:
    """Start ``local[:N]`` (one worker per core, or per GPU for a GPU backend) or connect to
    a scheduler at ``tcp://HOST:PORT``."""
    return ClusterHandle(*_start_cluster(spec, _takes_gpu(backend)))


def gpu_count() -> int:
    """CUDA devices on this machine (0 without torch or a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _takes_gpu(backend: str) -> bool:
    if backend in ("torch-cpu", "onnxruntime"):
        return False
    return backend in ("tensorrt", "torch") or gpu_count() > 0


def reprocess(
    input: str,
    model: str,
    output: str,
    *,
    cluster: str | ClusterHandle = "local",
    axes: str | None = None,
    tile: str | None = None,
    backend: str = "auto",
    registry: str | None = None,
    overwrite: bool = False,
    input_channel: str | None = None,
    border: str = "zero",
    t_per_block: int | None = None,
    progress: Console | None = None,
) -> dict[str, Any]:
    """Predict ``input`` with ``model`` into ``output`` (OME-Zarr) on a dask cluster.

    The output is what `scopestream.inference.offline.predict_file` writes, pixel for
    pixel. An output this function left unfinished (with the same model and settings)
    is resumed: only blocks without a marker run. ``cluster``: ``local[:N]``, a
    scheduler's address, or a `ClusterHandle` (`connect`) shared by several calls.
    Returns the summary.
    """
    from scopestream.acquisition.replay import ReplaySource
    from scopestream.inference.backends import make_backend
    from scopestream.inference.offline import (
        PredictionFailed,
        open_prediction_output,
        resolve_channels,
    )
    from scopestream.inference.package import Registry, split_model_spec
    from scopestream.inference.predictor import Predictor, tile_from_string
    from scopestream.streaming.store_lock import StoreLock

    out = Path(output)
    if out.suffix.lower() in (".tif", ".tiff"):
        raise ValueError("--cluster writes OME-Zarr (chunk per plane): give an .ome.zarr --output")
    spec, channels = split_model_spec(model)
    pkg = Registry(registry).resolve(spec)
    # the client checks the channels with the CPU build of the model: workers load their own
    check = Predictor(
        pkg,
        make_backend(pkg, "torch-cpu"),
        tile=tile_from_string(tile, pkg.manifest.n_spatial),
        border=border,
    )
    src = ReplaySource(input, fps=0, axes=axes, preload=False)
    try:
        info = src.info
        input_channel, names, notes = resolve_channels(check, info, input_channel, channels)
        source_description = src.describe()
    finally:
        src.finished()
    n_t = info.n_t or 0
    m = pkg.manifest
    halo_t = m.window - 1 if m.spatial == "2.5d-t" else 0
    settings = {
        "model_sha256": pkg.sha256,
        "backend": backend,
        "tile": tile,
        "border": border,
        "input": str(Path(input).resolve()),
        "stream": info.to_json(),
        "input_channel": input_channel,
        "channels": list(channels) if channels else None,
        "t_per_block": t_per_block,
    }
    key = settings_hash(settings)
    blocks_dir = out / BLOCKS_DIR
    resume = False
    if (blocks_dir / JOB_FILE).exists() and not overwrite:
        old = json.loads((blocks_dir / JOB_FILE).read_text())
        if old.get("key") != key:
            changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
            raise FileExistsError(
                f"{out} is an unfinished re-processing with other settings ({', '.join(changed)} "
                "changed); pass --overwrite to start again"
            )
        resume = True
        t_per_block = int(old["t_per_block"])
    prov: dict[str, Any] = {
        "kind": "prediction",
        "offline": True,
        **check.describe(),
        "input": source_description,
    }
    handle = cluster if isinstance(cluster, ClusterHandle) else connect(cluster, backend)
    client, local, where = handle.client, handle.local, handle.where
    summary: dict[str, Any] = {}
    status = "failed"
    prov_final = prov
    try:
        workers = client.scheduler_info().get("workers", {})
        n_workers = max(1, len(workers))
        gpu_resource = any("GPU" in (w.get("resources") or {}) for w in workers.values())
        if t_per_block is None:
            t_per_block = default_t_per_block(len(names) * info.n_z, n_t, info.n_p, n_workers)
        blocks = plan_blocks(n_t, info.n_p, t_per_block)
        writer, sink = open_prediction_output(
            out, info, names, pkg.name, prov, overwrite=overwrite, resume=resume
        )
        lock = None
        if sink is None:  # a collection's sink holds the store's lock itself
            lock = StoreLock.acquire(out, create=True)
        try:
            markers = blocks_dir / key[:16]
            session = uuid.uuid4().hex[:12]
            attempts = markers / "attempts" / session
            attempts.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                blocks_dir / JOB_FILE,
                {
                    "key": key,
                    "settings": settings,
                    "t_per_block": t_per_block,
                    "blocks": len(blocks),
                },
            )
            groups = tuple(str(w.group) for w in sink.raws) if sink is not None else (str(out),)
            job = Job(
                input=str(Path(input).resolve()),
                axes=axes,
                groups=groups,
                markers=str(markers),
                attempts=str(attempts),
                model_path=str(pkg.path),
                backend=backend,
                tile=tile,
                border=border,
                input_channel=input_channel,
                channels=channels,
                halo_t=halo_t,
                settings=f"scopestream-{key[:16]}",
                threads=max(1, (os.cpu_count() or 1) // n_workers) if local else None,
                spread_gpus=local is not None and gpu_resource,
            )
            summary = _run_blocks(
                client, job, blocks, writer, progress, gpu_resource, f"{pkg.name} v{pkg.version}"
            )
            summary.update(where)
            status = "complete" if summary["blocks_failed"] == 0 else "failed"
            backends = summary.pop("backends")
            prov_final = {**prov, **(backends[0] if backends else {}), "cluster": where}
        finally:
            try:
                writer.close(status, prediction=prov_final, reprocess=summary)
                if sink is not None:
                    sink.update_run_attrs(prediction=prov_final, reprocess=summary)
                    sink.close(status)
            finally:
                if lock is not None:
                    lock.release()
    finally:
        if handle is not cluster:
            handle.close()
    summary.update(
        output=str(out), model=pkg.identity, notes=[*notes, *check.notes], status=status
    )
    if status != "complete":
        raise PredictionFailed(
            f"re-processing failed: {summary['blocks_failed']} of {summary['blocks']} blocks "
            f"failed (first: {summary.get('first_error')}); run it again to redo only those"
        )
    return summary


def _run_blocks(
    client: Any,
    job: Job,
    blocks: list[Block],
    writer: Any,
    progress: Console | None,
    gpu_resource: bool,
    title: str,
) -> dict[str, Any]:
    """Submit the blocks without a marker, adopt every finished block's planes."""
    from distributed import as_completed
    from rich.progress import Progress

    markers = Path(job.markers)
    done_before = 0
    for b in blocks:
        path = markers / f"{b.key}.npz"
        if path.exists():
            _, metas, samples = read_marker(path)
            for meta, sample in zip(metas, samples, strict=True):
                writer.adopt(meta, sample)
            done_before += 1
    todo = [b for b in blocks if not (markers / f"{b.key}.npz").exists()]
    client.register_plugin(PredictorPlugin(job), name=job.settings)
    start = time.perf_counter()
    per_worker: dict[str, dict[str, float]] = {}
    backends: list[dict[str, Any]] = []
    failed: list[str] = []
    reused = 0
    planes = 0
    megapixels = 0.0
    with Progress(console=progress, disable=progress is None, transient=True) as bar:
        task = bar.add_task(
            f"re-processing with {title}", total=len(blocks), completed=done_before
        )
        futures = [
            client.submit(
                run_block,
                job,
                b,
                key=f"scopestream-block-{job.settings}-{b.key}",
                pure=False,
                resources={"GPU": 1} if gpu_resource else None,
            )
            for b in todo
        ]
        by_key = {f.key: b for f, b in zip(futures, todo, strict=True)}
        for fut in as_completed(futures):  # type: ignore[no-untyped-call]
            block = by_key[fut.key]
            try:
                res = fut.result()
            except Exception as e:  # the block is left without a marker: a re-run redoes it
                failed.append(f"{block.key}: {type(e).__name__}: {e}")
                bar.advance(task)
                continue
            finally:
                fut.release()
            _, metas, samples = read_marker(markers / f"{block.key}.npz")
            for meta, sample in zip(metas, samples, strict=True):
                writer.adopt(meta, sample)
            planes += len(metas)
            megapixels += float(res["megapixels"])
            if res.get("reused"):
                reused += 1
            w = per_worker.setdefault(
                res["worker"], {"blocks": 0, "planes": 0, "megapixels": 0.0, "seconds": 0.0}
            )
            w["blocks"] += 1
            w["planes"] += int(res["planes"])
            w["megapixels"] += float(res["megapixels"])
            w["seconds"] += float(res["seconds"])
            if not backends:
                backends.append(dict(res["backend"]))
            bar.advance(task)
    seconds = time.perf_counter() - start
    attempts: dict[str, int] = {}
    for f in Path(job.attempts).iterdir():
        k = f.name.split(".", 1)[0]
        attempts[k] = attempts.get(k, 0) + 1
    retries = sum(n - 1 for n in attempts.values() if n > 1)
    with contextlib.suppress(OSError):
        for f in Path(job.attempts).iterdir():
            f.unlink()
        Path(job.attempts).rmdir()
    return {
        "blocks": len(blocks),
        "blocks_done_before": done_before,
        "blocks_run": len(todo) - len(failed) - reused,
        "blocks_reused": reused,
        "blocks_failed": len(failed),
        "first_error": failed[0] if failed else None,
        "retries": retries,
        "planes": planes,
        "seconds": round(seconds, 3),
        "mpx_per_s": round(megapixels / seconds, 3) if seconds > 0 else None,
        "per_worker": {
            a: {
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in w.items()},
                "mpx_per_s": round(w["megapixels"] / w["seconds"], 3) if w["seconds"] else None,
            }
            for a, w in sorted(per_worker.items())
        },
        "backends": backends,
        "job": asdict(job)["settings"],
    }
