"""The ``scopestream`` command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scopestream import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.acquisition.base import FrameSource
    from scopestream.config import RunConfig
    from scopestream.streaming.runner import StreamRunner

app = typer.Typer(
    name="scopestream",
    help="Live AI for microscopes: stream, denoise/stain, record OME-Zarr, view.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks (JSON out, ratios against ceilings measured in the same run)."
)
app.add_typer(bench_app, name="bench")

err = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2


def _die(msg: str, code: int = EXIT_USAGE) -> typer.Exit:
    err.print(f"[bold red]error:[/] {msg}")
    return typer.Exit(code)


def _default_out(prefix: str = "run") -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{prefix}-{stamp}.ome.zarr")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scopestream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Live AI for microscopes."""


def _build_source(cfg: RunConfig) -> FrameSource:
    from scopestream.acquisition.base import SourceError
    from scopestream.acquisition.factory import make_source
    from scopestream.config import ConfigError, build_plan, resolve_hook

    try:
        hooks = {str(k): resolve_hook(v) for k, v in cfg.mm_hooks.items()}
        nuclei = None
        if cfg.sim_nuclei:
            import tifffile

            nuclei = tifffile.imread(cfg.sim_nuclei)
        return make_source(
            cfg.source,
            shape=cfg.shape,
            frames=cfg.frames,
            fps=cfg.fps,
            seed=cfg.seed,
            plan=build_plan(cfg),
            mm_dir=cfg.mm_dir,
            mm_save_dir=cfg.mm_save_dir,
            hooks=hooks,
            sim_nuclei=nuclei,
            sim_time_step_s=cfg.sim_time_step_s,
        )
    except (SourceError, ConfigError, ValueError, OSError) as e:
        raise _die(str(e)) from None


