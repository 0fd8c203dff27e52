"""Saved runs in napari: raw and every output as named, coloured layers in µm and s.

`run_layers` reads what a run store holds (no Qt, so it is tested on its own);
`open_run` adds the layers; `RunFollower` keeps them growing while the run is
still being written (the time axis is re-read every second and the view
follows the newest time point until the run's status says it ended).

A model on the ``latest`` policy predicts only some frames; the others read as
NaN (drawn black) or, in runs recorded before, 0. Either way the canvas says
"not predicted" at such a time point (`time_point_text`), from which chunk
files exist, never from the pixel values.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.streaming.frame_index import FILE_NAME, FrameIndexTail
from scopestream.streaming.saved_run import SavedRun, complete_frames, read_group_attrs
from scopestream.viewer.frames import layer_name, output_kind
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


def _kind(prov: dict[str, Any]) -> str:
    if prov.get("kind") == "ground truth":
        return "truth"
    return output_kind(str(prov.get("task", "stain")))


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
    specs: list[LayerSpec] = []
    for im in run.images:
        group = im.path
        image = "" if im.name == "raw" else im.name
        attrs = read_group_attrs(group)
        ms = attrs["ome"]["multiscales"][0]
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        channels = list(im.channels)
        kind = "raw" if im.kind == "raw" else _kind(im.provenance)
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
        _mark_not_predicted(viewer, path, specs)
    return layers


def _has_frame(group: Path, t: int, c: int) -> bool:
    """Whether a plane of time point ``t``, channel ``c`` is on disk (chunk key ``c/t/c/…``)."""
    return (group / "0" / "c" / str(t) / str(c)).is_dir()


def not_predicted(path: str | Path, specs: list[LayerSpec], t: int) -> list[str]:
    """The prediction layers with no frame at time point ``t`` (their model skipped it).

    Asks the store at each call (a stat per layer), so it holds while a run is written.
    """
    root = Path(path)
    return [
        s.name
        for s in specs
        if s.kind not in ("raw", "truth")
        and not _has_frame(s.group if s.group is not None else root / s.image, t, s.c)
    ]


def time_point_text(path: str | Path, specs: list[LayerSpec], t: int) -> str:
    """What the canvas says at time point ``t``: which outputs were not predicted ('' if all)."""
    missing = not_predicted(path, specs, t)
    return f"t = {t}: not predicted: {', '.join(missing)}" if missing else ""


def _mark_not_predicted(viewer: napari.Viewer, path: str | Path, specs: list[LayerSpec]) -> None:
    """Keep the canvas text saying which outputs lack the current time point."""
    if not any(s.kind not in ("raw", "truth") for s in specs):
        return
    overlay = viewer.canvas.overlays.text
    overlay.position = "top_left"
    overlay.font_size = 12
    overlay.color = "yellow"

    def update(_event: Any = None) -> None:
        text = time_point_text(path, specs, int(viewer.dims.current_step[0]))
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
            viewer.close()

        QTimer.singleShot(200 if follower is None else 2500, shoot)
    napari.run()
    if follower is not None:
        shown["refreshes"] = follower.refreshes
    return shown
