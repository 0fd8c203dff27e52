"""Saved runs in napari: raw and every output as named, coloured layers in µm and s.

`run_layers` reads what a run store holds (no Qt, so it is tested on its own);
`open_run` adds the layers; `RunFollower` keeps them growing while the run is
still being written (the time axis is re-read every second and the view
follows the newest time point until the run's status says it ended).

A model on the ``latest`` policy predicts only some frames; the others read as
NaN (drawn black) or, in runs recorded before, 0. Either way the canvas says
"not predicted" at such a time point (`time_point_text`), from which chunk
files exist, never from the pixel values.

A run of several positions (fields) is one layer per image and channel with a
``p`` axis after ``t`` (``t, p, [z,] y, x``): the ``p`` slider and the dock's
field selector (a plate overview of well thumbnails for plates) choose the
field, every layer shows the same one, and the canvas names it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.streaming.frame_index import FILE_NAME, FrameIndexTail
from scopestream.streaming.saved_run import (
    SavedRun,
    complete_frames,
    provenance_kind,
    read_group_attrs,
)
from scopestream.viewer.frames import layer_name
from scopestream.viewer.style import colormap_for, estimate_limits

if TYPE_CHECKING:
    import napari


@dataclass
class LayerSpec:
    """One channel of one image of a run, ready for ``viewer.add_image``."""

    name: str
    kind: str
    channel: str
    image: str  # "" for the raw image, else the output's name
    c: int
    data: Any  # lazy (t, [z,] y, x)
    scale: tuple[float, ...]
    axis_labels: tuple[str, ...]
    colormap: str
    contrast_limits: tuple[float, float]
    last_t: int
    complete_t: list[int]
    group: Path | None = None  # the image's group in the store (None: unknown)
    #: a run of several positions: each field's group (``data`` has a p axis after t)
    groups: tuple[Path, ...] = ()



def _complete_t(group: Path) -> list[list[int]]:
    """Per channel, the time points with at least one complete plane (one listing)."""
    try:
        flags = complete_frames(group)  # (t, c, z)
    except (OSError, KeyError, ValueError):
        return []
    per_c = np.any(flags, axis=-1).reshape(flags.shape[:2])
    return [[int(t) for t in np.flatnonzero(per_c[:, c])] for c in range(per_c.shape[1])]


class IndexedTimes:
    """Per image and channel, the time points its frame index lists, read incrementally.

    A viewer following a growing run asks this every second: each image's
    ``frames.npy`` is read from where the last look stopped (`FrameIndexTail`), so
    the cost is that of the frames written since, not of the whole run.
    """

    def __init__(self) -> None:
        self._tails: dict[Path, FrameIndexTail] = {}
        self._times: dict[Path, list[list[int]]] = {}

    def times(self, group: Path, channels: int) -> list[list[int]] | None:
        """Per channel, the sorted time points indexed so far; None without an index."""
        if group not in self._tails:
            if not (group / FILE_NAME).exists():
                return None
            self._tails[group] = FrameIndexTail(group)
        seen = self._times.setdefault(group, [])
        while len(seen) < channels:
            seen.append([])
        new = self._tails[group].read_new()
        for c in range(channels):
            for t in np.unique(new["t"][new["c"] == c]).tolist():
                ts = seen[c]
                if not ts or t > ts[-1]:  # the usual case: time goes forward
                    ts.append(t)
                else:
                    i = bisect.bisect_left(ts, t)
                    if i == len(ts) or ts[i] != t:
                        ts.insert(i, t)
        return [list(ts) for ts in seen[:channels]]


def run_layers(
    path: str | Path, *, contrast: bool = True, index: IndexedTimes | None = None
) -> list[LayerSpec]:
    """Every channel of the raw image and of each output, as layer specs.

    With ``index``, the time points come from each image's frame index
    (``frames.npy``, read on from where ``index`` last stopped) instead of listing
    every chunk file: what a viewer following a growing run does every second.
    ``contrast=False`` reads no pixels (limits stay (0, 1)): for re-reading the
    time axis of a run that is still written.
    """
    import dask.array as da
    import zarr

    run = SavedRun(path)
    if run.n_positions > 1:
        return _field_layers(run, contrast=contrast, index=index)
    specs: list[LayerSpec] = []
    for im in run.images:
        group = im.path
        image = "" if im.name == "raw" else im.name
        attrs = read_group_attrs(group)
        ms = attrs["ome"]["multiscales"][0]
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        channels = list(im.channels)
        kind = "raw" if im.kind == "raw" else provenance_kind(im.provenance)
        arr: Any = zarr.open_array(str(group / "0"), mode="r")
        lazy = da.from_zarr(arr)  # type: ignore[no-untyped-call]
        n_z = int(arr.shape[2])
        t_scale = float(scale[0]) or 1.0
        indexed = None if index is None else index.times(group, len(channels))
        complete = indexed if indexed is not None else _complete_t(group)
        for c, ch in enumerate(channels):
            data = lazy[:, c] if n_z > 1 else lazy[:, c, 0]
            sp = (t_scale, *scale[2:]) if n_z > 1 else (t_scale, *scale[3:])
            labels = ("t", "z", "y", "x") if n_z > 1 else ("t", "y", "x")
            done = complete[c] if c < len(complete) else []
            last = done[-1] if done else 0
            limits = estimate_limits(np.asarray(arr[last, c, n_z // 2])) if contrast else (0, 1)
            specs.append(
                LayerSpec(
                    name=layer_name(kind, ch, im.position),
                    kind=kind,
                    channel=ch,
                    image=image,
                    group=group,
                    c=c,
                    data=data,
                    scale=tuple(float(s) for s in sp),
                    axis_labels=labels,
                    colormap=colormap_for(ch),
                    contrast_limits=limits,
                    last_t=last,
                    complete_t=done,
                )
            )
    return specs


def _field_layers(
    run: SavedRun, *, contrast: bool, index: IndexedTimes | None
) -> list[LayerSpec]:
    """`run_layers` of a run of several fields: each image's fields stacked on a p axis.

    Fields whose time axis is shorter (a growing open-ended run) are padded with
    zeros to the longest for display only; what is on disk is not touched."""
    import dask.array as da
    import zarr

    by_name: dict[str, dict[int, Any]] = {}
    for im in run.images:
        by_name.setdefault(im.name, {})[im.p] = im
    n_p = run.n_positions
    specs: list[LayerSpec] = []
    for name, fields in by_name.items():
        first = fields[min(fields)]
        attrs = read_group_attrs(first.path)
        scale = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
            "scale"
        ]
        arrays = {p: zarr.open_array(str(im.path / "0"), mode="r") for p, im in fields.items()}
        a0 = arrays[min(arrays)]
        n_t = max(int(a.shape[0]) for a in arrays.values())
        lazies = []
        for p in range(n_p):
            a = arrays.get(p)
            if a is None:  # a field with no such image (never happens in our runs)
                lazies.append(da.zeros((n_t, *a0.shape[1:]), dtype=a0.dtype, chunks=a0.chunks))
                continue
            lazy = da.from_zarr(a)  # type: ignore[no-untyped-call]
            if int(a.shape[0]) < n_t:
                pad = da.zeros((n_t - int(a.shape[0]), *a.shape[1:]), dtype=a.dtype)
                lazy = da.concatenate([lazy, pad], axis=0)  # type: ignore[no-untyped-call]
            lazies.append(lazy)
        stacked = da.stack(lazies, axis=1)  # type: ignore[no-untyped-call]  # t,p,c,z,y,x
        n_z = int(a0.shape[2])
        groups = tuple(fields[p].path if p in fields else first.path for p in range(n_p))
        complete: dict[int, set[int]] = {}
        for im in fields.values():
            per_c = index.times(im.path, len(im.channels)) if index is not None else None
            if per_c is None:
                per_c = _complete_t(im.path)
            for c, ts in enumerate(per_c):
                complete.setdefault(c, set()).update(ts)
        kind = "raw" if first.kind == "raw" else provenance_kind(first.provenance)
        t_scale = float(scale[0]) or 1.0
        for c, ch in enumerate(first.channels):
            data = stacked[:, :, c] if n_z > 1 else stacked[:, :, c, 0]
            sp = (t_scale, 1.0, *scale[2:]) if n_z > 1 else (t_scale, 1.0, *scale[3:])
            labels = ("t", "p", "z", "y", "x") if n_z > 1 else ("t", "p", "y", "x")
            done = sorted(complete.get(c, ()))
            last = done[-1] if done else 0
            limits = (0.0, 1.0)
            if contrast:  # from the first field's newest frame
                limits = estimate_limits(np.asarray(a0[min(last, a0.shape[0] - 1), c, n_z // 2]))
            specs.append(
                LayerSpec(
                    name=layer_name(kind, ch),
                    kind=kind,
                    channel=ch,
                    image="" if name == "raw" else name,
                    group=first.path,
                    groups=groups,
                    c=c,
                    data=data,
                    scale=tuple(float(v) for v in sp),
                    axis_labels=labels,
                    colormap=colormap_for(ch),
                    contrast_limits=limits,
                    last_t=last,
                    complete_t=done,
                )
            )
    return specs


def field_thumbnails(path: str | Path, t: int, size: int = 40) -> dict[int, np.ndarray]:
    """Per field, a small picture of its raw first channel at time point ``t``
    (the middle plane; the newest frame when ``t`` was not reached)."""
    from scopestream.viewer.plate import thumbnail

    out = {}
    for im in SavedRun(path).images:
        if im.name != "raw":
            continue
        arr = im.array()
        if arr.shape[0] == 0:
            continue
        tt = min(t, arr.shape[0] - 1)
        out[im.p] = thumbnail(np.asarray(arr[tt, 0, arr.shape[2] // 2]), size)
    return out


def open_run(viewer: napari.Viewer, path: str | Path) -> list[Any]:
    """Add a run's layers to ``viewer``; the time slider goes to the newest frame."""
    specs = run_layers(path)
    layers = []
    for s in specs:
        layer = viewer.add_image(
            s.data,
            name=s.name,
            colormap=s.colormap,
            contrast_limits=s.contrast_limits,
            scale=s.scale,
            blending="additive",
            metadata={"kind": s.kind, "channel": s.channel, "image": s.image, "c": s.c},
        )
        if s.kind not in ("raw", "truth"):
            layer.metadata["prediction"] = True
        layers.append(layer)
    if specs:
        viewer.dims.axis_labels = specs[0].axis_labels
        viewer.dims.set_current_step(0, best_time_point(specs))
        if specs[0].groups:  # several fields: the first one (napari starts mid-axis)
            viewer.dims.set_current_step(1, 0)
        _mark_not_predicted(viewer, path, specs)
    return layers


