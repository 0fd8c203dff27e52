"""The napari window both the live view and saved runs use, and its canvas screenshot."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import napari

#: screenshot pixels per grid cell, whatever the window's size
CELL_PX = 360


def open_window(title: str, *, show: bool = True) -> napari.Viewer:
    """A napari window with layers side by side (one camera: zoom and pan are linked)."""
    import napari

    viewer = napari.Viewer(title=title, show=show)
    viewer.canvas.grid.enabled = True
    viewer.window.resize(1500, 950)
    return viewer


def grid_shape(viewer: napari.Viewer) -> tuple[int, int]:
    """(rows, columns) of the layer grid as drawn now."""
    rows, cols = viewer.canvas.grid.actual_shape(viewer.layers)
    return int(rows), int(cols)


def save_canvas(viewer: napari.Viewer, path: Path) -> tuple[int, int]:
    """PNG of the canvas, every layer whole in its grid cell; returns the grid shape."""
    rows, cols = grid_shape(viewer)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.reset_view()
    viewer.screenshot(str(path), size=(rows * CELL_PX, cols * CELL_PX), canvas_only=True)
    return rows, cols
