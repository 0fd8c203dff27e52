"""Training data: what the pipeline saved (OME-Zarr runs) or TIFF pairs, as patches.

Sources
    An OME-Zarr run: an input channel and target channels of the raw image
    (``--input-channel brightfield --target-channel nuclei``), a target taken
    from another image of the run (``truth:nuclei``, ``denoise:nuclei``), or no
    target at all (self-supervised). TIFF / OME-TIFF files or folders of them,
    inputs and targets matched by name.
Splits
    Never by neighbouring frames of one field (they are nearly the same image,
    so a split that separates them leaks). With several files or positions the
    split is by file; within one field of view it is by spatial block: the frame
    is cut into a grid of blocks, whole blocks (over all time points) go to
    train, validation or test, and patches never cross a block edge.
Patches
    Random, weighted towards foreground (the brighter of two candidates, half
    the time), flipped and rotated by multiples of 90°, from arrays kept in
    memory when they fit and read chunk-wise from zarr otherwise. ``2d``
    patches are one plane; ``2.5d-z`` patches are a window of neighbouring
    z-planes of one stack (as channels) with the centre plane's targets; ``3d``
    patches are sub-volumes of one stack, targets alike. A window never crosses
    from one stack (time point) into the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Training data that cannot be used as asked."""


#: keep a channel of a run in memory up to this size; larger ones are read chunk-wise
IN_MEMORY_BYTES = 4 * 2**30


@dataclass
class FieldData:
    """One field of view: ``input`` and ``targets`` are (N, Y, X) arrays (or lazy zarr arrays)."""

    name: str
    input: Any
    targets: list[Any] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    z: int = 1  # planes per stack: frame i is plane i % z of stack i // z
    #: what is known of how the input was acquired (the model's `Fingerprint`):
    #: ``channels`` (name, preset), ``pixel_size_um``, ``exposures_ms``, ``dtype``
    context: dict[str, Any] = field(default_factory=dict)
    #: target channels this field does not have (their planes are NaN: no loss, no
    #: normalization statistics, no evaluation), when a run lacks some of several stains
    missing_targets: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        """Frame size."""
        return int(self.input.shape[-2]), int(self.input.shape[-1])

    @property
    def n(self) -> int:
        """Frames in this field."""
        return int(self.input.shape[0])


def _frames_of(arr: Any, channel: int) -> Any:
    """(t, c, z, y, x) zarr array → (t·z, y, x) of one channel (lazily when it is large)."""
    t, _, z, y, x = arr.shape
    nbytes = t * z * y * x * arr.dtype.itemsize
    if nbytes <= IN_MEMORY_BYTES:
        return np.asarray(arr[:, channel]).reshape(t * z, y, x)
    return LazyPlanes(arr, channel)