def _has_frame(group: Path, t: int, c: int) -> bool:
    """Whether a plane of time point ``t``, channel ``c`` is on disk (chunk key ``c/t/c/…``)."""
    return (group / "0" / "c" / str(t) / str(c)).is_dir()


def _group(root: Path, s: LayerSpec, p: int) -> Path:
    if s.groups:
        return s.groups[min(p, len(s.groups) - 1)]
    return s.group if s.group is not None else root / s.image


def not_predicted(path: str | Path, specs: list[LayerSpec], t: int, p: int = 0) -> list[str]:
    """The prediction layers with no frame at time point ``t`` of field ``p`` (their
    model skipped it).

    Asks the store at each call (a stat per layer), so it holds while a run is written.
    """
    root = Path(path)
    return [
        s.name
        for s in specs
        if s.kind not in ("raw", "truth") and not _has_frame(_group(root, s, p), t, s.c)
    ]


def time_point_text(
    path: str | Path, specs: list[LayerSpec], t: int, p: int = 0, field: str | None = None
) -> str:
    """What the canvas says at time point ``t`` (of field ``p``, named ``field``): the
    field, and which outputs were not predicted ('' if nothing to say)."""
    missing = not_predicted(path, specs, t, p)
    parts = [f"field {field}"] if field else []
    if missing:
        parts.append(f"t = {t}: not predicted: {', '.join(missing)}")
    return "\n".join(parts)


