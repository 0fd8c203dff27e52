"""The versioned run configuration (YAML on disk, saved into every run's attributes).

A user-written file is strict (``extra="forbid"``): a misspelt key is an error,
never a silent default. Command-line flags override the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The plan's bounds are the config's too (``scopestream.config.MAX_...``): re-exported.
from scopestream.acquisition.plan import MAX_CHANNELS as MAX_CHANNELS
from scopestream.acquisition.plan import MAX_TIME_POINTS as MAX_TIME_POINTS
from scopestream.acquisition.plan import MAX_Z_PLANES as MAX_Z_PLANES
from scopestream.acquisition.plan import AcquisitionPlan

CONFIG_VERSION = 1

# Upper bounds no real microscope reaches. They turn a typo (an extra zero, ``1e11``)
# into an error up front instead of an allocation that fails minutes into the run.
MAX_FRAME_SIDE = 16384
"""Pixels per side of a frame: the largest scientific cameras are about 14k wide."""
MAX_FRAMES = 100_000_000
"""Frames of one run: 100 frames/s for more than 11 days."""
MAX_BUFFER_MB = 1_048_576.0
"""Ring buffer memory (1 TiB)."""
MAX_CONFIG_BYTES = 1_000_000
"""Size of a config file, and of what its YAML aliases may expand to (characters)."""

if TYPE_CHECKING:
    from collections.abc import Callable


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used."""


def parse_shape(value: object, max_side: int = MAX_FRAME_SIDE) -> tuple[int, int]:
    """``"512x512"``, ``512`` or ``[512, 512]`` → ``(512, 512)``.

    Each side must lie in ``1..max_side``; a larger frame is refused with the memory
    one 16-bit frame of it would take.
    """
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", value) or re.fullmatch(
            r"\s*(\d+)\s*", value
        )
        if not m:
            raise ValueError(f"shape must look like 512x512, got {value!r}")
        nums = [int(g) for g in m.groups()]
        value = nums if len(nums) == 2 else nums * 2
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        h, w = int(value[0]), int(value[1])
        if h < 1 or w < 1:
            raise ValueError(f"shape must be positive, got {h}x{w}")
        if h > max_side or w > max_side:
            raise ValueError(
                f"shape {h}x{w} is too large: one 16-bit frame would need "
                f"{_bytes(2 * h * w)}; each side may be at most {max_side}"
            )
        return h, w
    raise ValueError(f"shape must look like 512x512, got {value!r}")


def _bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a number ≥ 1."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{size:.1f} TiB"


