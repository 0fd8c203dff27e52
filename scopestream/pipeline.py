"""`Pipeline`: the composition root — a run configuration → source, recording, models, display.

One object from configuration to summary, for the command line, a notebook,
napari, or the lab's own acquisition script::

    import scopestream as ss

    pipe = ss.Pipeline.from_config({"source": "sim", "frames": 200, "models": ["denoise"],
                                    "plan": {"channels": "nuclei:2"}, "out": "x.ome.zarr"})
    summary = pipe.run()                     # or: with pipe: ...; pipe.events.frameReady...

Attach to an acquisition you run yourself::

    with ss.Pipeline.from_config({"models": ["denoise"], "out": "y.ome.zarr"}) as pipe:
        with Acquisition(directory=None, image_process_fn=pipe.pycromanager_hook()) as acq:
            acq.acquire(events)              # pycromanager
    pipe.attach(core).wait()                 # or a CMMCorePlus whose MDA you run

`build` checks everything before anything is written: the source opens, every
model loads, is checked against the source's channels, compiled and warmed
with the live dtype and shape; only then is the run's store created. If any
of it fails, what was opened is released and `PipelineError` says why
(the command's exit code 2: bad input, nothing written).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from scopestream.config import ConfigError, RunConfig, load_config, validate_config
from scopestream.streaming.signals import (
    FrameEvent,
    ModelVersion,
    RunSignals,
    RunState,
    safe_emit,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from scopestream.inference.engine import InferenceEngine
    from scopestream.inference.package import ModelPackage, Registry
    from scopestream.inference.predictor import Predictor
    from scopestream.inference.watcher import RegistryWatcher
    from scopestream.streaming.protocol import FramePublisher
    from scopestream.streaming.runner import RunStatus, StreamRunner
    from scopestream.streaming.seams import FrameSource
    from scopestream.streaming.zarr_sink import ZarrSink
    from scopestream.viewer.frames import LatestFrames

__all__ = ["Pipeline", "PipelineError"]


class PipelineError(ValueError):
    """A pipeline that cannot be built as configured (nothing was written)."""


def default_out(prefix: str = "run") -> str:
    """``runs/<prefix>-DATE-TIME.ome.zarr``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{prefix}-{stamp}.ome.zarr")


@dataclass
class ModelStage:
    """One model of the run: its output image, engine and (by name) registry watcher."""

    spec: str
    image: str
    engine: InferenceEngine
    registry: Registry
    by_name: bool
    watcher: RegistryWatcher | None = None

    @property
    def stage(self) -> str:
        """The stage's name in the summary (``model:<image>``)."""
        return f"model:{self.image}"


class _ResolvedModel(NamedTuple):
    """A model of the config, found: its spec without channels, package and registry."""

    spec: str
    package: ModelPackage
    registry: Registry
    #: named by name (a registry watcher follows its newer versions)
    by_name: bool
    #: ``NAME:CH,...``: the channels it runs on, instead of those it was trained on
    channels: tuple[str, ...] | None


def _input_shape(predictor: Predictor, frame: tuple[int, int], n_z: int) -> tuple[int, ...]:
    m = predictor.manifest
    if m.spatial == "2d":
        return frame
    if m.spatial == "3d":
        return (n_z, *frame)
    return (m.window, *frame)