def _mark_not_predicted(viewer: napari.Viewer, path: str | Path, specs: list[LayerSpec]) -> None:
    """Keep the canvas text saying which field is shown and which outputs lack the
    current time point."""
    several = any(s.groups for s in specs)
    if not several and not any(s.kind not in ("raw", "truth") for s in specs):
        return
    names = [pos.name for pos in SavedRun(path).positions] if several else []
    overlay = viewer.canvas.overlays.text
    overlay.position = "top_left"
    overlay.font_size = 12
    overlay.color = "yellow"

    def update(_event: Any = None) -> None:
        step = viewer.dims.current_step
        p = int(step[1]) if several else 0
        field = (names[p] if p < len(names) else str(p)) if several else None
        text = time_point_text(path, specs, int(step[0]), p, field)
        overlay.text = text
        overlay.visible = bool(text)

    viewer.dims.events.current_step.connect(update)
    update()


def best_time_point(specs: list[LayerSpec]) -> int:
    """The newest time point at which the most images were written.

    Models on the ``latest`` policy skip frames, so the newest raw frame may
    have no prediction; opening there would show empty outputs.
    """
    score: dict[int, int] = {}
    for s in specs:
        for t in s.complete_t:
            score[t] = score.get(t, 0) + 1
    if not score:
        return 0
    best = max(score.values())
    return max(t for t, k in score.items() if k == best)


