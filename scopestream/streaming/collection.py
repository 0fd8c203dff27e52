"""The run store's layout: an OME-Zarr 0.5 ``bioformats2raw.layout`` collection.

A run is one collection of images (*series*), which the spec defines and standard
readers open (napari-ome-zarr shows every series as layers; ``ome-zarr-models``
validates it with ``v05.BioFormats2Raw``)::

    RUN.ome.zarr/
      zarr.json            {"ome": {"version": "0.5", "bioformats2raw.layout": 3},
                            "scopestream": {config, source, stream, status, series, ...}}
      OME/zarr.json        {"ome": {"version": "0.5", "series": ["0", "1", ...]}}
      OME/METADATA.ome.xml one <Image> per series (names, pixel type, sizes, stage label)
      0/                   raw, first position: an OME-Zarr image (``0/0`` the t,c,z,y,x array,
                           ``0/frames.npy`` its per-frame metadata)
      1/ ...               raw of the next positions, then each model output (and the
                           simulator's truth) for every position, in the order created
      timeline.json        the run's per-second timeline (at its end)

Series are numbered in the order they are created: the raw image of every
position first (``p`` order), then each output for every position. The run's
``scopestream.series`` attribute maps each path to its image (``raw``, an
output's name, ``truth``) and position, so nothing depends on that order.

A **plate** (every position names its well) is the same collection, whose series
are the fields of NGFF 0.5 HCS plates, one plate per image (parallel plates)::

    P.ome.zarr/
      zarr.json, OME/      the collection (its series: raw/A/1/0, raw/A/1/1, ..., stain/B/2/1)
      raw/zarr.json        {"ome": {"plate": {rows, columns, wells, field_count, name: "raw"}}}
      raw/A/1/zarr.json    {"ome": {"well": {"images": [{"path": "0"}, {"path": "1"}]}}}
      raw/A/1/0/           the raw image of well A1's first field (an OME-Zarr image)
      denoise/A/1/0/ ...   each output: a plate of its own, the same wells and fields

so a reader of collections sees every field and output, and a plate viewer opens
``P.ome.zarr/raw`` (or ``P.ome.zarr/denoise``) as a plate.

This module writes the collection's own metadata (root, ``OME/``); images are
written by `scopestream.streaming.zarr_sink.ImageWriter`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

from scopestream.streaming.layout import row_index, split_well

if TYPE_CHECKING:
    from pathlib import Path

    from scopestream.streaming.layout import Position

#: the bioformats2raw layout version NGFF 0.5 names
BF2RAW_LAYOUT = 3
OME_DIR = "OME"
OME_XML = "METADATA.ome.xml"

_OME_TYPES = {
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "float32": "float",
    "float64": "double",
}


@dataclass(frozen=True)
class Series:
    """One image of the collection: where it is and what it holds."""

    path: str  # "0", "1", ...; on a plate, "IMAGE/ROW/COLUMN/FIELD"
    image: str  # "raw", an output's name, "truth"
    p: int  # position index
    position: str | None  # the position's name (None: a run of one position)
    dtype: str
    channels: tuple[str, ...]
    shape: tuple[int, int, int, int, int]  # t, c, z, y, x
    pixel_size_um: float = 1.0
    z_step_um: float = 1.0
    stage: Position | None = None

    @property
    def name(self) -> str:
        """The image's display name (``raw``, or ``raw @ A1_0000`` with several positions)."""
        return self.image if self.position is None else f"{self.image} @ {self.position}"

    def to_json(self) -> dict[str, Any]:
        """The entry of the run's ``scopestream.series`` attribute."""
        return {"path": self.path, "image": self.image, "p": self.p, "position": self.position}


def root_attrs(run: dict[str, Any]) -> dict[str, Any]:
    """Attributes of the collection's root group: the layout marker and the run's own."""
    return {"ome": {"version": "0.5", "bioformats2raw.layout": BF2RAW_LAYOUT}, "scopestream": run}