def _drive(
    runner: StreamRunner,
    show_progress: bool,
    label: str,
    live: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run with a progress bar on stderr; Ctrl-C stops cleanly (twice: abort).

    With ``live`` (the viewer's event loop) the window runs first; closing it
    leaves the run going, headless, to its end.
    """
    interrupts = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        err.print("[yellow]stopping: writing what is buffered (Ctrl-C again to abort)[/]")
        runner.stop()

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        if live is None:
            runner.start()
        else:
            live()  # the Qt event loop, until the window is closed
            if not runner.wait(0):
                err.print("[cyan]viewer closed; the run goes on until it ends[/]")
        total = runner.status.frames_expected
        with Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            TextColumn(
                "{task.completed}/{task.total} frames" if total else "{task.completed} frames"
            ),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not show_progress,
        ) as progress:
            task = progress.add_task(label, total=total, rate="")
            while not runner.wait(0.2):
                st = runner.status
                progress.update(
                    task, completed=st.frames_acquired, rate=f"{runner.acquired.fps():.1f} fps"
                )
    finally:
        signal.signal(signal.SIGINT, old)
    assert runner.summary is not None
    return runner.summary


def _print_summary(summary: dict[str, Any]) -> None:
    t = Table(title="run summary", show_header=False, title_justify="left")
    ok = summary["status"] == "complete"
    t.add_row("status", f"[{'green' if ok else 'red'}]{summary['status']}[/]")
    for key in (
        "frames_acquired",
        "frames_written",
        "frames_lost",
        "malformed",
        "fps",
        "elapsed_s",
    ):
        t.add_row(key, str(summary.get(key)))
    lat = summary.get("latency_ms", {})
    t.add_row("latency p50/p99 (ms)", f"{lat.get('p50')} / {lat.get('p99')}")
    cb = summary.get("callback_us", {})
    cpu = summary.get("callback_cpu_us", {})
    t.add_row(
        "callback p50/p99 (µs, wall | cpu)",
        f"{cb.get('p50')} / {cb.get('p99')} | {cpu.get('p50')} / {cpu.get('p99')}",
    )
    for name, n in summary.get("frames_skipped", {}).items():
        t.add_row(f"skipped ({name})", str(n))
    if summary.get("out"):
        t.add_row("out", str(summary["out"]))
    if summary.get("error"):
        t.add_row("error", f"[red]{summary['error']}[/]")
    err.print(t)


def _finish(summary: dict[str, Any], as_json: bool) -> None:
    _print_summary(summary)
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
    if summary["status"] != "complete":
        raise typer.Exit(EXIT_FAILED)


def _build_models(cfg: RunConfig, source: FrameSource) -> list[Any]:
    """Load, check and prepare every model before anything is written."""
    from scopestream.inference.backends import BackendError, make_backend
    from scopestream.inference.engine import ModelChannelError, check_channels
    from scopestream.inference.package import PackageError, Registry
    from scopestream.inference.predictor import Predictor, tile_from_string

    registry = Registry(cfg.registry)
    out = []
    for spec in cfg.models:
        try:
            pkg = registry.resolve(spec)
            tile = tile_from_string(cfg.tile, pkg.manifest.n_spatial)
            predictor = Predictor(pkg, make_backend(pkg, cfg.backend), tile=tile)
            check_channels(predictor, source.info.channel_names)
        except (PackageError, BackendError, ModelChannelError, ValueError) as e:
            raise _die(f"model {spec!r}: {e}") from None
        by_name = "@" not in spec and not Path(spec).exists()
        out.append((spec, registry, predictor, by_name))
    return out


def execute_run(
    cfg: RunConfig, *, as_json: bool, label: str = "acquiring", screenshot: Path | None = None
) -> None:
    """Run one configured stream to its end (shared by ``run`` and ``demo``)."""
    from scopestream.streaming.ringbuffer import OverflowPolicy
    from scopestream.streaming.runner import SinkSpec, StreamRunner
    from scopestream.streaming.zarr_sink import SinkError, ZarrSink

    if cfg.viewer:
        _check_display()
    elif screenshot is not None:
        raise _die("--screenshot needs --viewer")
    source = _build_source(cfg)
    try:
        models = _build_models(cfg, source)
    except typer.Exit:
        source.stop()
        source.wait(10)
        raise
    out = cfg.out or _default_out()
    try:
        sink = ZarrSink(
            out,
            source.info,
            config=cfg.model_dump(mode="json"),
            source=source.describe(),
            overwrite=cfg.overwrite,
        )
    except (FileExistsError, SinkError) as e:
        source.stop()
        source.wait(10)
        raise _die(str(e)) from None
    specs = [SinkSpec("zarr", sink, records=True)]
    engines = {}
    watchers = []
    policy = OverflowPolicy.LATEST if cfg.model_policy == "latest" else OverflowPolicy.SPILL
    makers = {}
    for spec, registry, predictor, by_name in models:
        engine, watcher, make = _attach_model(
            cfg, sink, source, spec, registry, predictor, by_name
        )
        specs.append(SinkSpec(f"model:{engine.writer.name}", engine, policy))
        engines[f"model:{engine.writer.name}"] = engine
        makers[f"model:{engine.writer.name}"] = (registry, predictor.manifest.name, make)
        if watcher is not None:
            watchers.append(watcher)
    frames = None
    if cfg.viewer:
        from scopestream.viewer.frames import LatestFrames

        frames = LatestFrames(source.info)
        specs.append(SinkSpec("viewer", frames, OverflowPolicy.LATEST))
        for eng in engines.values():
            eng.on_prediction = _display_hook(frames, eng)
    if cfg.sim_truth:
        from scopestream.acquisition.sim import SimulatedSource, TruthSink

        if not isinstance(source, SimulatedSource):
            raise _die("--sim-truth needs --source sim (only the simulator knows the truth)")
        truth = sink.add_output(
            "truth",
            channel_names=source.info.channel_names,
            provenance={"kind": "ground truth", "source": "simulator", "seed": source.seed},
        )
        specs.append(SinkSpec("truth", TruthSink(source, truth), OverflowPolicy.SPILL))
    runner = StreamRunner(source, specs, buffer_mb=cfg.buffer_mb, max_frames=cfg.frames, out=out)
    for w in watchers:
        w.start()
    live_state: dict[str, Any] = {}
    loop = None
    if frames is not None:

        def loop() -> None:
            viewer = _open_live_viewer(runner, frames, engines, makers, cfg, out, screenshot)
            viewer.run(start=runner.start)  # the run starts once the window is up
            live_state["described"] = viewer.describe()

    try:
        summary = _drive(runner, show_progress=err.is_terminal, label=label, live=loop)
    finally:
        for w in watchers:
            w.stop()
    summary["models"] = _models_summary(engines)
    if "described" in live_state:
        summary["viewer"] = live_state["described"]
    _finish(summary, as_json)


def _models_summary(engines: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "predicted": e.predicted,
            "versions": [
                {
                    k: v.get(k)
                    for k in ("model", "version", "sha256", "backend", "device", "from_seq")
                }
                for v in e.versions
            ],
            "notes": e.predictor.notes,
        }
        for name, e in engines.items()
    }


def _check_display() -> None:
    """The viewer needs Qt, napari and a display (or QT_QPA_PLATFORM=offscreen)."""
    import importlib.util

    missing = [m for m in ("napari", "qtpy") if importlib.util.find_spec(m) is None]
    if missing:
        raise _die("--viewer needs the viewer extra: pip install 'scopestream[viewer]'")
    offscreen = os.environ.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal")
    if not offscreen and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise _die(
            "--viewer needs a display: none is set (DISPLAY); run under xvfb-run, or set "
            "QT_QPA_PLATFORM=offscreen for screenshots only"
        )


def _display_hook(frames: Any, engine: Any) -> Callable[[np.ndarray, Any], None]:
    """Hand an engine's predictions to the display (newest only, no Qt)."""
    from scopestream.viewer.frames import output_kind

    kind = output_kind(engine.predictor.manifest.task)
    names = tuple(engine.writer.channel_names)
    wildcard = bool(engine.wildcard)
    image = engine.writer.name

    def hook(y: np.ndarray, meta: Any) -> None:
        frames.put_prediction(image, kind, names, wildcard, y, meta)

    return hook


def _open_live_viewer(
    runner: Any,
    frames: Any,
    engines: dict[str, Any],
    makers: dict[str, Any],
    cfg: RunConfig,
    out: str,
    screenshot: Path | None,
) -> Any:
    """The napari window on this run: layers, contrast from the models, the status widget."""
    import threading

    from scopestream.viewer.frames import layer_name, output_kind
    from scopestream.viewer.live import LiveViewer, RunControls

    info = runner.source.info
    limits: dict[str, tuple[float, float]] = {}
    for e in engines.values():
        m = e.predictor.manifest
        kind = output_kind(m.task)
        inorm, onorm = e.predictor.input_norm, e.predictor.output_norm
        if e.wildcard:
            continue  # constants of whatever it was trained on: estimated from the frames
        for ch in m.inputs:  # a model trained on this channel knows its range
            if ch in info.channel_names and inorm.source != "identity":
                limits.setdefault(
                    layer_name("raw", ch), (inorm.offset[0], inorm.offset[0] + inorm.scale[0])
                )
        for j, ch in enumerate(e.writer.channel_names):
            k = min(j, len(onorm.offset) - 1)
            if onorm.source != "identity":
                limits[layer_name(kind, ch)] = (onorm.offset[k], onorm.offset[k] + onorm.scale[k])

    def status() -> dict[str, Any]:
        return {**runner.live_summary(), "models": _models_summary(engines)}

    def versions() -> dict[str, list[int]]:
        return {
            name: [v for v, _ in reg.versions(model)]
            for name, (reg, model, make) in makers.items()
            if make is not None
        }

    def current() -> dict[str, int]:
        return {name: e.predictor.package.version for name, e in engines.items()}

    def swap(name: str, version: int) -> None:
        reg, model, make = makers[name]

        def load() -> None:
            try:
                engines[name].swap(make(reg.resolve(f"{model}@{version}")))
            except Exception as e:  # reported, never fatal to the run
                err.print(f"[red]model swap to {model}@{version} failed:[/] {e}")

        threading.Thread(target=load, name=f"swap-{model}", daemon=True).start()

    px = float(info.pixel_size_um)
    controls = RunControls(
        status=status,
        finished=lambda: runner.summary is not None,
        stop=runner.stop,
        pause=runner.set_paused,
        versions=versions,
        current=current,
        swap=swap,
        store=Path(out),
        scales=(float(info.z_step_um or 1.0), px, px),
    )
    live = LiveViewer(
        frames, controls, limits=limits, title=f"scopestream — {out}", screenshot=screenshot
    )
    planned: list[tuple[str, str, str, str | None]] = [
        (layer_name("raw", ch), "raw", ch, None) for ch in info.channel_names
    ]
    for e in engines.values():
        m = e.predictor.manifest
        kind = output_kind(m.task)
        names = e.writer.channel_names
        if e.wildcard:  # one output per source channel the model takes
            names = [ch for ch in info.channel_names if m.accepts(ch)]
        planned += [(layer_name(kind, ch), kind, ch, e.writer.name) for ch in names]
    live.prepare(planned)
    return live


def _attach_model(
    cfg: RunConfig,
    sink: Any,
    source: FrameSource,
    spec: str,
    registry: Any,
    predictor: Any,
    by_name: bool,
) -> tuple[Any, Any, Any]:
    """An output image, an engine, a registry watcher (by name) and a predictor factory."""
    from scopestream.inference.backends import make_backend
    from scopestream.inference.engine import InferenceEngine, output_names
    from scopestream.inference.predictor import Predictor
    from scopestream.inference.watcher import RegistryWatcher

    info = source.info
    name = predictor.manifest.name
    while name in sink.outputs:
        name += "_"
    writer = sink.add_output(
        name,
        channel_names=output_names(predictor, info.channel_names),
        dtype="float32",
        provenance=predictor.describe(),
    )
    engine = InferenceEngine(
        predictor,
        writer,
        source_channels=info.channel_names,
        n_z=info.n_z,
        calibrate=cfg.calibrate,
    )
    watcher = None

    def make(pkg: Any) -> Predictor:
        p = Predictor(pkg, make_backend(pkg, cfg.backend), tile=predictor.tile)
        shape = tuple(info.frame_shape)
        if pkg.manifest.n_spatial == 2:
            p.predict(
                np.zeros(shape, np.float32)
                if pkg.manifest.window == 1
                else np.zeros((pkg.manifest.window, *shape), np.float32)
            )
        return p  # compiled and warm before it takes over

    if by_name and cfg.watch_registry:

        def announced(identity: dict[str, Any]) -> None:
            err.print(
                f"[cyan]model swap:[/] {identity['model']} v{identity['version']} takes over"
            )

        watcher = RegistryWatcher(registry, spec, engine, make, on_swap=announced)
    return engine, watcher, (make if by_name else None)


def _config_from(config: Path | None, overrides: dict[str, Any]) -> RunConfig:
    from scopestream.config import ConfigError, RunConfig, load_config, merge

    try:
        base = load_config(config) if config else RunConfig()
        return merge(base, overrides)
    except ConfigError as e:
        raise _die(str(e)) from None


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML run configuration.")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="sim | mmcore:demo | pycromanager[:demo|:sim|:CFG] | replay:PATH | tcp://…"
        ),
    ] = None,
    frames: Annotated[int | None, typer.Option(help="Stop after N frames.")] = None,
    shape: Annotated[
        str | None, typer.Option(help="Frame size of the simulated camera, HxW.")
    ] = None,
    fps: Annotated[
        float | None, typer.Option(help="Frame rate (0 = as fast as possible).")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Model name or path; 'none' = raw only.")
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Output OME-Zarr (default runs/run-DATE.ome.zarr).")
    ] = None,
    overwrite: Annotated[
        bool | None, typer.Option("--overwrite", help="Replace an existing output store.")
    ] = None,
    viewer: Annotated[
        bool | None, typer.Option("--viewer/--no-viewer", help="Open the live viewer.")
    ] = None,
    screenshot: Annotated[
        Path | None,
        typer.Option(help="With --viewer: save the window's canvas here at the end, then close."),
    ] = None,
    buffer_mb: Annotated[float | None, typer.Option(help="Ring buffer memory (MiB).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the simulated sample.")] = None,
    channels: Annotated[
        str | None, typer.Option(help="Plan channels, e.g. 'brightfield:5,nuclei:20' (ms).")
    ] = None,
    z_planes: Annotated[int | None, typer.Option(help="Planes per z-stack.")] = None,
    z_step: Annotated[float | None, typer.Option(help="Z step (µm).")] = None,
    interval: Annotated[float | None, typer.Option(help="Time-lapse interval (s).")] = None,
    time_points: Annotated[int | None, typer.Option(help="Time points of the plan.")] = None,
    mda: Annotated[
        str | None, typer.Option(help="A useq-schema MDASequence YAML as the plan.")
    ] = None,
    mm_dir: Annotated[
        str | None, typer.Option(help="Micro-Manager folder with the device adapters.")
    ] = None,
    mm_save_dir: Annotated[
        str | None, typer.Option(help="Let Micro-Manager also save its own copy (NDTiff) there.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto | tensorrt | torch | torch-cpu | onnxruntime")
    ] = None,
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    model_policy: Annotated[
        str | None,
        typer.Option(help="latest (live, newest frame) | all (every frame, catches up from disk)"),
    ] = None,
    tile: Annotated[
        str | None, typer.Option(help="Inference tile size HxW (default whole frame).")
    ] = None,
    calibrate: Annotated[
        int | None, typer.Option(help="Freeze input normalization from the first N frames.")
    ] = None,
    sim_time_step: Annotated[
        float | None, typer.Option(help="Simulated seconds between time points (sim only).")
    ] = None,
    sim_truth: Annotated[
        bool | None,
        typer.Option("--sim-truth", help="Also record the simulator's noise-free truth."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line last.")
    ] = False,
) -> None:
    """Stream frames from a source into an OME-Zarr run (and through models)."""
    plan = {
        k: v
        for k, v in {
            "channels": channels,
            "z_planes": z_planes,
            "z_step_um": z_step,
            "interval_s": interval,
            "time_points": time_points,
        }.items()
        if v is not None
    }
    cfg = _config_from(
        config,
        {
            "plan": plan or None,
            "mda": mda,
            "mm_dir": mm_dir,
            "mm_save_dir": mm_save_dir,
            "backend": backend,
            "registry": registry,
            "model_policy": model_policy,
            "tile": tile,
            "calibrate": calibrate,
            "sim_truth": sim_truth,
            "sim_time_step_s": sim_time_step,
            "source": source,
            "frames": frames,
            "shape": shape,
            "fps": fps,
            "models": model,
            "out": out,
            "overwrite": overwrite,
            "viewer": viewer,
            "buffer_mb": buffer_mb,
            "seed": seed,
        },
    )
    execute_run(cfg, as_json=as_json, screenshot=screenshot)