class RunConfig(BaseModel):
    """Everything a run needs; the flags of ``scopestream run`` map onto these fields.

    Numbers must be finite, and sizes have upper bounds no real acquisition reaches
    (``MAX_FRAMES``, ``MAX_FRAME_SIDE``, ``MAX_TIME_POINTS``, ``MAX_Z_PLANES``,
    ``MAX_CHANNELS``, ``MAX_BUFFER_MB``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    version: Literal[1] = 1
    source: str = Field("sim", description="sim | replay:PATH | tcp://HOST:PORT")
    curve_server_key: str | None = Field(
        None, description="tcp sources: the publisher's CURVE public key (.key file or Z85)"
    )
    curve_secret: str | None = Field(
        None, description="tcp sources: this receiver's CURVE .key_secret file"
    )
    insecure: bool = Field(
        False, description="tcp sources: allow a non-loopback stream without CURVE keys"
    )
    heartbeat_s: float = Field(
        5.0, gt=0, le=3600, description="tcp sources: a publisher gone this long fails the run"
    )
    frames: int | None = Field(
        None,
        gt=0,
        le=MAX_FRAMES,
        description=f"stop after this many frames (at most {MAX_FRAMES:,})",
    )
    shape: tuple[int, int] = Field(
        (512, 512),
        description=f"frame size of the simulated camera, each side at most {MAX_FRAME_SIDE}",
    )
    fps: float | None = Field(None, ge=0, description="frame rate; 0 = as fast as possible")
    models: tuple[str, ...] = Field((), description="model names or paths; empty = none")
    out: str | None = Field(None, description="output OME-Zarr path")
    overwrite: bool = False
    viewer: bool = False
    buffer_mb: float = Field(
        512.0,
        gt=0,
        le=MAX_BUFFER_MB,
        description=f"ring buffer memory (MiB, at most {MAX_BUFFER_MB:,.0f})",
    )
    seed: int = 0
    plan: AcquisitionPlan = AcquisitionPlan()
    mda: str | None = Field(None, description="a useq-schema MDASequence YAML (instead of plan)")
    mm_dir: str | None = Field(None, description="Micro-Manager folder with device adapters")
    mm_save_dir: str | None = Field(None, description="let Micro-Manager save its own copy there")
    backend: Literal["auto", "tensorrt", "torch", "torch-cpu", "onnxruntime"] = "auto"
    registry: str | None = Field(
        None, description="model registry (default ~/.scopestream/models)"
    )
    model_policy: Literal["latest", "all"] = Field(
        "latest", description="latest: live, newest frame; all: every frame (catches up from disk)"
    )
    tile: str | None = Field(
        None, description="tile size HxW for inference (default: whole frame)"
    )
    calibrate: int = Field(
        0,
        ge=0,
        description=(
            "freeze input normalization from the first N frames of each field and "
            "channel (0: the model's)"
        ),
    )
    watch_registry: bool = Field(
        True, description="hot-swap newer versions of models named by name"
    )
    mm_hooks: dict[Literal["pre_hardware", "post_hardware"], str] = Field(
        default_factory=dict,
        description="pycromanager hooks as 'package.module:function' (get and return the event)",
    )
    sim_truth: bool = Field(False, description="record the simulator's noise-free truth too")
    sim_time_step_s: float | None = Field(
        None, gt=0, description="simulated time between time points (default: the plan's interval)"
    )
    sim_nuclei: str | None = Field(
        None, description="a real nuclei volume (TIFF, z/y/x) to texture the simulated sample"
    )
    sim_triggered_stage: bool = Field(
        False,
        description="the simulated XY stage is triggered (takes the fields' positions as a "
        "sequence, stepped by the camera, as ASI's ring buffer): many fields run as one burst",
    )
    border: Literal["zero", "reflect"] = Field(
        "zero",
        description="beyond the frame's edges the network sees zeros, or the frame mirrored by "
        "the halo (reflect: better borders, more pixels to predict)",
    )
    uncertainty: Literal["none", "tta", "tta8"] = Field(
        "none",
        description="a flip ensemble per prediction (tta: 2 members, tta8: 8, square frames): "
        "the output is its mean, its per-pixel spread a NAME_spread image, a score per frame",
    )

    @field_validator("shape", mode="before")
    @classmethod
    def _shape(cls, v: object) -> tuple[int, int]:
        return parse_shape(v)

    @model_validator(mode="after")
    def _plan_frames_bounded(self) -> RunConfig:
        p = self.plan
        if p.time_points is not None:
            n = p.time_points * p.n_positions * max(1, len(p.channels)) * p.z_planes
            # `frames` stops the run early, so only what is recorded counts.
            if n > MAX_FRAMES and (self.frames is None or self.frames > MAX_FRAMES):
                raise ValueError(
                    f"the plan acquires {n:,} frames "
                    "(time points × positions × channels × z-planes); "
                    f"at most {MAX_FRAMES:,}, or set frames"
                )
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            return tuple(m for m in v if str(m).lower() != "none")
        return v


def build_plan(cfg: RunConfig) -> AcquisitionPlan:
    """The plan the run acquires: ``mda`` (useq YAML) or ``plan``, resolved for ``frames``."""
    from scopestream.acquisition.plan import PlanError, mda_sizes

    try:
        if cfg.mda:
            import useq

            try:
                seq = useq.MDASequence.from_file(cfg.mda)
            except Exception as e:
                raise ConfigError(f"cannot read the MDA sequence {cfg.mda}: {e}") from None
            # Before reading it: a z plan of 10^9 planes would be listed in full.
            sizes = mda_sizes(seq)
            _check_plan_size(
                f"the MDA sequence {cfg.mda}",
                t=sizes.get("t", 0),
                p=sizes.get("p", 0),
                c=sizes.get("c", 0),
                z=sizes.get("z", 0),
                frames=cfg.frames,
            )
            return AcquisitionPlan.from_mda_sequence(seq).limited_to(cfg.frames)
        return cfg.plan.resolved(frames=cfg.frames, fps=cfg.fps)
    except PlanError as e:
        raise ConfigError(f"invalid plan: {e}") from None


def _check_plan_size(
    where: str, *, t: int, c: int, z: int, frames: int | None, p: int = 1
) -> None:
    """Refuse a plan beyond the documented limits (``frames`` caps the time points)."""
    from scopestream.acquisition.positions import MAX_POSITIONS

    for n, limit, what in (
        (p, MAX_POSITIONS, "positions"),
        (c, MAX_CHANNELS, "channels"),
        (z, MAX_Z_PLANES, "z-planes"),
        (t, MAX_TIME_POINTS, "time points"),
    ):
        if n > limit and not (what == "time points" and frames is not None):
            raise ConfigError(f"{where} has {n:,} {what}; at most {limit:,}")
    n_frames = max(1, t) * max(1, p) * max(1, c) * max(1, z)
    if frames is not None:
        n_frames = min(n_frames, frames)
    if n_frames > MAX_FRAMES:
        raise ConfigError(f"{where} acquires {n_frames:,} frames; at most {MAX_FRAMES:,}")


def resolve_hook(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function``."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"hook {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import hook {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"hook {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


class _ConfigLoader(yaml.SafeLoader):
    """YAML for run configs: YAML 1.2 core scalars, without YAML 1.1's surprises.

    PyYAML follows YAML 1.1, where ``0x512`` is the integer 1298, ``0755`` is 493,
    ``1:30`` is 90, ``yes``/``off`` are booleans and ``2024-01-01`` is a date. Here
    only plain decimal numbers are numbers (``1e6`` included, as in YAML 1.2;
    ``0755`` is 755), only ``true``/``false`` are booleans, and everything else
    stays a string, so ``shape: 0x512`` is refused as a shape instead of recording
    1298x1298, and ``frames: 1:30`` is refused instead of meaning 90.
    """

    yaml_implicit_resolvers = {}  # noqa: RUF012  (start empty: none of YAML 1.1's forms)


for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^[-+]?[0-9]+$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("merge", r"^(?:<<)$", "<"),
):
    _ConfigLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first)
    )


def _decimal_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    # PyYAML's own constructor would read ``0755`` as octal even once resolved.
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    try:
        return int(text, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal integer", node.start_mark
        ) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Characters and values the node stands for once every alias is expanded.

    An alias is a reference to an earlier node, so a few hundred bytes of nested
    anchors can stand for gigabytes (a "billion laughs"); the configuration is
    saved into the run's attributes as JSON, where every reference is written out.
    Sizes are memoised per node, so counting costs one pass over the file.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a YAML alias refers to itself (a recursive structure)")
        active.add(key)
        if isinstance(n, yaml.SequenceNode):
            children: list[yaml.Node] = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [part for kv in n.value for part in kv]
        else:
            children = []
        total = 1 + (len(n.value) if isinstance(n, yaml.ScalarNode) else 0)
        for child in children:
            total += size(child)
            if total > limit:
                raise ConfigError(
                    f"its YAML aliases (*name) expand it beyond {limit:,} characters; "
                    "write the values out instead of nesting anchors"
                )
        active.discard(key)
        sizes[key] = total
        return total

    return size(node)


def _load_yaml(text: str) -> Any:
    """Parse one YAML document with `_ConfigLoader`, refusing alias bombs before building."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, MAX_CONFIG_BYTES)
        return loader.construct_document(node)
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def _read_text(p: Path) -> str:
    """The file's text: UTF-8 (with or without a byte-order mark), at most ``MAX_CONFIG_BYTES``."""
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p} is larger than {MAX_CONFIG_BYTES:,} bytes: not a run config")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # What Windows editors and PowerShell's `>` write; say so rather than
        # guess at an encoding.
        raise ConfigError(f"{p} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); save it as UTF-8"
        ) from None


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run configuration.

    Raises
    ------
    ConfigError
        The file cannot be read, is not UTF-8 YAML, is too large or expands too far
        through aliases, or does not hold a valid configuration.
    """
    p = Path(path)
    text = _read_text(p)
    try:
        raw = _load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    except RecursionError:
        raise ConfigError(f"{p} nests too deeply to be a run config") from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of settings")
    return validate_config(raw, where=str(p))


def validate_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a mapping, turning pydantic's errors into one readable message."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top)"
            msg = "unknown setting (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"invalid {where}:\n" + "\n".join(lines)) from None


def merge(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """Apply command-line overrides field by field.

    Nested mappings merge key by key, so ``{"plan": {"z_planes": 5}}`` changes the
    plan's z-planes and keeps its channels, pairs and time points (and replaces
    explicit ``z_offsets_um``, see `_z_flags_replace`). Lists, tuples and scalars
    replace the value whole. Keys whose value is None are left alone, at every
    level: that is how a flag that was not given arrives.
    """
    data = _deep_merge(cfg.model_dump(), overrides)
    plan_flags = overrides.get("plan")
    if isinstance(plan_flags, Mapping) and isinstance(data.get("plan"), dict):
        data["plan"] = _z_flags_replace(data["plan"], plan_flags)
    return validate_config(data, where="flags")


def _z_flags_replace(plan: dict[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """A z-stack given by flags replaces the file's, whichever form each uses.

    ``z_planes`` / ``z_step_um`` flags over explicit ``z_offsets_um`` drop the
    offsets (the stack is planes × step again); ``z_offsets_um`` over ``z_planes``
    drops the planes (they are counted from the offsets).
    """
    given = {k for k, v in flags.items() if v is not None}
    out = dict(plan)
    if given & {"z_planes", "z_step_um"} and "z_offsets_um" not in given:
        out.pop("z_offsets_um", None)
    elif "z_offsets_um" in given and "z_planes" not in given:
        out.pop("z_planes", None)
    return out


def _deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in (mappings recursively, None skipped)."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a configuration (round-trips through `load_config`)."""
    text: str = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return text