class LazyPlanes:
    """(t·z, y, x) view of one channel of a zarr array; reads only what is indexed.

    It is indexed like the in-memory array it stands for: ``planes[i]``,
    ``planes[a:b]``, ``planes[[i, j]]`` (or a boolean mask), each optionally
    followed by y and x slices or integers (``planes[i, ys, xs]``). Every read is
    one plane of the zarr array at a time (a frame is its own chunk), so a large
    run is never loaded whole. `take` drops planes (frames never acquired)
    without reading any.

    Parameters
    ----------
    arr
        A ``(t, c, z, y, x)`` zarr array.
    channel
        The channel (index along ``c``) this view shows.
    planes
        Which planes of ``arr`` (as ``t·z + z`` indices) the view's frames are;
        all of them when ``None``.
    """

    def __init__(self, arr: Any, channel: int, planes: np.ndarray | None = None) -> None:
        self.arr, self.c = arr, channel
        t, _, z, y, x = arr.shape
        self._z = int(z)
        self._planes = np.arange(t * z) if planes is None else np.asarray(planes, np.int64)
        self.shape = (len(self._planes), int(y), int(x))
        self.dtype = arr.dtype
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: np.ndarray) -> LazyPlanes:
        """The frames ``idx`` (integer indices) of this view, still lazy."""
        return LazyPlanes(self.arr, self.c, self._planes[np.asarray(idx, np.int64)])

    def _plane(self, p: int, ys: Any, xs: Any) -> np.ndarray:
        return np.asarray(self.arr[p // self._z, self.c, p % self._z, ys, xs])

    def __getitem__(self, key: Any) -> np.ndarray:
        parts = key if isinstance(key, tuple) else (key,)
        if not 1 <= len(parts) <= 3 or any(k is Ellipsis or k is None for k in parts):
            raise IndexError(
                f"lazy planes take [frames], [frames, y] or [frames, y, x], got {key!r}"
            )
        first, rest = parts[0], parts[1:]
        if isinstance(first, (int, np.integer)):
            # numpy's own bounds check and negative indices
            return self._plane(int(self._planes[first]), *rest, *(slice(None),) * (2 - len(rest)))
        yx = (*rest, *(slice(None),) * (2 - len(rest)))
        chosen = self._planes[first]  # a slice, integer array or boolean mask of frames
        if chosen.ndim != 1:
            raise IndexError(f"lazy planes take a 1-D selection of frames, got {first!r}")
        # the shape one plane's (y, x) selection has, without reading or allocating a frame
        plane_shape = np.broadcast_to(np.empty((), self.dtype), self.shape[1:])[yx].shape
        out = np.empty((len(chosen), *plane_shape), self.dtype)
        for j, p in enumerate(chosen):
            out[j] = self._plane(int(p), *yx)
        return out


def _take(frames: Any, idx: np.ndarray) -> Any:
    """Frames ``idx`` of an in-memory or lazy (N, Y, X) array (lazy stays lazy)."""
    if isinstance(frames, LazyPlanes):
        return frames.take(idx)
    return np.asarray(frames)[idx]


def _channel_index(names: list[str], wanted: str, where: str) -> int:
    if wanted not in names:
        raise DataError(f"{where} has no channel {wanted!r}; it has {names}")
    return names.index(wanted)


def _complete_mask(group: Path) -> np.ndarray | None:
    from scopestream.streaming.saved_run import complete_frames

    try:
        flags = complete_frames(group)
    except (OSError, KeyError, ValueError):
        return None
    return flags


def load_run(
    run: str | Path, input_channel: str | None = None, target_channels: list[str] | None = None
) -> FieldData:
    """The field of a scopestream run of one position (see `load_run_fields`)."""
    from scopestream.streaming.saved_run import SavedRun

    try:
        SavedRun(run).only_raw("load_run (use load_run_fields)")
    except ValueError as e:
        raise DataError(str(e)) from None
    (field,) = load_run_fields(run, input_channel, target_channels)
    return field


def load_run_fields(
    run: str | Path,
    input_channel: str | None = None,
    target_channels: list[str] | None = None,
    *,
    allow_missing: bool = False,
) -> list[FieldData]:
    """Every field (position) of a scopestream OME-Zarr run, one `FieldData` each.

    ``input_channel`` is a raw channel; targets are ``[image:]channel`` (an output or
    truth image's channel of the same field, or a raw channel). Frames a field never
    completed are left out of its data. Fields are the unit of the train/validation
    split's regions, so frames of one field never straddle it with another's.
    ``allow_missing``: a target channel the run does not have is all-NaN for it (listed
    in `FieldData.missing_targets`) instead of an error, as long as it has one."""
    from scopestream.streaming.saved_run import SavedRun

    path = Path(run)
    saved = SavedRun(path)
    raws = sorted((im for im in saved.images if im.name == "raw"), key=lambda im: im.p)
    several = len(raws) > 1
    return [
        _load_field(
            saved,
            im.path,
            im.p,
            input_channel,
            target_channels,
            f"{path.name}@{im.position}" if several else path.name,
            allow_missing,
        )
        for im in raws
    ]


def _load_field(
    saved: Any,
    raw_group: Path,
    p: int,
    input_channel: str | None,
    target_channels: list[str] | None,
    name: str,
    allow_missing: bool = False,
) -> FieldData:
    import zarr

    path = saved.path
    root: Any = zarr.open_group(str(raw_group), mode="r")
    names = [c["label"] for c in root.attrs.asdict()["ome"]["omero"]["channels"]]
    raw: Any = root["0"]
    if input_channel is None:
        if len(names) != 1:
            raise DataError(f"{path} has channels {names}: choose one with --input-channel")
        input_channel = names[0]
    ci = _channel_index(names, input_channel, str(path))
    inp = _frames_of(raw, ci)
    complete = _complete_mask(raw_group)
    keep = None if complete is None else complete[:, ci].reshape(-1)
    targets: list[Any] = []
    tnames: list[str] = []
    missing: list[str] = []
    for spec in target_channels or []:
        image, _, chan = spec.rpartition(":")
        try:
            image_path = saved.image(image, p).path if image else raw_group
            group: Any = zarr.open_group(str(image_path), mode="r")
            tnames_all = [c["label"] for c in group.attrs.asdict()["ome"]["omero"]["channels"]]
            where = f"{path}/{image}" if image else str(path)
            ct = _channel_index(tnames_all, chan, where)
        except (KeyError, DataError) as e:
            if not allow_missing:
                raise DataError(str(e.args[0])) from None
            # this run has no such stain: NaN planes, masked out of the loss
            targets.append(np.broadcast_to(np.float32(np.nan), inp.shape))
            tnames.append(chan)
            missing.append(chan)
            continue
        targets.append(_frames_of(group["0"], ct))
        tnames.append(chan)
        tc = _complete_mask(image_path)
        if tc is not None:
            tk = tc[:, ct].reshape(-1)
            keep = tk if keep is None else keep & tk
    if target_channels and len(missing) == len(target_channels):
        raise DataError(f"{path} has none of the target channels {target_channels}")
    context = _acquisition_context(saved, raw_group, root, ci, input_channel, p)
    z = int(raw.shape[2])
    if keep is not None and z > 1:
        # a stack with a missing plane is dropped whole (windows stay within one stack)
        keep = np.repeat(keep.reshape(-1, z).all(axis=1), z)
    if keep is not None and not keep.all():
        idx = np.flatnonzero(keep)  # frames never acquired are not training data
        inp = _take(inp, idx)
        targets = [_take(t, idx) for t in targets]
    return FieldData(name, inp, targets, tnames, z=z, context=context, missing_targets=missing)


def _acquisition_context(
    saved: Any, raw_group: Path, root: Any, ci: int, channel: str, p: int
) -> dict[str, Any]:
    """How a run's input channel was acquired, as far as its attributes and frames say."""
    from scopestream.streaming.frame_index import read_frame_index

    ctx: dict[str, Any] = {"channels": [channel], "dtype": str(root["0"].dtype)}
    try:
        scale = root.attrs.asdict()["ome"]["multiscales"][0]["datasets"][0][
            "coordinateTransformations"
        ][0]["scale"]
        ctx["pixel_size_um"] = float(scale[-1])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    try:
        plan = saved.attrs["source"]["plan"]["channels"]
        presets = [c.get("config") or c.get("preset") for c in plan if c.get("name") == channel]
        ctx["channels"] += [str(x) for x in presets if x and x != channel]
    except (KeyError, TypeError, AttributeError):
        pass
    try:
        table = read_frame_index(raw_group)
        if table is not None:
            sel = table[table["c"] == ci]
            ctx["exposures_ms"] = sorted({float(e) for e in sel["exposure_ms"] if e > 0})
    except (OSError, KeyError, ValueError):
        pass
    return ctx


def _tiff_stack(path: Path) -> tuple[np.ndarray, int]:
    """(planes, y, x) and the planes per stack: (Z,Y,X) is one stack, (T,Z,Y,X) T stacks."""
    import tifffile

    a = tifffile.imread(path)
    if a.ndim < 2:
        raise DataError(f"{path} is not an image")
    z = 1 if a.ndim == 2 else int(a.shape[-3])
    return a.reshape(-1, a.shape[-2], a.shape[-1]), z


def _files(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix.lower() in (".tif", ".tiff"))
    return [p]


def load_tiff_pairs(inputs: str | Path, targets: str | Path | None = None) -> list[FieldData]:
    """Fields from TIFF files or folders.

    Two folders: inputs and targets paired by file name, the target channel named
    after the targets' folder. Two files: they are one pair, the target channel named
    after the target file (``nuclei.tif``: ``nuclei``).
    """
    ins = _files(Path(inputs))
    if not ins:
        raise DataError(f"no TIFF files in {inputs}")
    if targets is None:
        out = []
        for f in ins:
            a, z = _tiff_stack(f)
            out.append(FieldData(f.stem, a, z=z, context={"dtype": str(a.dtype)}))
        return out
    single = not Path(inputs).is_dir() and not Path(targets).is_dir()
    if single:  # two files: they are the pair, whatever their names; the target names it
        tgts = {ins[0].name: Path(targets)}
        target_name = Path(targets).name.split(".")[0]
    else:
        tgts = {f.name: f for f in _files(Path(targets))}
        target_name = ""
    missing = [f.name for f in ins if f.name not in tgts]
    if missing:
        raise DataError(
            f"no target for {missing} in {targets} (files in folders are paired by name)"
        )
    fields = []
    for f in ins:
        (a, z), (b, _) = _tiff_stack(f), _tiff_stack(tgts[f.name])
        if a.shape != b.shape:
            raise DataError(
                f"{f.name}: input {a.shape} and target {b.shape} differ; crop them to the same "
                "shape (or pair other files)"
            )
        name = target_name or tgts[f.name].parent.name
        fields.append(FieldData(f.stem, a, [b], [name], z=z, context={"dtype": str(a.dtype)}))
    return fields


@dataclass(frozen=True)
class Region:
    """A block of one field (all its frames): the unit of the train/val/test split."""

    field: int
    y: slice
    x: slice


def split_regions(
    fields: list[FieldData],
    patch: int,
    seed: int = 0,
    fractions: tuple[float, float] = (0.15, 0.15),
) -> dict[str, list[Region]]:
    """Train/val/test by file when there are enough, else by spatial blocks of each field."""
    rng = np.random.default_rng(seed)
    if len(fields) >= 3:
        order = rng.permutation(len(fields))
        n_val = max(1, round(fractions[0] * len(fields)))
        n_test = max(1, round(fractions[1] * len(fields)))
        whole = [
            Region(i, slice(0, f.shape[0]), slice(0, f.shape[1])) for i, f in enumerate(fields)
        ]
        return {
            "val": [whole[i] for i in order[:n_val]],
            "test": [whole[i] for i in order[n_val : n_val + n_test]],
            "train": [whole[i] for i in order[n_val + n_test :]],
        }
    blocks: list[Region] = []
    for i, f in enumerate(fields):
        h, w = f.shape
        size = max(patch, min(h, w) // 4)
        ny, nx = h // size, w // size
        if ny * nx < 3:
            raise DataError(
                f"{f.name} ({h}×{w}) is too small to split into train/validation/test blocks of "
                f"{size}×{size}: give larger frames, several files, or a smaller --patch"
            )
        blocks += [
            Region(i, slice(by * size, (by + 1) * size), slice(bx * size, (bx + 1) * size))
            for by in range(ny)
            for bx in range(nx)
        ]
    order = rng.permutation(len(blocks))
    n_val = max(1, math.floor(fractions[0] * len(blocks)))
    n_test = max(1, math.floor(fractions[1] * len(blocks)))
    return {
        "val": [blocks[i] for i in order[:n_val]],
        "test": [blocks[i] for i in order[n_val : n_val + n_test]],
        "train": [blocks[i] for i in order[n_val + n_test :]],
    }


def _augment(arrs: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrs:
        b = np.rot90(a, k, axes=(-2, -1))
        if flip:
            b = b[..., ::-1]
        out.append(np.ascontiguousarray(b))
    return out


class PatchSampler:
    """Draws (input, targets) patches from regions; deterministic for a given index."""

    def __init__(
        self,
        fields: list[FieldData],
        regions: list[Region],
        patch: int,
        *,
        seed: int = 0,
        augment: bool = True,
        foreground: bool = True,
        spatial: str = "2d",
        window: int = 1,
    ) -> None:
        if not regions:
            raise DataError("no data left for this split")
        self.fields, self.regions, self.patch = fields, regions, patch
        self.seed, self.augment, self.foreground = seed, augment, foreground
        self.spatial, self.window = spatial, window if spatial != "2d" else 1
        if spatial not in ("2d", "2.5d-z", "3d"):
            raise DataError(f"spatial mode must be 2d, 2.5d-z or 3d, got {spatial!r}")
        for f in fields:
            if self.window > f.z:
                raise DataError(
                    f"{f.name} has stacks of {f.z} z-plane(s): too few for {spatial} patches of "
                    f"{self.window} planes (record a z-stack, or use a smaller --window)"
                )
        for r in regions:
            if r.y.stop - r.y.start < patch or r.x.stop - r.x.start < patch:
                raise DataError(
                    f"patch {patch} does not fit in a region of {fields[r.field].name}"
                )

    def _candidate(self, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
        r = self.regions[int(rng.integers(len(self.regions)))]
        f = self.fields[r.field]
        y = int(rng.integers(r.y.start, r.y.stop - self.patch + 1))
        x = int(rng.integers(r.x.start, r.x.stop - self.patch + 1))
        ys, xs = slice(y, y + self.patch), slice(x, x + self.patch)
        if self.spatial == "2d":
            i = int(rng.integers(f.n))
            return np.asarray(f.input[i, ys, xs], np.float32), [
                np.asarray(t[i, ys, xs], np.float32) for t in f.targets
            ]
        stack = int(rng.integers(f.n // f.z)) * f.z
        first = stack + int(rng.integers(f.z - self.window + 1))
        planes = range(first, first + self.window)
        inp = np.stack([np.asarray(f.input[k, ys, xs], np.float32) for k in planes])
        if self.spatial == "2.5d-z":  # the centre plane's targets
            c = first + self.window // 2
            return inp, [np.asarray(t[c, ys, xs], np.float32) for t in f.targets]
        return inp, [
            np.stack([np.asarray(t[k, ys, xs], np.float32) for k in planes]) for t in f.targets
        ]

    def sample(self, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """One patch: input (P, P) (2d) or (W, P, P), targets (P, P) or (W, P, P) (3d)."""
        rng = np.random.default_rng((self.seed, index))
        x, ys = self._candidate(rng)
        if self.foreground and rng.random() < 0.5:
            x2, ys2 = self._candidate(rng)
            ref, ref2 = (ys[0], ys2[0]) if ys else (x, x2)
            if ref2.mean() > ref.mean():
                x, ys = x2, ys2
        if self.augment:
            x, *ys = _augment([x, *ys], rng)
        return x, ys