class Pipeline:
    """A run: source → ring buffer → recording, models and display (see the module docstring).

    Parameters
    ----------
    config
        The run configuration (`RunConfig`).
    publisher
        Publish frames over the network instead of recording them (``scopestream
        publish``): the publisher is then the run's lossless sink.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        publisher: FramePublisher | None = None,
        receivers: int = 1,
    ) -> None:
        self.config = config
        #: the run's signals (`RunSignals`): connect before `start`
        self.events = RunSignals()
        self.out: str | None = None
        self.source: FrameSource | None = None
        self.store: ZarrSink | None = None
        self.models: list[ModelStage] = []
        #: the live display's frames (with ``viewer: true``), for `scopestream.viewer`
        self.display: LatestFrames | None = None
        self.runner: StreamRunner | None = None
        self._publisher = publisher
        self._receivers = receivers
        self._owns_source = True
        self._started = False
        #: exceptions raised by listeners of the model signals (the stages go on)
        self.listener_errors: list[str] = []

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: RunConfig | Mapping[str, Any] | str | os.PathLike[str], **kw: Any
    ) -> Pipeline:
        """A pipeline from a `RunConfig`, a mapping of its fields, or a YAML file."""
        try:
            match config:
                case RunConfig():
                    cfg = config
                case str() | os.PathLike():
                    cfg = load_config(Path(config))
                case _:
                    cfg = validate_config(dict(config))
        except ConfigError as e:
            raise PipelineError(str(e)) from None
        return cls(cfg, **kw)

    def _make_source(self) -> FrameSource:
        from scopestream.acquisition.base import SourceError
        from scopestream.acquisition.factory import make_source
        from scopestream.config import build_plan, resolve_hook

        cfg = self.config
        try:
            uses_hooks = cfg.source.strip().lower().startswith("pycromanager")
            if cfg.mm_hooks and not uses_hooks:  # never import a module for nothing
                raise PipelineError(
                    f"mm_hooks apply to pycromanager sources only, not {cfg.source!r}"
                )
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
                sim_triggered_stage=cfg.sim_triggered_stage,
                remote={
                    "curve_server_key": cfg.curve_server_key,
                    "curve_secret": cfg.curve_secret,
                    "insecure": cfg.insecure,
                    "heartbeat_s": cfg.heartbeat_s,
                },
            )
        except (SourceError, ConfigError, ValueError, OSError) as e:
            raise PipelineError(str(e)) from None

    def _check(self, source_given: bool) -> None:
        cfg = self.config
        if cfg.sim_truth and (source_given or cfg.source.strip().lower() != "sim"):
            raise PipelineError(
                "--sim-truth needs --source sim (only the simulator knows the truth)"
            )

    def _resolve_models(self) -> list[_ResolvedModel]:
        from scopestream.inference.package import (
            PackageError,
            Registry,
            is_path_spec,
            split_model_spec,
        )

        registry = Registry(self.config.registry)
        out = []
        for given in self.config.models:
            spec, channels = split_model_spec(given)
            try:
                pkg = registry.resolve(spec)
            except PackageError as e:
                raise PipelineError(f"model {given!r}: {e}") from None
            by_name = "@" not in spec and not is_path_spec(spec)
            out.append(_ResolvedModel(spec, pkg, registry, by_name, channels))
        return out

    def _predictor(
        self, pkg: ModelPackage, source: FrameSource, channels: tuple[str, ...] | None
    ) -> Predictor:
        """Load, check, compile and warm one model for this source (before the run)."""
        from scopestream.inference.backends import make_backend
        from scopestream.inference.engine import check_channels
        from scopestream.inference.predictor import Predictor, tile_from_string

        info = source.info
        predictor = Predictor(
            pkg,
            make_backend(pkg, self.config.backend),
            tile=tile_from_string(self.config.tile, pkg.manifest.n_spatial),
            border=self.config.border,
        )
        check_channels(predictor, info.channel_names, channels=channels)
        shape = _input_shape(predictor, info.frame_shape, info.n_z)
        # compiled and warm before the first frame, with the live dtype and shape
        zeros = np.zeros(shape, np.dtype(info.dtype))
        if self.tta:  # every member's shape (8 members: square frames only)
            predictor.predict_tta(zeros, self.tta)
        else:
            predictor.predict(zeros)
        return predictor

    @property
    def tta(self) -> int:
        """Members of the flip ensemble each prediction is (0: none; ``uncertainty``)."""
        return {"none": 0, "tta": 2, "tta8": 8}[self.config.uncertainty]

    def build(self, source: FrameSource | None = None) -> Pipeline:
        """Open the source (or take ``source``), load and warm the models, create the store.

        Nothing is written until every check passed; on failure everything this
        opened is released and `PipelineError` raised.
        """
        if self.runner is not None:
            return self
        self._check(source is not None)
        resolved = self._resolve_models()
        self._owns_source = source is None
        src = source if source is not None else self._make_source()
        self.source = src
        try:
            predictors = []
            for r in resolved:
                try:
                    predictors.append(self._predictor(r.package, src, r.channels))
                except Exception as e:  # CUDA init, compile, channel errors: all bad input
                    raise PipelineError(f"model {r.spec!r}: {e}") from None
            self._assemble(src, resolved, predictors)
        except BaseException:
            self._release_source()
            raise
        return self

    def _release_source(self) -> None:
        src = self.source
        if src is not None and self._owns_source:
            src.stop()
            src.wait(10)

    def _assemble(
        self,
        src: FrameSource,
        resolved: list[_ResolvedModel],
        predictors: list[Predictor],
    ) -> None:
        from scopestream.streaming.ringbuffer import OverflowPolicy
        from scopestream.streaming.runner import SinkSpec, StreamRunner
        from scopestream.streaming.zarr_sink import SinkError, ZarrSink

        cfg = self.config
        specs: list[SinkSpec] = []
        if self._publisher is not None:
            from scopestream.streaming.protocol import PublisherSink

            self.out = self._publisher.address
            self._publisher.stream = src.info.to_json()  # in every header: receivers need it
            sink = PublisherSink(
                self._publisher, self._receivers, zero_copy=bool(src.hands_over_frames)
            )
            specs.append(SinkSpec("publish", sink, records=True))
        else:
            self.out = cfg.out or default_out()
            try:
                self.store = ZarrSink(
                    self.out,
                    src.info,
                    config=cfg.model_dump(mode="json"),
                    source=src.describe(),
                    overwrite=cfg.overwrite,
                )
            except (FileExistsError, SinkError, OSError, ValueError) as e:
                raise PipelineError(str(e)) from None
            specs.append(SinkSpec("zarr", self.store, records=True))
        if cfg.viewer:
            from scopestream.viewer.frames import LatestFrames

            self.display = LatestFrames(src.info)
        for r, predictor in zip(resolved, predictors, strict=True):
            model = self._attach_model(src, r, predictor)
            self.models.append(model)
            specs.append(SinkSpec(model.stage, model.engine))
        if self.display is not None:
            specs.append(SinkSpec("viewer", self.display, OverflowPolicy.LATEST))
        if cfg.sim_truth:
            from scopestream.acquisition.sim import SimulatedSource, TruthSink

            assert isinstance(src, SimulatedSource)
            assert self.store is not None
            truth = self.store.add_output(
                "truth",
                channel_names=src.info.channel_names,
                provenance={"kind": "ground truth", "source": "simulator", "seed": src.seed},
            )
            specs.append(SinkSpec("truth", TruthSink(src, truth), OverflowPolicy.SPILL))
        self.runner = StreamRunner(
            src, specs, buffer_mb=cfg.buffer_mb, max_frames=cfg.frames, out=self.out,
            events=self.events,
        )
        self.runner.summary_hooks.append(lambda: {"models": self.models_summary()})
        self.events.runFinished.connect(lambda _r: self._stop_watchers())

    def _attach_model(
        self,
        src: FrameSource,
        resolved: _ResolvedModel,
        predictor: Predictor,
    ) -> ModelStage:
        """An output image, an engine, and (for a model named by name) a registry watcher."""
        from scopestream.inference.engine import InferenceEngine, check_channels, output_names
        from scopestream.inference.watcher import RegistryWatcher
        from scopestream.viewer.frames import output_kind

        assert self.store is not None, "models need a recording"
        info = src.info
        name = predictor.manifest.name
        while name in self.store.outputs:
            name += "_"
        targets = check_channels(predictor, info.channel_names, channels=resolved.channels)
        writer = self.store.add_output(
            name,
            channel_names=output_names(predictor, info.channel_names, targets),
            dtype="float32",
            provenance=predictor.describe(),
        )
        spread = None
        if self.tta:  # the ensemble's spread beside the output, channel for channel
            spread_name = f"{name}_spread"
            while spread_name in self.store.outputs:
                spread_name += "_"
            spread = self.store.add_output(
                spread_name,
                channel_names=tuple(writer.channel_names),
                dtype="float32",
                provenance={
                    **predictor.describe(),
                    "kind": "uncertainty",
                    "of": name,
                    "method": "tta",
                    "members": self.tta,
                },
            )
        engine = InferenceEngine(
            predictor,
            writer,
            source_channels=info.channel_names,
            n_z=info.n_z,
            calibrate=self.config.calibrate,
            policy="latest" if self.config.model_policy == "latest" else "every",
            channels=resolved.channels,
            pixel_size_um=info.pixel_size_um,
            tta=self.tta,
            spread_writer=spread,
        )
        events = self.events
        errs = self.listener_errors
        display = self.display
        kind = output_kind(predictor.manifest.task)
        names = tuple(writer.channel_names)

        def on_prediction(y: np.ndarray, meta: Any) -> None:
            if display is not None:  # a model of any input: the output of this frame's channel
                frame_names = (names[engine.out_channel[meta["c"]]],) if engine.wildcard else names
                display.put_prediction(name, kind, frame_names, y, meta)
            safe_emit(events.predictionReady, name, FrameEvent.of(meta), errors=errs)

        engine.on_prediction = on_prediction

        def version_of(identity: Mapping[str, Any]) -> ModelVersion:
            return ModelVersion(
                str(identity.get("model", "")),
                int(identity.get("version", 0) or 0),
                str(identity.get("sha256", "")),
                str(identity.get("backend", "")),
            )

        engine.on_domain_shift = lambda w: safe_emit(
            events.domainShift, name, w.kind, w.p, w.channel, w.message, errors=errs
        )
        engine.on_swapped = lambda ident: safe_emit(
            events.modelSwapped, name, version_of(ident), errors=errs
        )
        engine.on_swap_refused = lambda ident, why: safe_emit(
            events.swapRefused, name, version_of(ident), why, errors=errs
        )
        spec, registry, by_name = resolved.spec, resolved.registry, resolved.by_name
        stage = ModelStage(spec, name, engine, registry, by_name)
        if by_name and self.config.watch_registry:
            stage.watcher = RegistryWatcher(
                registry,
                spec,
                engine,
                self.make_predictor,
                on_refused=lambda ident, why: safe_emit(
                    events.swapRefused, name, version_of(ident), why, errors=errs
                ),
            )
        return stage

    def make_predictor(self, pkg: ModelPackage, tile: tuple[int, ...] | None = None) -> Predictor:
        """A predictor for a new version (loaded and compiled here; warmed on the inference
        thread when it takes over, with the live frame's dtype and shape)."""
        from scopestream.inference.backends import make_backend
        from scopestream.inference.predictor import Predictor, tile_from_string

        if tile is None:
            tile = tile_from_string(self.config.tile, pkg.manifest.n_spatial)
        return Predictor(
            pkg, make_backend(pkg, self.config.backend), tile=tile, border=self.config.border
        )

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        """Build if needed, then start the stages, the watchers and the source."""
        self.build()
        assert self.runner is not None
        if self._started:
            return
        self._started = True
        for m in self.models:
            if m.watcher is not None:
                m.watcher.start()
        self.runner.start()

    def stop(self) -> None:
        """Stop acquiring; everything acquired is still written (the run is ``stopped``)."""
        if self.runner is not None:
            self.runner.stop()
        elif self.source is not None:
            self._release_source()

    def close(self) -> None:
        """Release a pipeline that was built but will not run: the source, and the empty store."""
        if self._started:
            return
        self._release_source()
        if self.store is not None:
            import shutil

            path, lock = self.store.path, self.store.lock
            self.store = None
            if lock is not None:
                lock.release()
            shutil.rmtree(path, ignore_errors=True)  # created by this build, nothing written

    def abort(self, reason: str) -> None:
        """Record that the run was aborted (before the process exits without draining)."""
        if self.store is not None:
            self.store.mark(status="aborted", error=reason)

    def finish(self) -> None:
        """The user's own acquisition is over (attached runs): the run ends ``complete``."""
        from scopestream.acquisition.external import PushSource

        if isinstance(self.source, PushSource):
            self.source.finish()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run has ended (False on timeout)."""
        if self.runner is None or not self._started:
            return True
        return self.runner.wait(timeout)

    def run(self, timeout: float | None = None) -> dict[str, Any]:
        """Build, start, wait for the end (stopping after ``timeout`` s), return the summary."""
        self.start()
        if not self.wait(timeout):
            self.stop()
            self.wait()
        summary = self.summary
        assert summary is not None
        return summary

    def _stop_watchers(self) -> None:
        for m in self.models:
            if m.watcher is not None:
                m.watcher.stop()

    @property
    def status(self) -> RunStatus:
        """A frozen snapshot of the run's progress."""
        from scopestream.streaming.runner import RunStatus

        if self.runner is None:
            return RunStatus(RunState.IDLE, 0, None, 0.0)
        return self.runner.status

    @property
    def summary(self) -> dict[str, Any] | None:
        """The run summary (as ``--json`` prints it) once the run ended, with the models."""
        if self.runner is None or self.runner.summary is None:
            return None
        return self.runner.summary

    def live_summary(self) -> dict[str, Any]:
        """The summary's numbers now (the viewer's dock)."""
        if self.runner is None:
            return {"state": "idle"}
        return {**self.runner.live_summary(), "models": self.models_summary()}

    def models_summary(self) -> dict[str, Any]:
        """Per model: predictions, versions (and from which frame), notes, watcher reports."""
        out: dict[str, Any] = {}
        for m in self.models:
            e = m.engine
            out[m.stage] = {
                "predicted": e.predicted,
                "contract": e.contract.describe(),
                "incomplete_stacks": e.incomplete_stacks,
                "versions": [
                    {
                        k: v.get(k)
                        for k in ("model", "version", "sha256", "backend", "device", "from_seq")
                    }
                    for v in e.versions
                ],
                "swaps_refused": list(e.swaps_refused),
                "notes": e.predictor.notes,
                "domain_shift": e.guard.describe(),
            }
            if e.tta:
                out[m.stage]["uncertainty"] = e.describe_uncertainty()
            if m.watcher is not None:
                out[m.stage]["registry_watcher"] = m.watcher.describe()
        return out

    def __enter__(self) -> Pipeline:
        """The pipeline itself; inside the block call `start`, `attach` or `pycromanager_hook`."""
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._started:
            self.close()
            return
        if exc is not None:
            self.stop()
        else:
            self.finish()
        self.wait()

    # -- the user's own acquisition ------------------------------------------------------
    def _external_info(self, frame_shape: tuple[int, int], dtype: str, px: float) -> Any:
        from scopestream.acquisition.plan import PlanError
        from scopestream.config import build_plan

        try:
            plan = build_plan(self.config)
        except (ConfigError, PlanError) as e:
            raise PipelineError(str(e)) from None
        info = plan.stream_info(frame_shape, dtype, px)
        from dataclasses import replace

        # the user's acquisition decides how long it runs: open-ended unless told
        explicit = self.config.plan.time_points is not None or self.config.mda is not None
        return info if explicit else replace(info, n_t=None)

    def attach(self, core: Any, sequence: Any = None, *, sequences: int = 1) -> Pipeline:
        """Record and predict the MDAs run on ``core`` (a ``CMMCorePlus``) by someone else.

        ``sequence`` (a useq ``MDASequence``) tells the plan's extents; without it
        the configured plan's channels and z-planes are used, open-ended in time.
        The run ends after ``sequences`` sequences finished (complete) or one was
        cancelled (stopped).
        """
        from scopestream.acquisition.external import CoreListener
        from scopestream.acquisition.mmcore import pixel_dtype
        from scopestream.acquisition.plan import AcquisitionPlan, PlanError

        shape = (int(core.getImageHeight()), int(core.getImageWidth()))
        dtype = pixel_dtype(core.getBytesPerPixel())
        px = float(core.getPixelSizeUm() or 1.0)
        if sequence is not None:
            try:
                plan = AcquisitionPlan.from_mda_sequence(sequence)
            except PlanError as e:
                raise PipelineError(str(e)) from None
            info = plan.stream_info(shape, dtype, px)
        else:
            info = self._external_info(shape, dtype, px)
        src = CoreListener(core, info, sequences=sequences)
        self.build(src)
        self.start()
        return self

    def pycromanager_hook(
        self, core: Any = None, *, pass_through: bool | None = None
    ) -> Callable[[np.ndarray, dict[str, Any]], Any]:
        """An ``image_process_fn`` for your own ``pycromanager.Acquisition``.

        It only hands each frame to the ring buffer and returns ``None`` (or the
        image and metadata with ``pass_through=True``, so pycromanager saves its
        own copy too). The camera's shape and pixel type come from ``core``
        (default ``pycromanager.Core()``); channels and z-planes from the
        configured plan. Call `finish` (or leave the ``with`` block) when the
        acquisition is over.
        """
        from scopestream.acquisition.external import PycromanagerHook
        from scopestream.acquisition.mmcore import pixel_dtype

        if core is None:
            import pycromanager

            core = pycromanager.Core()
        shape = (int(core.get_image_height()), int(core.get_image_width()))
        dtype = pixel_dtype(core.get_bytes_per_pixel())
        px = float(core.get_pixel_size_um() or 1.0)
        info = self._external_info(shape, dtype, px)
        keep = bool(self.config.mm_save_dir) if pass_through is None else pass_through
        src = PycromanagerHook(info, pass_through=keep)
        self.build(src)
        self.start()
        return src.image_process_fn