@app.command()
def demo(
    frames: Annotated[int, typer.Option(help="Frames to acquire.")] = 200,
    shape: Annotated[str, typer.Option(help="Frame size HxW.")] = "512x512",
    fps: Annotated[
        float, typer.Option(help="Camera frame rate (0 = as fast as possible).")
    ] = 50.0,
    out: Annotated[str | None, typer.Option(help="Output OME-Zarr.")] = None,
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    policy: Annotated[str, typer.Option(help="latest | all (model policy).")] = "latest",
    viewer: Annotated[
        bool, typer.Option("--viewer/--no-viewer", help="Open the live viewer.")
    ] = False,
    screenshot: Annotated[
        Path | None,
        typer.Option(help="With --viewer: save the window's canvas here at the end, then close."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line last.")
    ] = False,
) -> None:
    """The whole chain on the simulated microscope, ending with the run summary.

    Brightfield and low-light nuclei frames are recorded, denoised and virtually
    stained live by the bundled models (when a registry or the installation has
    them; otherwise the raw stream alone).
    """
    from scopestream.config import RunConfig
    from scopestream.inference.package import PackageError, Registry

    reg = Registry(registry)
    models = []
    for name in ("denoise", "stain"):
        try:
            reg.resolve(name)
            models.append(name)
        except PackageError:
            err.print(f"[yellow]no {name!r} model found; the demo runs without it[/]")
    cfg = RunConfig(
        source="sim",
        frames=frames,
        shape=shape,  # type: ignore[arg-type]
        fps=fps,
        out=out or _default_out("demo"),
        plan={"channels": "brightfield:5,nuclei:2"},  # type: ignore[arg-type]
        models=tuple(models),
        registry=registry,
        model_policy=policy,  # type: ignore[arg-type]
        viewer=viewer,
    )
    err.print(
        f"[bold]scopestream demo[/]: simulated microscope, {cfg.shape[0]}x{cfg.shape[1]} at "
        f"{fps:g} fps, {frames} frames, models {list(models) or 'none'} → {cfg.out}"
    )
    execute_run(cfg, as_json=as_json, label="demo", screenshot=screenshot)
    err.print(f"open it with: [bold]scopestream view {cfg.out}[/]")


@app.command()
def publish(
    source: Annotated[str, typer.Option(help="sim | replay:PATH")] = "sim",
    bind: Annotated[
        str, typer.Option(help="Address to bind (loopback unless told otherwise).")
    ] = "tcp://127.0.0.1:5557",
    frames: Annotated[int | None, typer.Option(help="Stop after N frames.")] = None,
    shape: Annotated[
        str, typer.Option(help="Frame size of the simulated camera, HxW.")
    ] = "512x512",
    fps: Annotated[
        float | None, typer.Option(help="Frame rate (0 = as fast as possible).")
    ] = None,
    receivers: Annotated[
        int, typer.Option(help="Receivers to send the end-of-stream marker to.")
    ] = 1,
    wait_s: Annotated[
        float, typer.Option(help="Wait this long for a receiver before starting.")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulated sample.")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line last.")
    ] = False,
) -> None:
    """Publish a source's frames over the scopestream ZMQ protocol (the microscope side)."""
    import zmq

    from scopestream.config import RunConfig
    from scopestream.streaming.protocol import FramePublisher, PublisherSink
    from scopestream.streaming.runner import SinkSpec, StreamRunner

    cfg = _config_from(
        None, {"source": source, "frames": frames, "shape": shape, "fps": fps, "seed": seed}
    )
    assert isinstance(cfg, RunConfig)
    src = _build_source(cfg)
    try:
        pub = FramePublisher(bind, stream=src.info.to_json())
    except zmq.ZMQError as e:
        raise _die(f"cannot bind {bind}: {e}") from None
    err.print(f"publishing {cfg.source} on [bold]{pub.address}[/]; waiting for a receiver…")
    if not pub.wait_for_receiver(wait_s):
        pub.close()
        raise _die(f"no receiver connected to {pub.address} within {wait_s:g} s", EXIT_FAILED)
    runner = StreamRunner(
        src,
        [SinkSpec("publish", PublisherSink(pub, receivers), records=True)],
        max_frames=cfg.frames,
        out=pub.address,
    )
    summary = _drive(runner, show_progress=err.is_terminal, label="publishing")
    _finish(summary, as_json)


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="Model name, name@version or package path.")],
    input: Annotated[str, typer.Option("--input", help="TIFF / OME-TIFF / OME-Zarr / NDTiff.")],
    output: Annotated[str, typer.Option(help="Output: .ome.zarr (default) or .tif")],
    tile: Annotated[str | None, typer.Option(help="Tile size HxW (default: whole frame).")] = None,
    backend: Annotated[
        str, typer.Option(help="auto | tensorrt | torch | torch-cpu | onnxruntime")
    ] = "auto",
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary last.")] = False,
) -> None:
    """Predict a saved image or run offline, plane by plane (never all in memory)."""
    from scopestream.acquisition.base import SourceError
    from scopestream.acquisition.replay import ReplaySource
    from scopestream.inference.offline import predict_file

    try:
        src = ReplaySource(input, fps=0)
    except SourceError as e:
        raise _die(str(e)) from None
    try:
        res = predict_file(
            src,
            model,
            output,
            tile=tile,
            backend=backend,
            registry=registry,
            overwrite=overwrite,
            progress=err if err.is_terminal else None,
        )
    except (ValueError, RuntimeError, FileExistsError, OSError) as e:
        raise _die(str(e)) from None
    err.print(
        f"[green]wrote[/] {res['output']}: {res['frames']} predictions "
        f"in {res['seconds']} s ({res['backend']})"
    )
    if as_json:
        typer.echo(json.dumps(res))


