"""One reader of saved runs: images, channels, complete frames, per-frame metadata, status.

`SavedRun` is what ``scopestream view``, ``report``, ``inspect``, ``replay:``,
``predict`` and training read a run through (a run finished, failed, stopped,
or cut off by a crash). It reads the store's own files only (``zarr.json``,
chunk file names, ``frames.npy``, ``timeline.json``) and never imports the
packages above the core.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.streaming.collection import OME_DIR
from scopestream.streaming.frame_index import read_frame_index
from scopestream.streaming.layout import Position
from scopestream.streaming.store_lock import is_locked, read_lock_info

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

#: the per-second timeline of a finished run (written by the run's store at its end)
TIMELINE_FILE = "timeline.json"


def read_group_attrs(path: Path) -> dict[str, Any]:
    """Attributes of the zarr v3 group at ``path``."""
    meta = json.loads((path / "zarr.json").read_text())
    if meta.get("node_type") != "group":
        raise ValueError(f"{path} is not a zarr group")
    attrs: dict[str, Any] = meta.get("attributes", {})
    return attrs


@dataclass(frozen=True)
class SavedImage:
    """One image of a run: a model output / truth, or the root image (``name`` ``"raw"``).

    The root image holds the raw frames of a run, or the model's output in a store
    written by ``scopestream predict`` (then ``kind`` is ``prediction``).
    """

    name: str
    path: Path
    channels: tuple[str, ...]
    shape: tuple[int, ...]  # (t, c, z, y, x)
    kind: str  # raw | prediction | ground truth
    provenance: dict[str, Any]
    p: int = 0  # the position (field) it shows
    position: str | None = None  # the position's name in a run of several

    @property
    def attrs(self) -> dict[str, Any]:
        """The image group's ``scopestream`` attributes (re-read: a run may be growing)."""
        sc: dict[str, Any] = read_group_attrs(self.path).get("scopestream") or {}
        return sc

    @property
    def status(self) -> str:
        """The image's recorded status."""
        return str(self.attrs.get("status", "unknown"))

    def complete(self) -> np.ndarray:
        """Which frames (t, c, z) are completely on disk."""
        return complete_frames(self.path)

    def frame_index(self) -> np.ndarray:
        """Every frame's recorded metadata (``frames.npy``; empty for older runs)."""
        return read_frame_index(self.path)

    def array(self) -> Any:
        """The pixels, (t, c, z, y, x), as a read-only zarr array."""
        import zarr

        return zarr.open_array(str(self.path / "0"), mode="r")


def output_kind(task: str) -> str:
    """How a model's output is labelled: ``denoised`` or ``predicted`` (a stain)."""
    return "denoised" if task == "denoise" else "predicted"


def layer_name(kind: str, channel: str, position: str | None = None) -> str:
    """``nuclei (raw)``, ``nuclei (denoised)``, ``membrane (predicted)``, ``nuclei (truth)``;
    ``nuclei (raw) @ A1_0000`` in a run of several positions."""
    name = f"{channel} ({kind})"
    return name if position is None else f"{name} @ {position}"


def display_kind(image: SavedImage) -> str:
    """``raw``, ``truth``, ``denoised``, ``predicted`` or ``spread``: what an image's
    layers are called."""
    return "raw" if image.kind == "raw" else provenance_kind(image.provenance)


def provenance_kind(prov: Mapping[str, Any]) -> str:
    """What an output image's provenance says it holds: ``truth``, ``spread`` (a flip
    ensemble's, ``--uncertainty``), or a model's ``denoised`` / ``predicted``."""
    if prov.get("kind") == "ground truth":
        return "truth"
    if prov.get("kind") == "uncertainty":
        return "spread"
    return output_kind(str(prov.get("task", "stain")))