def write_series_index(root: Path, series: list[Series]) -> None:
    """Write ``OME/zarr.json`` (the series list) and ``OME/METADATA.ome.xml`` atomically."""
    ome = root / OME_DIR
    ome.mkdir(exist_ok=True)
    group = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {"ome": {"version": "0.5", "series": [s.path for s in series]}},
    }
    _write_atomic(ome / "zarr.json", json.dumps(group, indent=1))
    _write_atomic(ome / OME_XML, ome_xml(series))


def plate_path(image: str, position: Position) -> str | None:
    """Where a field of a plate goes (``raw/B/3/0``); None for a position in no well."""
    rc = split_well(position.well or "")
    if rc is None or position.field is None:
        return None
    return f"{image}/{rc[0]}/{rc[1]}/{int(position.field)}"


def is_plate(positions: tuple[Position, ...]) -> bool:
    """Whether every position is a field of a well (the run is stored as plates)."""
    return bool(positions) and all(plate_path("raw", p) is not None for p in positions)


def write_plate(root: Path, image: str, positions: tuple[Position, ...]) -> None:
    """The HCS metadata of image ``image``'s plate: the plate, its rows and wells (NGFF 0.5)."""
    wells: dict[tuple[str, int], list[int]] = {}
    for pos in positions:
        rc = split_well(pos.well or "")
        if rc is None or pos.field is None:
            raise ValueError(f"position {pos.name} is not a field of a well")
        wells.setdefault(rc, []).append(int(pos.field))
    rows = sorted({r for r, _ in wells}, key=row_index)
    cols = sorted({c for _, c in wells})
    plate = {
        "name": image,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": str(c)} for c in cols],
        "wells": [
            {"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)}
            for r, c in sorted(wells, key=lambda rc: (row_index(rc[0]), rc[1]))
        ],
        "field_count": max(len(f) for f in wells.values()),
        "version": "0.5",
    }
    group = root / image
    _write_group(group, {"ome": {"version": "0.5", "plate": plate}})
    for r in rows:
        _write_group(group / r, {})
    for (r, c), fields in wells.items():
        well = {"images": [{"path": str(f)} for f in sorted(fields)], "version": "0.5"}
        _write_group(group / r / str(c), {"ome": {"version": "0.5", "well": well}})


def _write_group(path: Path, attrs: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    node = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    _write_atomic(path / "zarr.json", json.dumps(node, indent=1))


def ome_xml(series: list[Series]) -> str:
    """The OME-XML napari-ome-zarr and Bio-Formats read a collection's series from.

    One ``<Image ID="Image:N">`` per series ``N`` (metadata only: the pixels are the
    series' arrays), with its name, pixel type, sizes, channel names, physical
    sizes and, for a run of several positions, its stage position.
    """
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" Creator="scopestream">',
    ]
    for s in series:
        i = s.path
        t, c, z, y, x = s.shape
        parts.append(f'<Image ID="Image:{i}" Name={quoteattr(s.name)}>')
        if s.stage is not None:
            coords = "".join(
                f' {axis}="{v:g}"'
                for axis, v in (("X", s.stage.x_um), ("Y", s.stage.y_um), ("Z", s.stage.z_um))
                if v is not None
            )
            parts.append(f"<StageLabel Name={quoteattr(s.stage.name)}{coords}/>")
        parts.append(
            f'<Pixels ID="Pixels:{i}" DimensionOrder="XYZCT" '
            f'Type="{_OME_TYPES.get(s.dtype, s.dtype)}" SizeX="{x}" SizeY="{y}" SizeZ="{z}" '
            f'SizeC="{c}" SizeT="{t}" PhysicalSizeX="{s.pixel_size_um:g}" '
            f'PhysicalSizeY="{s.pixel_size_um:g}" PhysicalSizeZ="{s.z_step_um:g}">'
        )
        for k, ch in enumerate(s.channels):
            parts.append(
                f'<Channel ID="Channel:{i}:{k}" Name={quoteattr(ch)} SamplesPerPixel="1"/>'
            )
        parts.append("<MetadataOnly/></Pixels></Image>")
    parts.append("</OME>")
    return "\n".join(parts) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