def run_status(path: str | Path) -> str:
    """The run's recorded status (acquiring, complete, failed, …)."""
    return SavedRun(path).status


class RunFollower:
    """Keeps a saved run's layers growing while it is written (a 1 s main-thread timer)."""

    def __init__(self, viewer: napari.Viewer, path: str | Path, interval_ms: int = 1000) -> None:
        from qtpy.QtCore import QTimer

        self.viewer, self.path = viewer, Path(path)
        self.refreshes = 0
        self.index = IndexedTimes()
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()

    def refresh(self) -> None:
        """Re-read the time axis; grow the layers; follow the newest time point."""
        status = run_status(self.path)
        # the frame index, not a walk over every chunk file, on the GUI thread each second
        specs = {s.name: s for s in run_layers(self.path, contrast=False, index=self.index)}
        for layer in self.viewer.layers:
            spec = specs.get(layer.name)
            if spec is None:
                continue
            if tuple(spec.data.shape) != tuple(layer.data.shape):
                layer.data = spec.data
            else:
                layer.refresh()
        if specs:
            self.viewer.dims.set_current_step(0, max(s.last_t for s in specs.values()))
        self.refreshes += 1
        if status != "acquiring":
            self.timer.stop()


def field_panel(viewer: napari.Viewer, path: str | Path) -> Any:
    """The dock's field selector for a saved run of several fields (None for one):
    it moves the ``p`` slider, follows it, and for a plate shows each well's thumbnail."""
    from scopestream.viewer.fields import PositionPanel

    run = SavedRun(path)
    if run.n_positions < 2:
        return None

    def select(p: int | None) -> None:
        if p is not None:
            viewer.dims.set_current_step(1, p)

    panel = PositionPanel(run.positions, select, follow=False)

    def moved(_event: Any = None) -> None:
        p = int(viewer.dims.current_step[1])
        panel.combo.setCurrentIndex(p)
        panel.show_current(p)

    viewer.dims.events.current_step.connect(moved)
    moved()
    if panel.overview is not None:
        for p, pic in field_thumbnails(path, int(viewer.dims.current_step[0])).items():
            panel.overview.set_thumbnail(p, pic)
    viewer.window.add_dock_widget(panel, name="fields", area="right")
    return panel


def view_run(
    path: str | Path, *, screenshot: Path | None = None, follow: bool = True
) -> dict[str, Any]:
    """``scopestream view``: a window on a saved run until it is closed (or screenshotted)."""
    import napari
    from qtpy.QtCore import QTimer

    from scopestream.viewer.window import open_window, save_canvas

    status = run_status(path)
    viewer = open_window(f"scopestream — {path}")
    layers = open_run(viewer, path)
    follower = RunFollower(viewer, path) if follow and status == "acquiring" else None
    panel = field_panel(viewer, path) if layers else None
    shown: dict[str, Any] = {
        "layers": [layer.name for layer in layers],
        "status": status,
        "following": follower is not None,
        "time_point": int(viewer.dims.current_step[0]) if layers else 0,
    }
    if screenshot is not None:

        def shoot() -> None:
            shown["grid"] = list(save_canvas(viewer, screenshot))
            shown["screenshot"] = str(screenshot)
            shown["shapes"] = {layer.name: list(layer.data.shape) for layer in viewer.layers}
            if panel is not None:
                p = int(viewer.dims.current_step[1])
                shown["positions"] = [panel.combo.itemText(i) for i in range(panel.combo.count())]
                shown["field_shown"] = panel.combo.itemText(p)
                shown["canvas_text"] = str(viewer.canvas.overlays.text.text)
                if panel.overview is not None:
                    shown["plate_wells_imaged"] = sorted(panel.overview.imaged)
            viewer.close()

        QTimer.singleShot(200 if follower is None else 2500, shoot)
    napari.run()
    if follower is not None:
        shown["refreshes"] = follower.refreshes
    return shown