@app.command()
def train(
    task: Annotated[str, typer.Option(help="denoise | stain")],
    mode: Annotated[str, typer.Option(help="n2v | care | supervised | pix2pix")],
    out: Annotated[str, typer.Option(help="REGISTRY/NAME: the new version goes there.")],
    data: Annotated[
        list[str] | None, typer.Option("--data", help="OME-Zarr run(s); one field each.")
    ] = None,
    inputs: Annotated[str | None, typer.Option(help="TIFF file or folder of inputs.")] = None,
    targets: Annotated[
        str | None, typer.Option(help="TIFF file or folder of targets (same names).")
    ] = None,
    input_channel: Annotated[str | None, typer.Option(help="Input channel of the run.")] = None,
    target_channel: Annotated[
        list[str] | None,
        typer.Option("--target-channel", help="Target channel(s): [image:]channel."),
    ] = None,
    eval_target: Annotated[
        str | None, typer.Option(help="Evaluate against this instead (e.g. truth:nuclei).")
    ] = None,
    max_steps: Annotated[int, typer.Option(help="Training steps.")] = 1000,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs of 200 steps (instead of --max-steps).")
    ] = None,
    patch: Annotated[str, typer.Option(help="Patch size, e.g. 64x64 (square).")] = "64x64",
    spatial: Annotated[
        str, typer.Option(help="2d | 2.5d-z (a window of z-planes in) | 3d (sub-volumes).")
    ] = "2d",
    window: Annotated[int, typer.Option(help="z-planes per 2.5d window or 3d patch.")] = 5,
    init_from: Annotated[
        str | None, typer.Option(help="pix2pix: start the generator from this supervised model.")
    ] = None,
    gan_weight: Annotated[
        float, typer.Option(help="pix2pix: weight of the adversarial term.")
    ] = 0.05,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 4e-4,
    base: Annotated[int, typer.Option(help="Channels at the top of the U-Net.")] = 16,
    max_channels: Annotated[
        int | None, typer.Option(help="Cap on the channels of deeper levels.")
    ] = None,
    loss: Annotated[str, typer.Option(help="l1 | l2 (care).")] = "l2",
    ssim_weight: Annotated[
        float, typer.Option(help="Weight of an SSIM loss term (care/supervised).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    devices: Annotated[int, typer.Option(help="Devices (processes) for DDP.")] = 1,
    num_nodes: Annotated[int, typer.Option(help="Nodes for DDP.")] = 1,
    work_dir: Annotated[
        str | None, typer.Option(help="Checkpoints and logs (resume from here).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Resume from the last checkpoint.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON line last.")
    ] = False,
) -> None:
    """Train a model from saved runs or TIFF pairs, evaluate it, register the new version."""
    from scopestream.config import parse_shape
    from scopestream.training.data import DataError
    from scopestream.training.module import NaNLoss
    from scopestream.training.train import TrainConfig
    from scopestream.training.train import train as run_training

    try:
        ph, pw = parse_shape(patch)
    except ValueError as e:
        raise _die(str(e)) from None
    if ph != pw:
        raise _die("patches are square: use e.g. --patch 64x64")
    cfg = TrainConfig(
        task=task,
        mode=mode,
        out=out,
        data=list(data or []),
        inputs=inputs,
        targets=targets,
        input_channel=input_channel,
        target_channels=list(target_channel or []),
        eval_target=eval_target,
        patch=ph,
        spatial=spatial,
        window=window,
        init_from=init_from,
        gan_weight=gan_weight,
        batch=batch,
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        loss=loss,
        ssim_weight=ssim_weight,
        max_channels=max_channels,
        base=base,
        seed=seed,
        devices=devices,
        num_nodes=num_nodes,
        work_dir=work_dir,
        resume=resume,
    )
    if task not in ("denoise", "stain"):
        raise _die("--task must be denoise or stain")
    try:
        res = run_training(cfg, progress=err.is_terminal)
    except (DataError, ValueError) as e:
        raise _die(str(e)) from None
    except NaNLoss as e:
        raise _die(
            f"{e}: lower --lr, or check the data for NaNs/saturation", EXIT_FAILED
        ) from None
    if not res:  # a non-zero DDP rank
        return
    m, b = res["metrics"], res["baseline_metrics"]
    err.print(f"[green]{res['model']} v{res['version']}[/] → {res['package']}")
    if m:
        err.print(
            f"held-out: PSNR {m['psnr']} dB (input {b['psnr']}), SSIM {m['ssim']} ({b['ssim']}), "
            f"Pearson {m['pearson']} ({b['pearson']}); {res['steps']} steps in {res['seconds']} s"
        )
    else:
        err.print("no evaluation target: give --eval-target (e.g. truth:nuclei) for metrics")
    if as_json:
        typer.echo(json.dumps(res))


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="Model name, name@version or package path.")],
    data: Annotated[list[str] | None, typer.Option("--data", help="OME-Zarr run(s).")] = None,
    inputs: Annotated[str | None, typer.Option(help="TIFF file or folder of inputs.")] = None,
    targets: Annotated[str | None, typer.Option(help="TIFF file or folder of targets.")] = None,
    input_channel: Annotated[str | None, typer.Option(help="Input channel of the run.")] = None,
    target_channel: Annotated[
        str | None, typer.Option(help="Target: [image:]channel, e.g. truth:nuclei.")
    ] = None,
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    backend: Annotated[str, typer.Option(help="Backend.")] = "auto",
    report: Annotated[
        str | None, typer.Option(help="Write report.json and report.png into this folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON last.")] = False,
) -> None:
    """Metrics of a model against targets, next to the untouched input's (whole frames)."""
    from scopestream.inference.package import PackageError, Registry
    from scopestream.training.data import DataError, Region, load_run, load_tiff_pairs
    from scopestream.training.train import evaluate as run_eval

    try:
        pkg = Registry(registry).resolve(model)
        if data:
            if not target_channel:
                raise DataError("--target-channel is needed with --data")
            fields = [load_run(p, input_channel, [target_channel]) for p in data]
        elif inputs and targets:
            fields = load_tiff_pairs(inputs, targets)
        else:
            raise DataError("give --data RUN --target-channel C, or --inputs A --targets B")
    except (PackageError, DataError) as e:
        raise _die(str(e)) from None
    regions = [Region(i, slice(0, f.shape[0]), slice(0, f.shape[1])) for i, f in enumerate(fields)]
    res = run_eval(pkg, fields, regions, backend=backend)
    png = res.pop("figure_png")
    if report:
        d = Path(report)
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.json").write_text(json.dumps(res, indent=1))
        if png:
            (d / "report.png").write_bytes(png)
    m, b = res["metrics"], res["baseline_metrics"]
    err.print(
        f"{pkg.name} v{pkg.version}: PSNR {m['psnr']} dB (input {b['psnr']}), SSIM {m['ssim']} "
        f"({b['ssim']}), Pearson {m['pearson']} ({b['pearson']}) over {len(res['images'])} images"
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": pkg.identity,
                    **{k: res[k] for k in ("metrics", "baseline_metrics")},
                    "images": len(res["images"]),
                }
            )
        )


