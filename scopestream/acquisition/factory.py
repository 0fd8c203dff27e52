"""Build a `FrameSource` from a source spec string (``sim``, ``replay:PATH``, ``tcp://…``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scopestream.acquisition.base import SourceError

if TYPE_CHECKING:
    from scopestream.acquisition.base import FrameSource

SOURCE_FORMS = "sim, replay:PATH, tcp://HOST:PORT"


def make_source(
    spec: str,
    *,
    shape: tuple[int, int] = (512, 512),
    frames: int | None = None,
    fps: float | None = None,
    seed: int = 0,
) -> FrameSource:
    """The source a spec names; raises `SourceError` with the valid forms otherwise."""
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    match kind.lower():
        case "sim":
            from scopestream.acquisition.sim import SimulatedSource

            if arg:
                raise SourceError(f"'sim' takes no argument, got {spec!r}")
            return SimulatedSource(
                shape, n_frames=frames if frames is not None else 100, fps=fps or 0.0, seed=seed
            )
        case "replay":
            from scopestream.acquisition.replay import ReplaySource

            if not arg:
                raise SourceError("replay needs a path: --source replay:RUN.ome.zarr")
            return ReplaySource(arg, fps=fps)
        case "tcp":
            from scopestream.acquisition.remote import RemoteSource

            return RemoteSource(spec)
        case "pycromanager" | "mmcore":
            raise SourceError(
                f"the {kind!r} source is not part of this version yet; available: {SOURCE_FORMS}"
            )
        case _:
            raise SourceError(f"unknown source {spec!r}; use one of: {SOURCE_FORMS}")