@dataclass(frozen=True)
class SavedChannel:
    """One channel of one image: what a viewer layer or a report panel shows."""

    name: str  # the layer name, e.g. "nuclei (denoised)"
    kind: str
    channel: str
    image: SavedImage
    c: int
    complete_t: list[int]  # time points with at least one complete plane

    def plane(self, t: int) -> np.ndarray:
        """The (middle z-plane of the) frame at time point ``t``, float32."""
        arr = self.image.array()
        n_z = int(arr.shape[2])
        return np.asarray(arr[t, self.c, n_z // 2], np.float32)


class SavedRun:
    """A scopestream run on disk (see the module docstring).

    Raises `FileNotFoundError` / `ValueError` for a path that is not a run store.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"{self.path} is not an OME-Zarr store (no zarr.json)")
        root = read_group_attrs(self.path)
        if "ome" not in root:
            raise ValueError(f"{self.path} has no OME-Zarr image at its root")
        self.root_attrs = root
        #: a ``bioformats2raw.layout`` collection of series (runs since the collection
        #: layout); else one image at the root with outputs as child groups (older runs)
        self.is_collection = "bioformats2raw.layout" in (root.get("ome") or {})

    @property
    def attrs(self) -> dict[str, Any]:
        """The run's ``scopestream`` attributes ({} for other OME-Zarr stores)."""
        sc: dict[str, Any] = self.root_attrs.get("scopestream") or {}
        return sc

    @property
    def is_scopestream(self) -> bool:
        """Whether scopestream wrote it (else a plain OME-Zarr image)."""
        return bool(self.attrs)

    @property
    def status(self) -> str:
        """The run's recorded status (acquiring, complete, stopped, failed, aborted)."""
        return str(self.attrs.get("status", "unknown"))

    @property
    def summary(self) -> dict[str, Any]:
        """The final run summary ({} while acquiring or after a crash)."""
        out: dict[str, Any] = self.attrs.get("summary") or {}
        return out

    @property
    def timeline(self) -> dict[str, Any] | None:
        """The per-second timeline, if the run ended cleanly."""
        old = self.summary.get("timeline")  # runs recorded before it had its own file
        if old is not None:
            return dict(old)
        path = self.path / TIMELINE_FILE
        if path.is_file():
            out: dict[str, Any] = json.loads(path.read_text())
            return out
        return None

    @property
    def prediction(self) -> dict[str, Any] | None:
        """The provenance of a ``scopestream predict`` store (its root image is the output)."""
        prov = self.attrs.get("prediction")
        return {"kind": "prediction", **prov} if isinstance(prov, dict) else None

    @cached_property
    def images(self) -> list[SavedImage]:
        """Every image: the raw one of each position first, then every output's.

        A collection lists its series in ``scopestream.series`` (or, written by
        another tool, in ``OME/zarr.json``); an older run is the root image with
        its outputs as child groups.
        """
        if self.is_collection:
            return self._series_images()
        provenance = self.attrs.get("outputs") or {}
        out = [self._image("raw", self.path, self.prediction or {"kind": "raw"})]
        names = list(provenance)
        for d in sorted(p for p in self.path.iterdir() if p.is_dir()):
            if d.name not in names and (d / "zarr.json").exists():
                names.append(d.name)
        for name in names:
            group = self.path / name
            zj = group / "zarr.json"
            if not zj.exists():
                continue
            node = json.loads(zj.read_text())
            if node.get("node_type") != "group":  # the raw image's own array ("0")
                continue
            attrs = node.get("attributes", {})
            if "ome" not in attrs:
                continue
            prov = provenance.get(name) or (attrs.get("scopestream") or {}).get("prediction")
            out.append(self._image(name, group, dict(prov or {"kind": "prediction"})))
        return out

    def _series_images(self) -> list[SavedImage]:
        provenance = self.attrs.get("outputs") or {}
        entries = self.attrs.get("series")
        if entries is None:  # a collection another tool wrote: its series list
            try:
                listed = read_group_attrs(self.path / "OME").get("ome", {}).get("series", [])
            except (OSError, ValueError):
                listed = []
            entries = [{"path": str(k), "image": "raw" if i == 0 else str(k), "p": 0}
                       for i, k in enumerate(listed)]
        out = []
        for e in entries:
            group = self.path / str(e["path"])
            if not (group / "0" / "zarr.json").exists():
                continue  # a series whose array was never created (a crash at the start)
            name = str(e.get("image", e["path"]))
            if name == "raw":
                prov: dict[str, Any] = self.prediction or {"kind": "raw"}
            else:
                attrs = (read_group_attrs(group).get("scopestream") or {}).get("prediction")
                prov = dict(provenance.get(name) or attrs or {"kind": "prediction"})
            im = self._image(name, group, prov)
            pos = e.get("position")
            where = None if pos is None else str(pos)
            out.append(replace(im, p=int(e.get("p", 0)), position=where))
        return out

    def only_raw(self, reader: str) -> SavedImage:
        """The raw image of a run of one position; ``ValueError`` (naming ``reader``, what
        cannot read several yet) for a run of several."""
        if self.n_positions > 1:
            raise ValueError(
                f"{self.path} holds {self.n_positions} positions; {reader} reads runs of one "
                "position so far"
            )
        return self.raw

    @property
    def n_positions(self) -> int:
        """Positions (fields) the run recorded."""
        return 1 + max((im.p for im in self.images), default=0)

    @property
    def positions(self) -> tuple[Position, ...]:
        """The run's positions (names, stage x/y/z, well and field), one per field.

        From the stream the run recorded; a collection written by another tool
        gets names from its series (and no stage coordinates)."""
        listed = (self.attrs.get("stream") or {}).get("positions") or []
        if listed:
            return tuple(Position.from_json(d) for d in listed)
        names: dict[int, str] = {}
        for im in self.images:
            names.setdefault(im.p, im.position or str(im.p))
        n = self.n_positions
        return tuple(Position(names.get(p, str(p))) for p in range(n)) if n > 1 else ()

    def _image(self, name: str, group: Path, prov: dict[str, Any]) -> SavedImage:
        attrs = read_group_attrs(group)
        ome = attrs.get("ome", attrs)
        channels = tuple(
            str(c.get("label", f"c{i}"))
            for i, c in enumerate((ome.get("omero") or {}).get("channels", []))
        )
        meta = json.loads((group / "0" / "zarr.json").read_text())
        kind = str(prov.get("kind", "prediction"))
        return SavedImage(name, group, channels, tuple(int(n) for n in meta["shape"]), kind, prov)

    def image(self, name: str, p: int = 0) -> SavedImage:
        """The image called ``name`` (``raw`` for the raw image) at position ``p``."""
        for im in self.images:
            if im.name == name and im.p == p:
                return im
        have = sorted({i.name for i in self.images})
        raise KeyError(f"{self.path} has no image {name!r} at position {p}; it has {have}")

    @property
    def raw(self) -> SavedImage:
        """The raw frames of the first position (or a ``predict`` store's output)."""
        return self.images[0]

    def channels(self) -> list[SavedChannel]:
        """Every channel of every image, raw first (one chunk listing per image)."""
        out = []
        for im in self.images:
            try:
                flags = im.complete()
            except (OSError, KeyError, ValueError):
                flags = np.zeros((0, len(im.channels), 1), bool)
            per_c = np.any(flags, axis=-1) if flags.size else np.zeros((0, len(im.channels)))
            kind = display_kind(im)
            for c, ch in enumerate(im.channels):
                done = [int(t) for t in np.flatnonzero(per_c[:, c])] if c < per_c.shape[1] else []
                name = layer_name(kind, ch, im.position)
                out.append(SavedChannel(name, kind, ch, im, c, done))
        return out


@dataclass
class ImageReport:
    """What one image of a saved run holds."""

    name: str
    shape: tuple[int, ...]
    frames_complete: int
    status: str


@dataclass
class RunReport:
    """What a saved (or interrupted) run holds; see `inspect_run`."""

    path: str
    status: str
    interrupted: bool
    frames_expected: int | None
    frames_complete: int
    images: list[ImageReport] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "path": self.path,
            "status": self.status,
            "interrupted": self.interrupted,
            "frames_expected": self.frames_expected,
            "frames_complete": self.frames_complete,
            "images": [vars(i) | {"shape": list(i.shape)} for i in self.images],
            "error": self.error,
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete_frames(group: str | os.PathLike[str]) -> np.ndarray:
    """Which frames (t, c, z) of an image group are completely on disk.

    A frame is complete when every chunk file of it exists (chunks are renamed
    into place whole, and every frame is stored, dark ones too). Given a run of
    one position (the collection's root), its raw image.
    """
    group = Path(group)
    if (group / OME_DIR).is_dir() and not (group / "0" / "c").is_dir():
        group = SavedRun(group).only_raw("complete_frames (ask an image: .image(name, p))").path
    arr_dir = group / "0"
    meta = json.loads((arr_dir / "zarr.json").read_text())
    shape = meta["shape"]
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
    tiles = -(-shape[3] // chunk[3]) * -(-shape[4] // chunk[4])
    counts = np.zeros(shape[:3], dtype=np.int64)
    base = arr_dir / "c"
    for dirpath, _dirs, files in os.walk(base):
        rel = Path(dirpath).relative_to(base).parts
        if len(rel) != 4:
            continue
        for f in files:
            if f.isdigit():  # skip tensorstore's temporary '*.__lock' files
                t, c, z = int(rel[0]), int(rel[1]), int(rel[2])
                if t < shape[0] and c < shape[1] and z < shape[2]:
                    counts[t, c, z] += 1
    complete: np.ndarray = counts == tiles
    return complete


def inspect_run(path: str | os.PathLike[str]) -> RunReport:
    """Open a run store (finished, failed, or cut off by a crash) and count complete frames."""
    root = Path(path)
    attrs = SavedRun(root).attrs
    status = str(attrs.get("status", "unknown"))
    writer = attrs.get("writer", {})
    if status != "acquiring":
        interrupted = False
    elif read_lock_info(root) is not None:  # a writer holds its flock for its lifetime
        interrupted = is_locked(root) is None
    else:  # stores written before the lock: the recorded pid (fooled by pid reuse)
        interrupted = writer.get("host") == socket.gethostname() and not _pid_alive(
            int(writer.get("pid", -1))
        )
    images = []
    raw_complete = 0
    for im in SavedRun(root).images:
        flags = complete_frames(im.path)
        g_status = str(read_group_attrs(im.path).get("scopestream", {}).get("status", "unknown"))
        name = im.name if im.position is None else f"{im.name} @ {im.position}"
        images.append(ImageReport(name, im.shape, int(flags.sum()), g_status))
        if im.name == "raw":
            raw_complete += int(flags.sum())
    return RunReport(
        path=str(root),
        status="interrupted" if interrupted else status,
        interrupted=interrupted,
        frames_expected=attrs.get("frames_expected"),
        frames_complete=raw_complete,
        images=images,
        error=attrs.get("error"),
    )


def inspect_stores(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Which raw frames each store of one fanned-out stream holds, and whether together
    they hold every frame (``publish --receivers N``: each receiver records its share).

    The stores must come from one stream (the same publisher run id in their source).
    Returns per store the frames it holds, the union, frames held twice (never, in a
    sound fan-out), and what is missing against the plan and the publisher's own count.
    Raises `ValueError` for stores of different streams or layouts.
    """
    if not paths:
        raise ValueError("no store given")
    runs, stores, per_store = set(), [], []
    sent: int | None = None
    expected: int | None = None
    for path in paths:
        saved = SavedRun(path)
        src = saved.attrs.get("source") or {}
        runs.add(str(src.get("run", "")))
        counters = (saved.summary.get("source_counters") or {}) if saved.summary else {}
        if isinstance(counters.get("sent"), int) and counters["sent"] >= 0:
            sent = int(counters["sent"])
        expected = saved.attrs.get("frames_expected", expected)
        raws = sorted((im for im in saved.images if im.name == "raw"), key=lambda im: im.p)
        flags = [complete_frames(im.path) for im in raws]
        stores.append(flags)
        per_store.append({"path": str(path), "status": saved.status,
                          "frames": int(sum(int(f.sum()) for f in flags))})  # fmt: skip
    if len(runs) != 1 or "" in runs:
        raise ValueError(
            "these stores are not of one stream (their publisher run ids differ or are "
            f"missing: {sorted(runs)})"
        )
    n_p = {len(f) for f in stores}
    shapes = {fl.shape[1:] for f in stores for fl in f}
    if len(n_p) != 1 or len(shapes) != 1:
        raise ValueError("these stores differ in positions, channels or planes")
    n_t = max(fl.shape[0] for f in stores for fl in f)
    count = np.zeros((n_p.pop(), n_t, *shapes.pop()), np.int32)
    for f in stores:
        for p, fl in enumerate(f):
            count[p, : fl.shape[0]] += fl
    union = int((count > 0).sum())
    twice = int((count > 1).sum())
    missing_plan = None if expected is None else int(expected) - union
    missing_sent = None if sent is None else sent - union
    return {
        "run": runs.pop(),
        "stores": per_store,
        "frames_union": union,
        "frames_held_twice": twice,
        "frames_expected": expected,
        "frames_sent": sent,
        "missing_vs_plan": missing_plan,
        "missing_vs_sent": missing_sent,
        "complete": twice == 0
        and (missing_sent == 0 if sent is not None else missing_plan == 0),
    }
