"""The napari window on a live run.

A main-thread ``QTimer`` (≤ 30 Hz) asks `LatestFrames` what changed and puts it
into persistent layers (``layer.data = ...``: the same layer, texture and
contrast, new pixels). The acquisition, inference and recording threads never
touch Qt; the only things they share with the GUI are `LatestFrames` (a lock
around a few references) and read-only status snapshots.

The dock widget shows the run's status from the same numbers as the run
summary (live while running, the summary itself once it ended) and the
controls: pause/resume, stop, side by side or overlaid, contrast, model
version (hot swap), snapshot, and opening the recording once the run ended.
In a run of several positions it also has the field selector (the field being
imaged, or one chosen; for a plate, a plate overview of well thumbnails): every
layer shows the same field, named on the canvas.
Closing the window never stops or damages the run: the command goes on
headless until the run ends.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.viewer.frames import Shown
from scopestream.viewer.style import colormap_for, estimate_limits
from scopestream.viewer.window import grid_shape, open_window, save_canvas

if TYPE_CHECKING:
    from collections.abc import Callable

    import napari

    from scopestream.pipeline import Pipeline
    from scopestream.viewer.frames import LatestFrames


@dataclass
class RunControls:
    """What the widget may ask of the run (all callables are thread-safe)."""

    status: Callable[[], dict[str, Any]]
    finished: Callable[[], bool]
    stop: Callable[[], None]
    pause: Callable[[bool], bool] | None = None  # returns whether it took effect
    versions: Callable[[], dict[str, list[int]]] = field(default=lambda: {})
    current: Callable[[], dict[str, int]] = field(default=lambda: {})
    swap: Callable[[str, int], None] | None = None
    store: Path | None = None
    scales: tuple[float, ...] = (1.0, 1.0)


#: the badge's look: dark text on amber, as a warning (never red: the run goes on)
BADGE_STYLE = "background-color: #ffb000; color: #1a1a1a; padding: 6px; font-weight: bold;"


def dock_screenshot_path(canvas: Path) -> Path:
    """Where ``--screenshot shot.png``'s dock is saved: ``shot.dock.png``."""
    return canvas.with_name(f"{canvas.stem}.dock{canvas.suffix or '.png'}")


def domain_badge(s: dict[str, Any]) -> str | None:
    """The badge text when a model sees data unlike its training data (None: all is well)."""
    lines = []
    for name, m in (s.get("models") or {}).items():
        for w in (m.get("domain_shift") or {}).get("warnings") or []:
            where = f"field {w['p']}, " if w.get("p", -1) >= 0 else ""
            lines.append(f"{name}: {where}{w['channel']}: {w['message']}")
    if not lines:
        return None
    more = f"\n… and {len(lines) - 4} more" if len(lines) > 4 else ""
    return "⚠ unlike the training data\n" + "\n".join(lines[:4]) + more


def format_status(s: dict[str, Any]) -> dict[str, str]:
    """The widget's rows, from a summary-shaped dict (live or final)."""
    src = s.get("source") or {}
    expected = s.get("frames_expected")
    lat = s.get("latency_ms") or {}
    cb = s.get("callback_us") or {}
    skipped = s.get("frames_skipped") or {}
    models = s.get("models") or {}
    rows = {
        "state": str(s.get("state") or s.get("status", "")),
        "source": f"{src.get('kind', '?')} ({src.get('engine', '')})".replace(" ()", ""),
        "progress": (
            f"{s.get('frames_acquired', 0)}/{expected}"
            if expected
            else str(s.get("frames_acquired", 0))
        ),
        "fps in / out": f"{s.get('acquire_fps', 0.0)} / {s.get('fps', 0.0)}",
        "latency p50 / p99 (ms)": f"{lat.get('p50', 0.0)} / {lat.get('p99', 0.0)}",
        "callback p50 / p99 (µs)": f"{cb.get('p50', 0.0)} / {cb.get('p99', 0.0)}",
        "written / lost": f"{s.get('frames_written', 0)} / {s.get('frames_lost', 0)}",
        "malformed": str(s.get("malformed", 0)),
        "skipped": ", ".join(f"{k} {v}" for k, v in skipped.items()) or "0",
    }
    for name, m in models.items():
        v = (m.get("versions") or [{}])[-1]
        rows[name] = (
            f"v{v.get('version', '?')} on {v.get('backend', '?')}/{v.get('device', '?')}, "
            f"{m.get('predicted', 0)} predicted"
        )
        watch = (m.get("registry_watcher") or {}).get("counters") or {}
        refused = len(m.get("swaps_refused") or []) + int(watch.get("refused", 0))
        if watch.get("errors") or refused:  # a registry that cannot be read, a bad version
            rows[f"{name} registry"] = f"{watch.get('errors', 0)} errors, {refused} refused"
        not_fed = m.get("incomplete_stacks", 0)
        if not_fed:
            rows[f"{name} not predicted"] = f"{not_fed} incomplete stacks/windows"
    if s.get("stopped"):
        rows["stopped"] = str(s["stopped"])
    if s.get("error"):
        rows["error"] = str(s["error"])
    return rows


