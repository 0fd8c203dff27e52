"""The dock's field selector and plate overview (Qt; see `scopestream.viewer.plate`).

`PositionPanel` lists the fields (and, live, "follow acquisition"); for a plate
it holds a `PlateOverview`: one button per well, its icon the well's newest
thumbnail, updated as wells are imaged; a click shows that well's first field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.viewer.plate import PlateLayout, plate_layout

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from scopestream.streaming.layout import Position


def _qt() -> Any:
    from qtpy import QtCore, QtGui, QtWidgets

    return QtCore, QtGui, QtWidgets


class PlateOverview(_qt()[2].QWidget):  # type: ignore[misc]
    """One button per well of the plate, its icon the well's newest thumbnail."""

    def __init__(self, layout: PlateLayout, on_click: Callable[[int], None], icon: int = 40):
        qc, _, qw = _qt()
        super().__init__()
        self.plate = layout
        self.icon = icon
        self.buttons: dict[str, Any] = {}
        #: wells whose thumbnail came (what the overview shows; for the tests)
        self.imaged: set[str] = set()
        grid = qw.QGridLayout(self)
        grid.setSpacing(2)
        for j, col in enumerate(layout.columns):
            grid.addWidget(qw.QLabel(str(col)), 0, j + 1, qc.Qt.AlignmentFlag.AlignCenter)
        for i, row in enumerate(layout.rows):
            grid.addWidget(qw.QLabel(row), i + 1, 0)
        for well, (i, j) in layout.cells.items():
            b = qw.QToolButton()
            b.setText(well)
            b.setToolTip(f"{well}: {len(layout.wells[well])} field(s)")
            b.setIconSize(qc.QSize(icon, icon))
            b.setFixedSize(icon + 8, icon + 8)
            b.setCheckable(True)
            b.clicked.connect(lambda _c=False, w=well: on_click(layout.wells[w][0]))
            grid.addWidget(b, i + 1, j + 1)
            self.buttons[well] = b

    def set_thumbnail(self, p: int, pixels: np.ndarray) -> None:
        """Field ``p``'s newest picture becomes its well's icon."""
        _, qg, _ = _qt()
        well = self.plate.well_of(p)
        if well is None:
            return
        a = np.ascontiguousarray(pixels, np.uint8)
        h, w = a.shape
        img = qg.QImage(a.data, w, h, w, qg.QImage.Format.Format_Grayscale8).copy()
        self.buttons[well].setIcon(qg.QIcon(qg.QPixmap.fromImage(img)))
        self.buttons[well].setText("")
        self.imaged.add(well)

    def set_current(self, p: int | None) -> None:
        """Mark the well of the shown field."""
        well = None if p is None else self.plate.well_of(p)
        for name, b in self.buttons.items():
            b.setChecked(name == well)


class PositionPanel(_qt()[2].QWidget):  # type: ignore[misc]
    """The field selector of the dock (see the module docstring).

    ``follow`` adds a first entry "follow acquisition" (``None``: the field being
    imaged), for a live run. ``on_select`` gets the chosen field's index or None.
    """

    def __init__(
        self,
        positions: Sequence[Position],
        on_select: Callable[[int | None], None],
        *,
        follow: bool,
    ) -> None:
        _, _, qw = _qt()
        super().__init__()
        self.on_select = on_select
        self.follow = follow
        box = qw.QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        row = qw.QFormLayout()
        self.combo = qw.QComboBox()
        if follow:
            self.combo.addItem("follow acquisition", None)
        for p, pos in enumerate(positions):
            self.combo.addItem(pos.name, p)
        self.combo.activated.connect(lambda _i: self._chosen(self.combo.currentData()))
        row.addRow("field", self.combo)
        box.addLayout(row)
        layout = plate_layout(positions)
        self.overview = None if layout is None else PlateOverview(layout, self._clicked)
        if self.overview is not None:
            box.addWidget(self.overview)

    def _chosen(self, p: int | None) -> None:
        if self.overview is not None and p is not None:
            self.overview.set_current(p)
        self.on_select(p)

    def _index(self, p: int | None) -> int:
        if p is None:
            return 0
        return max(0, int(self.combo.findData(p)))

    def _clicked(self, p: int) -> None:
        self.combo.setCurrentIndex(self._index(p))
        self._chosen(p)

    def show_current(self, p: int | None) -> None:
        """Mark field ``p`` as the one shown (the selection itself stays as it is)."""
        if self.overview is not None:
            self.overview.set_current(p)

    def select(self, p: int | None) -> None:
        """Choose field ``p`` (None: follow) as if the user had."""
        self.combo.setCurrentIndex(self._index(p))
        self._chosen(p)
