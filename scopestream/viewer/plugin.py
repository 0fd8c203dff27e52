"""The napari plugin: a *scopestream* dock in any napari window.

Pick models (the registry's and the bundled ones), a backend and an output
folder, then either

* **Attach to Micro-Manager**: listen to the running pymmcore-plus core
  (``CMMCorePlus.instance()``, the one napari-micromanager, pymmcore-gui and
  pymmcore-widgets use). Every MDA started on it, from whichever widget, is one
  recording (``mda-001.ome.zarr``, ``mda-002.ome.zarr``, ... in the folder) with
  live predictions as layers of this window, next to the layers the MDA's own
  widgets show; or
* **Run simulator**: the simulated microscope, or a replay of a recording, when
  there is no microscope (``sim-001.ome.zarr``, ...).

The layers, their contrast, the run's status rows and its controls (pause,
stop, model versions, snapshot, open recording) are the live viewer's
(`scopestream.viewer.live`), driven here for this window instead of one of
its own. Pipelines are built off the GUI thread: an attached run is built on
the MDA's thread when its sequence starts (the MDA's first frame waits until
the models are warm, so no frame is lost), a simulated one on a worker
thread; only the layers and widgets are touched on the GUI thread.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from qtpy import QtCore, QtWidgets

from scopestream.config import RunConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import napari

    from scopestream.pipeline import Pipeline
    from scopestream.streaming.signals import RunResult
    from scopestream.viewer.live import LiveViewer

__all__ = ["ModelChoice", "PluginSession", "RunSettings", "ScopestreamWidget", "model_choices"]

#: the backends a run can ask for (the run configuration's own list)
BACKENDS: tuple[str, ...] = get_args(RunConfig.model_fields["backend"].annotation)


@dataclass(frozen=True)
class ModelChoice:
    """A model the dock offers: its name, newest version and where it comes from."""

    name: str
    version: int
    origin: str  # "registry" | "bundled"

    @property
    def label(self) -> str:
        """What the list shows."""
        return f"{self.name}  v{self.version} ({self.origin})"


def model_choices(registry: str | None = None) -> list[ModelChoice]:
    """The models of ``registry`` (default ``~/.scopestream/models``) and the bundled ones."""
    from scopestream.inference.package import BUNDLED, Registry

    reg = Registry(registry)
    out = []
    for name in reg.names():
        version, path = reg.versions(name)[-1]
        bundled = path.resolve().is_relative_to(BUNDLED)
        out.append(ModelChoice(name, version, "bundled" if bundled else "registry"))
    return out


def next_free(folder: Path, prefix: str) -> Path:
    """``folder/<prefix>-NNN.ome.zarr``, the first number not taken."""
    n = 1
    while (path := folder / f"{prefix}-{n:03d}.ome.zarr").exists():
        n += 1
    return path


@dataclass(frozen=True)
class RunSettings:
    """What the dock is set to when a run starts (read once, handed to the run's thread)."""

    models: tuple[str, ...]
    backend: str = "auto"
    every_frame: bool = False
    out_dir: Path = Path("runs")
    registry: str | None = None
    #: the channels models of any input (denoisers) run on, instead of those they were
    #: trained on (``--model NAME:CH,...``); empty: their own
    model_channels: tuple[str, ...] = ()

    def model_specs(self) -> list[str]:
        """The models as the run names them: a model of any input with `model_channels`."""
        if not self.model_channels:
            return list(self.models)
        from scopestream.inference.package import PackageError, Registry

        reg, out = Registry(self.registry), []
        for name in self.models:
            try:
                any_input = reg.resolve(name).manifest.inputs == ("*",)
            except PackageError:  # the run says why
                any_input = False
            out.append(f"{name}:{','.join(self.model_channels)}" if any_input else name)
        return out

    def config(self, out: Path, **fields: Any) -> dict[str, Any]:
        """The run configuration for one recording at ``out`` (plus ``fields``)."""
        return {
            "models": self.model_specs(),
            "backend": self.backend,
            "model_policy": "all" if self.every_frame else "latest",
            "registry": self.registry,
            "out": str(out),
            "viewer": True,
            **fields,
        }


def _connect_on_emitting_thread(signal: Any, slot: Callable[..., None]) -> None:
    """Connect so ``slot`` runs on the thread that emits (the MDA's), whatever the core's
    signal backend: psygnal calls it there; pymmcore-plus's Qt signals (a core made while
    a Qt app runs) would queue it to the GUI thread, which the build must not block."""
    import psygnal

    if isinstance(signal, psygnal.SignalInstance):
        signal.connect(slot)
    else:
        signal.connect(slot, QtCore.Qt.ConnectionType.DirectConnection)


class PluginSession:
    """What the dock runs, without Qt: the attachment to a core and the current pipeline.

    ``on_ready(pipe, started)`` is called (from the thread that built it) with each
    pipeline built; ``started`` is False for one the caller starts once its layers
    are up. ``say`` reports progress and errors. Both may be called from any thread.
    """

    def __init__(
        self, on_ready: Callable[[Pipeline, bool], None], say: Callable[[str], None]
    ) -> None:
        self._on_ready, self._say = on_ready, say
        self._lock = threading.Lock()
        self.core: Any = None
        self.settings: RunSettings | None = None
        self.pipe: Pipeline | None = None
        #: every pipeline this session built, oldest first
        self.runs: list[Pipeline] = []
        self._closed = False
        self._generation = 0  # bumped by stop(): a build that was under way is dropped
        #: a `run_source` build is under way
        self.building = False
        self._pending: Pipeline | None = None  # built by run_source, not started yet

    def _report(self, text: str) -> None:
        if not self._closed:
            self._say(text)

    # -- attached to Micro-Manager ----------------------------------------------------
    def attach(self, core: Any, settings: RunSettings) -> None:
        """Record every MDA run on ``core`` from now on (one recording each)."""
        self.detach()
        with self._lock:
            self.core, self.settings = core, settings
        _connect_on_emitting_thread(core.mda.events.sequenceStarted, self._on_sequence_started)
        self._report(f"attached to {core.getCameraDevice() or 'the core'}: waiting for an MDA")

    def update(self, settings: RunSettings) -> None:
        """Use ``settings`` for the next MDA."""
        with self._lock:
            self.settings = settings

    def detach(self) -> None:
        """Stop listening for new MDAs (a run in progress goes on)."""
        with self._lock:
            core, self.core = self.core, None
        if core is not None:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):  # not connected
                core.mda.events.sequenceStarted.disconnect(self._on_sequence_started)

    @property
    def attached(self) -> bool:
        """Whether MDAs on a core are being recorded."""
        return self.core is not None

    def _on_sequence_started(self, sequence: Any, *_: Any) -> None:
        """An MDA starts (on its own thread): build, attach and start its recording."""
        from scopestream.pipeline import Pipeline

        with self._lock:
            core, settings = self.core, self.settings
        if core is None or settings is None or self._closed:
            return
        self._stop_current()
        out = next_free(settings.out_dir, "mda")
        try:
            pipe = Pipeline.from_config(settings.config(out))
            self._watch(pipe)
            pipe.attach(core, sequence)
        except Exception as e:  # this MDA goes on unrecorded; the dock says why
            self._report(f"not recording this MDA: {e}")
            return
        self._adopt(pipe, started=True)

    # -- without a microscope ---------------------------------------------------------
    def run_source(self, source: str, settings: RunSettings, **fields: Any) -> threading.Thread:
        """Build a run of ``source`` (``sim`` or ``replay:PATH``) on a worker thread."""
        self._stop_current()
        generation = self._generation
        prefix = "sim" if source == "sim" else "replay"
        self.building = True

        def build() -> None:
            from scopestream.pipeline import Pipeline

            try:
                out = next_free(settings.out_dir, prefix)
                pipe = Pipeline.from_config(settings.config(out, source=source, **fields))
                self._watch(pipe)
                pipe.build()
            except Exception as e:
                self.building = False
                self._report(f"cannot run {source}: {e}")
                return
            self.building = False
            if generation != self._generation or self._closed:  # stopped meanwhile
                pipe.close()
                self._report(f"{source}: stopped before it started (nothing recorded)")
                return
            self._adopt(pipe, started=False)

        worker = threading.Thread(target=build, name="scopestream-plugin-build", daemon=True)
        worker.start()
        return worker

    # -- both --------------------------------------------------------------------------
    def _watch(self, pipe: Pipeline) -> None:
        def finished(result: RunResult) -> None:
            self._report(
                f"{result.status}: {result.frames_written} frames written, "
                f"{result.frames_lost} lost → {result.out}"
                + (f" ({result.error})" if result.error else "")
            )

        pipe.events.runFinished.connect(finished)

    def _adopt(self, pipe: Pipeline, *, started: bool) -> None:
        with self._lock:
            self.pipe = pipe
            self.runs.append(pipe)
            if not started:
                self._pending = pipe
        self._report(f"recording {pipe.out}" if started else f"ready: {pipe.out}")
        if not self._closed:
            self._on_ready(pipe, started)

    def is_pending(self, pipe: Pipeline) -> bool:
        """Whether ``pipe`` was built by `run_source` and waits for `start`."""
        with self._lock:
            return self._pending is pipe

    def start(self, pipe: Pipeline) -> bool:
        """Start a run `run_source` built (once its layers are up); False if it was
        stopped or replaced meanwhile."""
        with self._lock:
            ok = self._pending is pipe
            if ok:
                self._pending = None
        if ok:
            pipe.start()
            self._report(f"recording {pipe.out}")
        return ok

    def _stop_current(self) -> None:
        with self._lock:
            pipe, pending, self._pending = self.pipe, self._pending, None
        if pending is not None:
            pending.close()  # built, never started: its empty store is removed
            if pending is pipe:
                return
        if pipe is not None and pipe.summary is None:
            pipe.stop()

    def stop(self) -> None:
        """Stop the run in progress (what it acquired is written) and stop listening."""
        self._generation += 1
        self.detach()
        self._stop_current()

    def shutdown(self) -> None:
        """The dock is gone: stop everything and report nothing more."""
        self.stop()
        self._closed = True


