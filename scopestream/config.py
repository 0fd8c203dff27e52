"""The versioned run configuration (YAML on disk, saved into every run's attributes).

A user-written file is strict (``extra="forbid"``): a misspelt key is an error,
never a silent default. Command-line flags override the file.
"""

from __future__ import annotations

import re
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

CONFIG_VERSION = 1

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.acquisition.plan import AcquisitionPlan


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used."""


def parse_shape(value: object) -> tuple[int, int]:
    """``"512x512"``, ``512`` or ``[512, 512]`` → ``(512, 512)``."""
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
        return h, w
    raise ValueError(f"shape must look like 512x512, got {value!r}")


class ChannelConfig(BaseModel):
    """One channel of a plan.

    Shorthand: ``nuclei:20`` (name and preset nuclei, 20 ms), ``nuclei_hi=nuclei:50``
    (a channel named nuclei_hi on the preset nuclei: the high half of a pair).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    exposure_ms: float = Field(10.0, gt=0)
    config: str | None = Field(None, description="Micro-Manager preset (default: the name)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: object) -> object:
        if isinstance(v, str):
            name, _, exp = v.partition(":")
            name, _, preset = name.partition("=")
            out: dict[str, object] = {"name": name.strip()}
            if preset.strip():
                out["config"] = preset.strip()
            if exp.strip():
                out["exposure_ms"] = float(exp.strip().removesuffix("ms"))
            return out
        return v


class PlanConfig(BaseModel):
    """What to acquire: time points × channels × z-planes (t, c, z order)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time_points: int | None = Field(None, gt=0, description="default: enough for --frames")
    interval_s: float = Field(0.0, ge=0)
    z_planes: int = Field(1, gt=0)
    z_step_um: float = Field(1.0, gt=0)
    channels: tuple[ChannelConfig, ...] = ()
    channel_group: str = "Channel"
    pairs: dict[str, Any] = Field(
        default_factory=dict,
        description="which channels the trainer pairs, e.g. {denoise: {input: low, target: high}}",
    )

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, v: object) -> object:
        if isinstance(v, str):
            return [c for c in v.split(",") if c.strip()]
        return v

    @model_validator(mode="after")
    def _pairs_name_channels(self) -> PlanConfig:
        names = {c.name for c in self.channels}
        for kind, pair in self.pairs.items():
            if not isinstance(pair, dict):
                raise ValueError(f"pairs.{kind} must map input/target(s) to channel names")
            used = [pair.get("input"), pair.get("target"), *pair.get("targets", [])]
            unknown = [u for u in used if u is not None and u not in names]
            if unknown:
                raise ValueError(
                    f"pairs.{kind} names channels {unknown} that the plan does not have"
                )
        return self


class RunConfig(BaseModel):
    """Everything a run needs; the flags of ``scopestream run`` map onto these fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    source: str = Field("sim", description="sim | replay:PATH | tcp://HOST:PORT")
    frames: int | None = Field(None, gt=0, description="stop after this many frames")
    shape: tuple[int, int] = Field((512, 512), description="frame size of the simulated camera")
    fps: float | None = Field(None, ge=0, description="frame rate; 0 = as fast as possible")
    models: tuple[str, ...] = Field((), description="model names or paths; empty = none")
    out: str | None = Field(None, description="output OME-Zarr path")
    overwrite: bool = False
    viewer: bool = False
    buffer_mb: float = Field(512.0, gt=0, description="ring buffer memory")
    seed: int = 0
    plan: PlanConfig = PlanConfig()
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
        0, ge=0, description="freeze input normalization from the first N frames (0: the model's)"
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

    @field_validator("shape", mode="before")
    @classmethod
    def _shape(cls, v: object) -> tuple[int, int]:
        return parse_shape(v)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            return tuple(m for m in v if str(m).lower() != "none")
        return v


def build_plan(cfg: RunConfig) -> AcquisitionPlan:
    """The run's acquisition plan: from ``mda`` (useq YAML) or ``plan``, capped by ``frames``."""
    from scopestream.acquisition.plan import AcquisitionPlan, ChannelSpec, PlanError

    try:
        if cfg.mda:
            import useq

            try:
                seq = useq.MDASequence.from_file(cfg.mda)
            except Exception as e:
                raise ConfigError(f"cannot read the MDA sequence {cfg.mda}: {e}") from None
            return AcquisitionPlan.from_mda_sequence(seq).limited_to(cfg.frames)
        p = cfg.plan
        channels = tuple(ChannelSpec(c.name, c.exposure_ms, c.config) for c in p.channels)
        per_t = max(1, len(channels)) * p.z_planes
        if p.time_points is not None:
            t = p.time_points
        elif cfg.frames is not None:
            t = -(-cfg.frames // per_t)
        else:
            t = 100
        interval = p.interval_s or (1.0 / cfg.fps if cfg.fps else 0.0)
        zs = (0.0,) if p.z_planes == 1 else AcquisitionPlan.z_range(p.z_planes, p.z_step_um)
        return AcquisitionPlan(
            time_points=t,
            interval_s=interval,
            z_offsets_um=zs,
            channels=channels,
            channel_group=p.channel_group,
            pairs=dict(p.pairs),
        ).limited_to(cfg.frames)
    except PlanError as e:
        raise ConfigError(f"invalid plan: {e}") from None


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


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run configuration."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
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


def merge(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply command-line overrides (keys whose value is None are left alone)."""
    data = cfg.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(data, where="flags")


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a configuration (round-trips through `load_config`)."""
    text: str = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return text