@app.command()
def export(
    model: Annotated[str, typer.Option(help="Model name, name@version or package path.")],
    out: Annotated[Path, typer.Option(help="The zip to write, e.g. denoise.zip.")],
    fmt: Annotated[str, typer.Option("--format", help="bioimageio")] = "bioimageio",
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    author: Annotated[
        list[str] | None, typer.Option("--author", help="Author name(s) for the description.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing zip.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON last.")] = False,
) -> None:
    """Export a model as a BioImage Model Zoo package (spec 0.5, validated before writing)."""
    from scopestream.inference.package import PackageError, Registry

    if fmt != "bioimageio":
        raise _die(f"--format {fmt!r}: the only export format is bioimageio")
    if out.exists() and not overwrite:
        raise _die(f"{out} already exists; pass --overwrite to replace it")
    try:
        from scopestream.training.bioimageio import BioimageioError, export_bioimageio
    except ImportError as e:
        raise _die(
            f"export needs the train extra (pip install 'scopestream[train]'): {e}"
        ) from None
    try:
        pkg = Registry(registry).resolve(model)
        path = export_bioimageio(pkg, out, authors=author)
    except (PackageError, BioimageioError) as e:
        raise _die(str(e)) from None
    err.print(f"[green]{pkg.name} v{pkg.version}[/] → {path} (bioimage.io 0.5, validated)")
    if as_json:
        typer.echo(json.dumps({"model": pkg.identity, "out": str(path), "format": fmt}))