class ScopestreamWidget(QtWidgets.QWidget):  # type: ignore[misc]
    """The *scopestream* dock widget (see the module docstring).

    Parameters
    ----------
    napari_viewer
        The window it is docked in (napari passes it).
    core
        The ``CMMCorePlus`` to attach to; default ``CMMCorePlus.instance()``.
    registry
        The model registry (default ``~/.scopestream/models``).
    """

    # Qt signals carry work to the GUI thread (queued when emitted from another thread) and
    # are disconnected when the dock is deleted. (qtpy does not re-export Signal for mypy.)
    _ready = QtCore.Signal(object, bool)  # type: ignore[attr-defined]  # (Pipeline, started)
    _said = QtCore.Signal(str)  # type: ignore[attr-defined]

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        *,
        core: Any = None,
        registry: str | None = None,
        parent: Any = None,
    ) -> None:
        super().__init__(parent)
        qw = QtWidgets
        self.viewer = napari_viewer
        self._core, self._registry = core, registry
        #: the live view of the newest run (its layers are in `viewer`)
        self.live: LiveViewer | None = None
        self.session = PluginSession(self._ready.emit, self._said.emit)
        self._ready.connect(self._show_run)
        self._said.connect(self._set_status)
        session = self.session
        self.destroyed.connect(lambda *_: session.shutdown())  # not self: it is being deleted

        layout = qw.QVBoxLayout(self)
        form = qw.QFormLayout()
        self.models = qw.QListWidget()
        choices = model_choices(registry)
        for choice in choices:
            item = qw.QListWidgetItem(choice.label)
            item.setData(QtCore.Qt.ItemDataRole.UserRole, choice.name)
            item.setFlags(item.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            checked = choice.name == "denoise"
            item.setCheckState(
                QtCore.Qt.CheckState.Checked if checked else QtCore.Qt.CheckState.Unchecked
            )
            self.models.addItem(item)
        self.models.setMaximumHeight(24 * max(3, min(8, len(choices))))
        form.addRow("models", self.models)
        self.backend = qw.QComboBox()
        self.backend.addItems(list(BACKENDS))
        form.addRow("backend", self.backend)
        self.model_channels = qw.QLineEdit()
        self.model_channels.setPlaceholderText("those they were trained on")
        self.model_channels.setToolTip(
            "channels a denoiser (a model of any input) runs on, e.g. DAPI,FITC; empty: "
            "only the channels it was trained on"
        )
        form.addRow("denoise channels", self.model_channels)
        self.every_frame = qw.QCheckBox("predict every frame (else the newest, live)")
        form.addRow("", self.every_frame)
        self.out_dir = qw.QLineEdit("runs")
        self.out_dir.setToolTip("folder for the recordings: mda-001.ome.zarr, sim-001.ome.zarr …")
        browse = qw.QPushButton("…")
        browse.clicked.connect(self._browse)
        row = qw.QHBoxLayout()
        row.addWidget(self.out_dir)
        row.addWidget(browse)
        form.addRow("output folder", row)
        layout.addLayout(form)
        # an attached session reads the settings when each MDA starts, on the MDA's thread
        self.models.itemChanged.connect(self._settings_changed)
        self.backend.currentTextChanged.connect(self._settings_changed)
        self.every_frame.toggled.connect(self._settings_changed)
        self.out_dir.editingFinished.connect(self._settings_changed)
        self.model_channels.editingFinished.connect(self._settings_changed)

        self.attach_btn = qw.QPushButton("Attach to Micro-Manager")
        self.attach_btn.setCheckable(True)
        self.attach_btn.toggled.connect(self._attach)
        layout.addWidget(self.attach_btn)

        sim = qw.QGroupBox("without a microscope")
        sform = qw.QFormLayout(sim)
        self.source = qw.QLineEdit("sim")
        self.source.setToolTip("sim (the simulated microscope) or a recording's path (replayed)")
        sform.addRow("source", self.source)
        self.channels = qw.QLineEdit("brightfield:5,nuclei:20")
        self.channels.setToolTip("the simulator's channels, name:exposure_ms")
        sform.addRow("channels", self.channels)
        self.frames = qw.QSpinBox()
        self.frames.setRange(1, 1_000_000)
        self.frames.setValue(200)
        sform.addRow("frames", self.frames)
        self.run_btn = qw.QPushButton("Run simulator")
        self.run_btn.clicked.connect(self._run_simulator)
        sform.addRow(self.run_btn)
        layout.addWidget(sim)

        self.stop_btn = qw.QPushButton("Stop")
        self.stop_btn.setToolTip("stop the run in progress (what it acquired is written), detach")
        self.stop_btn.clicked.connect(self.stop)
        layout.addWidget(self.stop_btn)
        self.status = qw.QLabel("idle")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.run_box = qw.QVBoxLayout()  # the live viewer's status rows and controls
        layout.addLayout(self.run_box)
        layout.addStretch(1)

    # -- settings ----------------------------------------------------------------------
    def selected_models(self) -> list[str]:
        """The checked models."""
        out = []
        for i in range(self.models.count()):
            item = self.models.item(i)
            if item.checkState() == QtCore.Qt.CheckState.Checked:
                out.append(str(item.data(QtCore.Qt.ItemDataRole.UserRole)))
        return out

    def set_models(self, names: list[str]) -> None:
        """Check exactly these models."""
        for i in range(self.models.count()):
            item = self.models.item(i)
            on = item.data(QtCore.Qt.ItemDataRole.UserRole) in names
            item.setCheckState(
                QtCore.Qt.CheckState.Checked if on else QtCore.Qt.CheckState.Unchecked
            )

    def settings(self) -> RunSettings:
        """What the dock is set to now."""
        return RunSettings(
            models=tuple(self.selected_models()),
            backend=self.backend.currentText(),
            every_frame=self.every_frame.isChecked(),
            out_dir=Path(self.out_dir.text().strip() or "runs").expanduser(),
            registry=self._registry,
            model_channels=tuple(
                c.strip() for c in self.model_channels.text().split(",") if c.strip()
            ),
        )

    def sim_fields(self) -> Mapping[str, Any]:
        """The run configuration's source fields for *Run simulator*."""
        text = self.source.text().strip() or "sim"
        if text != "sim":
            return {"source": f"replay:{text}", "frames": self.frames.value()}
        return {
            "source": "sim",
            "frames": self.frames.value(),
            "fps": 20.0,
            "shape": "256x256",
            "plan": {"channels": self.channels.text().strip() or "nuclei:10"},
        }

    def _settings_changed(self, *_: Any) -> None:
        if self.session.attached:
            self.session.update(self.settings())

    # -- actions -----------------------------------------------------------------------
    def _browse(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "output folder")
        if folder:
            self.out_dir.setText(folder)
            self._settings_changed()

    def _attach(self, on: bool) -> None:
        if not on:
            self.session.detach()
            self.attach_btn.setText("Attach to Micro-Manager")
            self._set_status("detached: MDAs are no longer recorded")
            return
        core = self._core
        if core is None:
            from pymmcore_plus import CMMCorePlus

            core = CMMCorePlus.instance()
        self.session.attach(core, self.settings())
        self.attach_btn.setText("Attached: every MDA is recorded (click to detach)")

    def _run_simulator(self) -> None:
        fields = dict(self.sim_fields())
        self.session.run_source(fields.pop("source"), self.settings(), **fields)
        self._set_status("building the run (loading and warming the models)")

    def stop(self) -> None:
        """Stop the run in progress and detach."""
        self.session.stop()
        with QtCore.QSignalBlocker(self.attach_btn):
            self.attach_btn.setChecked(False)
        self.attach_btn.setText("Attach to Micro-Manager")
        self._set_status("stopped")

    # -- on the GUI thread -------------------------------------------------------------
    def _set_status(self, text: str) -> None:
        self.status.setText(text)
        self.run_btn.setEnabled(not self.session.building)  # one build at a time

    def _show_run(self, pipe: Pipeline, started: bool) -> None:
        """A new run: its layers in this window, its status and controls in this dock."""
        from scopestream.viewer.live import open_live_viewer

        if not started and not self.session.is_pending(pipe):
            return  # stopped or replaced before its layers were up
        self._retire()
        try:
            live = open_live_viewer(pipe, on_swap_error=self._said.emit, viewer=self.viewer)
        except Exception as e:  # the run goes on (recorded), just not shown
            self._set_status(f"cannot show {pipe.out}: {e}")
        else:
            live.timer.setParent(self)  # ends with the dock
            self.run_box.addWidget(live.widget)
            self.live = live
        if not started:
            self.session.start(pipe)

    def _retire(self) -> None:
        live, self.live = self.live, None
        if live is not None:
            live.timer.stop()
            self.run_box.removeWidget(live.widget)
            live.widget.deleteLater()

    def close_runs(self) -> None:
        """Stop every run and listener of this dock (before its window closes)."""
        self.session.shutdown()
        self._retire()