class LiveViewer:
    """napari on a running stream (see the module docstring).

    With ``viewer`` it shows the run in that (existing) napari window, next to
    the layers already there, and leaves docking `widget` to the caller (the
    napari plugin puts it in its own dock); otherwise it opens its own window.
    """

    def __init__(
        self,
        frames: LatestFrames,
        controls: RunControls,
        *,
        limits: dict[str, tuple[float, float]] | None = None,
        title: str = "scopestream",
        hz: float = 30.0,
        screenshot: Path | None = None,
        show: bool = True,
        viewer: napari.Viewer | None = None,
    ) -> None:
        from qtpy.QtCore import QTimer

        self.frames, self.controls = frames, controls
        self.limits = dict(limits or {})
        self.screenshot_path = screenshot
        self.viewer = open_window(title, show=show) if viewer is None else viewer
        self.widget = StatusWidget(self)
        if viewer is None:
            self.viewer.window.add_dock_widget(self.widget, name="scopestream", area="right")
        self._seen: dict[str, tuple[int, int]] = {}
        self._thumbs_seen: dict[int, int] = {}
        self._field: int | None = None  # the field the layers show now
        self._auto_limits: set[str] = set()
        self.updates = 0  # timer ticks that put new pixels on screen
        self.ticks = 0
        self.tick_ms: deque[float] = deque(maxlen=4096)  # what each tick cost the GUI thread
        self.final: dict[str, Any] | None = None
        self.snapshots: list[Path] = []
        self.described: dict[str, Any] | None = None  # what it showed when it closed
        self._t_status = 0.0
        self.timer = QTimer()
        self.timer.setInterval(max(1, round(1000 / hz)))
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    # -- the timer ---------------------------------------------------------------------
    def _tick(self) -> None:
        t0 = time.perf_counter()
        try:
            self._update()
        finally:
            self.tick_ms.append((time.perf_counter() - t0) * 1e3)

    def _update(self) -> None:
        self.ticks += 1
        changed = self.frames.changed(self._seen)
        if self.frames.n_p > 1:
            self._field_changed(changed)
        for shown in changed:
            self._show(shown)
        if changed:
            self.updates += 1
        now = time.monotonic()
        done = self.controls.finished()
        if now - self._t_status > 0.25 or (done and self.final is None):
            self._t_status = now
            panel = self.widget.positions
            if panel is not None and panel.overview is not None:
                for p, pic in self.frames.thumbnails(self._thumbs_seen).items():
                    panel.overview.set_thumbnail(p, pic)
            status = self.controls.status()
            self.widget.show_status(status)
            if done and self.final is None:
                # the run has ended, so every prediction is in `frames` by now: what came
                # after this tick's first look is shown before the final screenshot
                for shown in self.frames.changed(self._seen):
                    self._show(shown)
                self.final = status
                self._on_finished()

    def _field_changed(self, changed: list[Shown]) -> None:
        """On a change of field, layers with nothing of the new field yet are blanked
        (never left showing another field's pixels), and the canvas names the field."""
        p = self.frames.showing
        if p == self._field:
            return
        self._field = p
        fresh = {s.key for s in changed}
        for layer in self._ours():
            if layer.name not in fresh:
                layer.data = np.zeros(layer.data.shape, np.float32)
        positions = self.frames.info.positions
        overlay = self.viewer.canvas.overlays.text
        overlay.position = "top_left"
        overlay.font_size = 12
        overlay.color = "white"
        overlay.text = f"field {positions[p].name}" if p < len(positions) else f"field {p}"
        overlay.visible = True
        if self.widget.positions is not None:
            self.widget.positions.show_current(p)

    def select_position(self, p: int | None) -> None:
        """Show field ``p`` (None: follow the field being imaged)."""
        self.frames.select(p)
        self._update()

    def prepare(self, planned: list[tuple[str, str, str, str | None]]) -> None:
        """Create the layers to come (key, kind, channel, model) before frames arrive.

        Adding the first image layers imports and compiles a lot (seconds); done
        here, before the run starts, the display is live from the first frame
        and the grid does not reshuffle as outputs appear.
        """
        info = self.frames.info
        shape = tuple(info.frame_shape)
        if self.frames.n_z > 1:
            shape = (self.frames.n_z, *shape)
        layers = self.viewer.layers
        for key, kind, channel, model in planned:
            zeros = np.zeros(shape, np.float32)
            if key in layers:  # an earlier run's layer (the plugin's window): reused
                layer = layers[key]
                layer.data = zeros
                layer.metadata["model"] = model
                layer.scale = self.controls.scales[-zeros.ndim :]
                if key in self.limits:
                    layer.contrast_limits = self.limits[key]
            else:
                self._show(Shown(key, kind, channel, model, zeros))
            if key not in self.limits:
                self._auto_limits.add(key)
        self.viewer.reset_view()

    def _show(self, shown: Shown) -> None:
        layers = self.viewer.layers
        if shown.key in layers:
            layer = layers[shown.key]
            layer.data = shown.data
            if shown.key in self._auto_limits:  # no constants for it: from its first frame
                self._auto_limits.discard(shown.key)
                layer.contrast_limits = estimate_limits(shown.data)
            return
        fresh = not len(layers)
        limits = self.limits.get(shown.key) or estimate_limits(shown.data)
        scale = self.controls.scales[-shown.data.ndim :]
        layer = self.viewer.add_image(
            shown.data,
            name=shown.key,
            colormap=colormap_for(shown.channel),
            contrast_limits=limits,
            blending="additive",
            scale=scale,
            metadata={"kind": shown.kind, "channel": shown.channel, "model": shown.model},
        )
        if shown.kind != "raw":
            layer.metadata["prediction"] = True
        self._order_layers()
        if fresh:
            self.viewer.reset_view()

    def _ours(self) -> list[Any]:
        """The run's layers (a shared window also holds other plugins' layers)."""
        return [layer for layer in self.viewer.layers if "kind" in layer.metadata]

    def _order_layers(self) -> None:
        """Raw first, then each channel's outputs next to it (in the slots the run's
        layers hold: other layers stay where they are)."""
        layers = self.viewer.layers
        slots = [i for i in range(len(layers)) if "kind" in layers[i].metadata]
        order = sorted(
            slots, key=lambda i: (layers[i].metadata.get("kind") != "raw", layers[i].name)
        )
        if order != slots:
            names = [layer.name for layer in layers]
            for slot, i in zip(slots, order, strict=True):
                names[slot] = layers[i].name
            for dest, name in enumerate(names):
                src = layers.index(layers[name])
                if src != dest:
                    layers.move(src, dest)

    def _on_finished(self) -> None:
        self.widget.finished()
        if self.screenshot_path is not None:
            self.save_screenshot(self.screenshot_path)
            self.save_dock_screenshot(dock_screenshot_path(self.screenshot_path))
            self.described = self.describe()
            self.timer.stop()
            self.viewer.close()

    def run(self, start: Callable[[], None] | None = None) -> None:
        """The Qt event loop until the window closes; ``start`` runs once it is up."""
        import napari
        from qtpy.QtCore import QTimer

        if start is not None:
            QTimer.singleShot(0, start)
        napari.run()

    # -- actions ---------------------------------------------------------------------------
    def save_screenshot(self, path: Path) -> Path:
        """PNG of the canvas (every layer in its grid cell) as it is now."""
        save_canvas(self.viewer, path)
        return path

    def save_dock_screenshot(self, path: Path) -> Path:
        """PNG of the dock (status, badge, controls) as it is now."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.widget.grab().save(str(path)):
            raise OSError(f"cannot write {path}")
        return path

    def snapshot(self) -> Path:
        """Save the current view next to the recording (or in the working directory)."""
        base = (
            Path(str(self.controls.store) + ".snapshots")
            if self.controls.store
            else Path("snapshots")
        )
        path = base / f"snapshot-{len(self.snapshots) + 1:03d}.png"
        self.snapshots.append(self.save_screenshot(path))
        return path

    def reestimate_contrast(self) -> None:
        """Contrast limits from the pixels on screen now (once; they stay fixed after)."""
        for layer in self._ours():
            layer.contrast_limits = estimate_limits(layer.data)

    def set_grid(self, side_by_side: bool) -> None:
        """Side by side (grid) or overlaid (additive)."""
        self.viewer.canvas.grid.enabled = side_by_side

    def open_recording(self) -> None:
        """Replace the live layers by the whole recording (time and z sliders)."""
        from scopestream.viewer.saved import open_run

        if self.controls.store is None:
            return
        for layer in self._ours():
            self.viewer.layers.remove(layer)
        open_run(self.viewer, self.controls.store)

    def describe(self) -> dict[str, Any]:
        """What the window shows (for the run summary and tests)."""
        if self.described is not None:
            return self.described
        return {
            "layers": [layer.name for layer in self.viewer.layers],
            "shapes": {layer.name: list(layer.data.shape) for layer in self.viewer.layers},
            "grid": list(grid_shape(self.viewer)),
            "display_updates": self.updates,
            "ticks": self.ticks,
            "screenshot": str(self.screenshot_path) if self.screenshot_path else None,
            "snapshots": [str(p) for p in self.snapshots],
            "widget": dict(self.widget.values),
            "badge": self.widget.badge.text() if self.widget.badge.isVisibleTo(self.widget)
            else None,
            "dock_screenshot": str(dock_screenshot_path(self.screenshot_path))
            if self.screenshot_path
            else None,
            **self._describe_fields(),
        }

    def _describe_fields(self) -> dict[str, Any]:
        if self.frames.n_p < 2:
            return {}
        positions = self.frames.info.positions
        panel = self.widget.positions
        p = self._field if self._field is not None else self.frames.showing
        out: dict[str, Any] = {
            "field_shown": positions[p].name,
            "following": self.frames.shown_p is None,
        }
        if panel is not None and panel.overview is not None:
            out["plate_wells_imaged"] = sorted(panel.overview.imaged)
        return out


def _qt_widgets() -> Any:
    from qtpy import QtWidgets

    return QtWidgets


class StatusWidget(_qt_widgets().QWidget):  # type: ignore[misc]
    """The dock widget: run status and controls."""

    def __init__(self, live: LiveViewer) -> None:
        qw = _qt_widgets()
        super().__init__()
        self.live = live
        self.values: dict[str, str] = {}
        self._labels: dict[str, Any] = {}
        layout = qw.QVBoxLayout(self)
        #: shown while a model sees data unlike its training data (`domain_badge`)
        self.badge = qw.QLabel("")
        self.badge.setWordWrap(True)
        self.badge.setStyleSheet(BADGE_STYLE)
        self.badge.hide()
        layout.addWidget(self.badge)
        self.form = qw.QFormLayout()
        layout.addLayout(self.form)
        buttons = qw.QGridLayout()
        self.pause_btn = qw.QPushButton("Pause")
        self.pause_btn.setCheckable(True)
        self.pause_btn.setEnabled(live.controls.pause is not None)
        self.pause_btn.toggled.connect(self._pause)
        self.stop_btn = qw.QPushButton("Stop")
        self.stop_btn.clicked.connect(self._stop)
        self.grid_btn = qw.QPushButton("Side by side")
        self.grid_btn.setCheckable(True)
        grid = bool(live.viewer.canvas.grid.enabled)  # its own window: on; a shared one: as is
        self.grid_btn.setChecked(grid)
        self.grid_btn.setText("Side by side" if grid else "Overlaid")
        self.grid_btn.toggled.connect(self._grid)
        self.contrast_btn = qw.QPushButton("Re-estimate contrast")
        self.contrast_btn.clicked.connect(lambda: live.reestimate_contrast())
        self.snap_btn = qw.QPushButton("Save snapshot")
        self.snap_btn.clicked.connect(self._snap)
        self.open_btn = qw.QPushButton("Open recording")
        self.open_btn.setEnabled(False)
        self.open_btn.clicked.connect(lambda: live.open_recording())
        for i, b in enumerate(
            (
                self.pause_btn,
                self.stop_btn,
                self.grid_btn,
                self.contrast_btn,
                self.snap_btn,
                self.open_btn,
            )
        ):
            buttons.addWidget(b, i // 2, i % 2)
        layout.addLayout(buttons)
        self.version_boxes: dict[str, Any] = {}
        versions = live.controls.versions()
        current = live.controls.current()
        if versions and live.controls.swap is not None:
            vform = qw.QFormLayout()
            for model, vs in versions.items():
                box = qw.QComboBox()
                for v in vs:
                    box.addItem(f"v{v}", v)
                if model in current:
                    box.setCurrentIndex(max(0, box.findData(current[model])))
                box.activated.connect(lambda _i, m=model, b=box: self._swap(m, b.currentData()))
                self.version_boxes[model] = box
                vform.addRow(f"{model} version", box)
            layout.addLayout(vform)
        self.positions = None
        if live.frames.n_p > 1:
            from scopestream.viewer.fields import PositionPanel

            self.positions = PositionPanel(
                live.frames.info.positions, live.select_position, follow=True
            )
            layout.addWidget(self.positions)
        self.message = qw.QLabel("")
        self.message.setWordWrap(True)
        layout.addWidget(self.message)
        layout.addStretch(1)

    def show_status(self, status: dict[str, Any]) -> None:
        """Update the rows (creating them the first time)."""
        qw = _qt_widgets()
        rows = format_status(status)
        for key, text in rows.items():
            if key not in self._labels:
                label = qw.QLabel(text)
                self._labels[key] = label
                self.form.addRow(key, label)
            elif self.values.get(key) != text:
                self._labels[key].setText(text)
        self.values = rows
        badge = domain_badge(status)
        if badge is not None and badge != self.badge.text():
            self.badge.setText(badge)
        self.badge.setVisible(badge is not None)

    def finished(self) -> None:
        """The run ended: controls that act on it are off; the recording can be opened."""
        self.pause_btn.setEnabled(False)
        self.stop_btn.setEnabled(False)
        for box in self.version_boxes.values():
            box.setEnabled(False)
        self.open_btn.setEnabled(self.live.controls.store is not None)
        self.message.setText("run ended: the window stays open on the last frames")

    def _pause(self, paused: bool) -> None:
        pause = self.live.controls.pause
        ok = pause(paused) if pause is not None else False
        self.pause_btn.setText("Resume" if paused and ok else "Pause")
        if not ok:
            self.message.setText("this source cannot pause")

    def _stop(self) -> None:
        self.live.controls.stop()
        self.message.setText("stopping: what is buffered is still written")

    def _grid(self, on: bool) -> None:
        self.live.set_grid(on)
        self.grid_btn.setText("Side by side" if on else "Overlaid")

    def _snap(self) -> None:
        path = self.live.snapshot()
        self.message.setText(f"saved {path}")

    def _swap(self, model: str, version: int) -> None:
        swap = self.live.controls.swap
        if swap is None:
            return
        swap(model, int(version))
        self.message.setText(f"{model}: loading v{version}; it takes over at a frame boundary")


def open_live_viewer(
    pipeline: Pipeline,
    screenshot: Path | None = None,
    on_swap_error: Callable[[str], None] | None = None,
    *,
    viewer: napari.Viewer | None = None,
) -> LiveViewer:
    """The napari window on a built pipeline: layers, contrast from the models, the dock.

    Contrast of a raw channel a model was trained on, and of the model's outputs,
    comes from the model's fixed normalization constants (never per frame);
    other layers are estimated from their first frame. With ``viewer`` the run is
    shown in that window and the caller docks `LiveViewer.widget`.
    """
    import threading

    from scopestream.viewer.frames import layer_name, output_kind

    runner, frames = pipeline.runner, pipeline.display
    if runner is None or frames is None:
        raise RuntimeError("the pipeline needs viewer: true and build() before a live viewer")
    info = runner.source.info
    limits: dict[str, tuple[float, float]] = {}
    engines = {m.stage: m.engine for m in pipeline.models}
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

    by_name = {m.stage: m for m in pipeline.models if m.by_name}

    def versions() -> dict[str, list[int]]:
        return {
            name: [v for v, _ in m.registry.versions(m.spec)] for name, m in by_name.items()
        }

    def current() -> dict[str, int]:
        return {name: e.predictor.package.version for name, e in engines.items()}

    def swap(name: str, version: int) -> None:
        m = by_name[name]

        def load() -> None:
            try:
                m.engine.swap(pipeline.make_predictor(m.registry.resolve(f"{m.spec}@{version}")))
            except Exception as e:  # reported, never fatal to the run
                if on_swap_error is not None:
                    on_swap_error(f"model swap to {m.spec}@{version} failed: {e}")

        threading.Thread(target=load, name=f"swap-{m.spec}", daemon=True).start()

    px = float(info.pixel_size_um)
    out = pipeline.out or ""
    controls = RunControls(
        status=pipeline.live_summary,
        finished=lambda: runner.summary is not None,
        stop=runner.stop,
        pause=runner.set_paused if runner.can_pause else None,
        versions=versions,
        current=current,
        swap=swap,
        store=Path(out),
        scales=(float(info.z_step_um or 1.0), px, px),
    )
    live = LiveViewer(
        frames,
        controls,
        limits=limits,
        title=f"scopestream — {out}",
        screenshot=screenshot,
        viewer=viewer,
    )
    planned: list[tuple[str, str, str, str | None]] = [
        (layer_name("raw", ch), "raw", ch, None) for ch in info.channel_names
    ]
    for e in engines.values():
        m = e.predictor.manifest
        kind = output_kind(m.task)
        names = list(e.writer.channel_names)  # a model of any input: one per channel it runs on
        planned += [(layer_name(kind, ch), kind, ch, e.writer.name) for ch in names]
    live.prepare(planned)
    return live