@app.command("import")
def import_model(
    source: Annotated[Path, typer.Argument(help="A bioimage.io zip, folder or rdf.yaml.")],
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    name: Annotated[str | None, typer.Option(help="Register under this name.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON last.")] = False,
) -> None:
    """Bring a bioimage.io model (ours, or another tool's ONNX/TorchScript) into the registry."""
    from scopestream.inference.package import PackageError, Registry

    try:
        from scopestream.training.bioimageio import (
            BioimageioError,
            import_bioimageio,
            summary_json,
        )
    except ImportError as e:
        raise _die(
            f"import needs the train extra (pip install 'scopestream[train]'): {e}"
        ) from None
    try:
        pkg, notes = import_bioimageio(source, Registry(registry), name)
    except (PackageError, BioimageioError) as e:
        raise _die(str(e)) from None
    err.print(f"[green]{pkg.name} v{pkg.version}[/] ← {source}: {pkg.path}")
    for n in notes:
        err.print(f"[yellow]note:[/] {n}")
    if as_json:
        typer.echo(summary_json(pkg, notes))


@app.command()
def view(
    path: Annotated[Path, typer.Argument(help="A run's OME-Zarr store (may still be written).")],
    screenshot: Annotated[
        Path | None, typer.Option(help="Save the canvas here once it is drawn, then close.")
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="While the run is written, grow the layers every second.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was shown as JSON.")] = False,
) -> None:
    """Open a saved run in napari: raw and every output, named and coloured, in µm and s."""
    _check_display()
    from scopestream.viewer.saved import view_run

    try:
        shown = view_run(path, screenshot=screenshot, follow=follow)
    except (OSError, ValueError, KeyError) as e:
        raise _die(f"cannot open {path} as a scopestream run: {e}") from None
    if as_json:
        typer.echo(json.dumps(shown))


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run's OME-Zarr store.")],
    out: Annotated[Path, typer.Option(help="report.html (self-contained) or report.png.")],
    frames: Annotated[int, typer.Option(help="Frames in the raw-vs-outputs panel.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
) -> None:
    """After a run: throughput and latency over time, skipped/lost frames, raw vs outputs."""
    from scopestream.report import ReportError, write_report

    try:
        res = write_report(path, out, n_frames=frames)
    except (ReportError, OSError, ValueError, KeyError) as e:
        raise _die(f"cannot report on {path}: {e}") from None
    err.print(f"[green]report[/] → {out}")
    for note in res.get("notes", []):
        err.print(f"[yellow]note:[/] {note}")
    if as_json:
        typer.echo(json.dumps(res))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A run's OME-Zarr store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report a saved run: status, and how many frames of each image are complete."""
    from scopestream.streaming.zarr_sink import inspect_run

    try:
        report = inspect_run(path)
    except (OSError, ValueError, KeyError) as e:
        raise _die(f"cannot open {path} as a scopestream run: {e}") from None
    if as_json:
        typer.echo(json.dumps(report.to_json()))
        return
    t = Table(title=str(path), show_header=True, title_justify="left")
    t.add_column("image")
    t.add_column("shape (t,c,z,y,x)")
    t.add_column("complete frames")
    t.add_column("status")
    for im in report.images:
        t.add_row(im.name, "×".join(map(str, im.shape)), str(im.frames_complete), im.status)
    Console().print(t)
    typer.echo(f"status: {report.status}; expected frames: {report.frames_expected}")
    if report.error:
        typer.echo(f"error: {report.error}")


@bench_app.command("streaming")
def bench_streaming_cmd(
    frames: Annotated[int, typer.Option(help="Frames per measurement.")] = 200,
    shape: Annotated[str, typer.Option(help="Frame size HxW.")] = "2048x2048",
    repeats: Annotated[int, typer.Option(help="Repeats (medians are reported).")] = 3,
    in_flight: Annotated[int, typer.Option(help="Chunk writes in flight.")] = 8,
    workdir: Annotated[
        str | None, typer.Option(help="Where to write (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Ring buffer + zarr sink throughput vs the tensorstore and plain-file ceilings."""
    from scopestream.bench import bench_streaming
    from scopestream.config import parse_shape

    try:
        hw = parse_shape(shape)
    except ValueError as e:
        raise _die(str(e)) from None
    res = bench_streaming(
        n_frames=frames, shape=hw, repeats=repeats, in_flight=in_flight, workdir=workdir
    )
    if not as_json:
        err.print(
            f"pipeline {res['fps']['pipeline']} fps, tensorstore {res['fps']['tensorstore']} fps, "
            f"files {res['fps']['file']} fps; "
            f"pipeline/tensorstore = {res['ratio_pipeline_vs_tensorstore']}"
        )
    typer.echo(json.dumps(res))


@bench_app.command("acquisition")
def bench_acquisition_cmd(
    frames: Annotated[int, typer.Option(help="Frames per measurement.")] = 300,
    shape: Annotated[str, typer.Option(help="Frame size HxW.")] = "2048x2048",
    repeats: Annotated[int, typer.Option(help="Repeats (medians are reported).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Simulator frames/s and the acquisition callback's cost (copy vs adopt)."""
    from scopestream.bench import bench_acquisition
    from scopestream.config import parse_shape

    try:
        hw = parse_shape(shape)
    except ValueError as e:
        raise _die(str(e)) from None
    res = bench_acquisition(shape=hw, frames=frames, repeats=repeats)
    if not as_json:
        cb = res["callback_us"]
        err.print(
            f"renderer {res['renderer_fps']} fps, sim through MDA {res['sim_mda_fps']} fps; "
            f"callback p50/p99 {cb['wall_p50']}/{cb['wall_p99']} µs wall, "
            f"{cb['cpu_p50']}/{cb['cpu_p99']} µs cpu"
        )
    typer.echo(json.dumps(res))


@bench_app.command("viewer")
def bench_viewer_cmd(
    frames: Annotated[int, typer.Option(help="Frames to stream.")] = 1000,
    shape: Annotated[str, typer.Option(help="Frame size HxW.")] = "1024x1024",
    fps: Annotated[float, typer.Option(help="Camera frame rate.")] = 100.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """The live display under a fast stream: updates/s (vs napari alone) and memory growth."""
    from scopestream.config import parse_shape
    from scopestream.viewer.bench import bench_viewer, ensure_display

    try:
        hw = parse_shape(shape)
        xvfb = ensure_display()
    except (ValueError, RuntimeError) as e:
        raise _die(str(e)) from None
    try:
        res = bench_viewer(n_frames=frames, shape=hw, fps=fps)
    finally:
        if xvfb is not None:
            xvfb.terminate()
    if not as_json:
        err.print(
            f"display {res['display_updates_per_s']} updates/s (napari alone "
            f"{res['napari_ceiling_updates_per_s']}), memory growth {res['rss_mb']['growth']} MB"
        )
    typer.echo(json.dumps(res))


@bench_app.command("inference")
def bench_inference_cmd(
    sizes: Annotated[str, typer.Option(help="Frame sizes, comma-separated.")] = "512,2048",
    backend: Annotated[
        list[str] | None,
        typer.Option("--backend", help="Backends to measure (default: all here)."),
    ] = None,
    workdir: Annotated[
        str | None, typer.Option(help="Where to write (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Mpx/s per backend, model and size (model-only and end-to-end), vs eager torch fp32."""
    from scopestream.bench import bench_inference

    try:
        size_list = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError:
        raise _die(f"--sizes must be integers, got {sizes!r}") from None
    res = bench_inference(
        sizes=size_list, backends=tuple(backend) if backend else None, workdir=workdir
    )
    if not as_json:
        for r in res["results"]:
            err.print(
                f"{r['model']:8} {r['size']:5} {r['backend']:12} "
                f"model {r['model_mpx_s']:8} Mpx/s  end-to-end {r['e2e_mpx_s']:8} Mpx/s  "
                f"Δ {r['max_rel_diff_vs_torch_fp32']}"
            )
        err.print(
            f"speedup of the best CPU backend over eager torch: {res['speedup_vs_eager_cpu']}"
        )
    typer.echo(json.dumps(res))


def main() -> None:
    """Entry point of the ``scopestream`` command."""
    app()
