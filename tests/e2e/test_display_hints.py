"""Without a display, the viewer commands refuse at once (exit 2, nothing written) with a hint
that works: ``xvfb-run -a scopestream …``, not ``QT_QPA_PLATFORM=offscreen`` (no OpenGL)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.conftest import record_sim

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import CliResult


def no_display(qpa: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.pop("QT_QPA_PLATFORM", None)
    if qpa is not None:
        env["QT_QPA_PLATFORM"] = qpa
    return env


def hint(stderr: str) -> list[str]:
    """The suggested command line (the one starting with ``xvfb-run``), as argv."""
    text = " ".join(stderr.split())  # rich may wrap the message
    start = text.index("xvfb-run -a scopestream")
    end = text.find(" (", start)
    return shlex.split(text[start : end if end > 0 else None].rstrip(" .;"))


@pytest.mark.parametrize("qpa", [None, "offscreen"])
def test_run_viewer_refuses_before_creating_the_store(
    cli: Callable[..., CliResult], tmp_path: Path, qpa: str | None
) -> None:
    out = tmp_path / "v.ome.zarr"
    args = ("run", "--source", "sim", "--frames", "3", "--shape", "64x64", "--model", "none",
            "--viewer", "--out", str(out))  # fmt: skip
    r = cli(*args, env=no_display(qpa))
    assert r.code == 2, r.stderr
    assert "needs a display" in r.stderr
    assert "for screenshots only" not in r.stderr  # offscreen crashes in OpenGL: never suggested
    assert hint(r.stderr)[:4] == ["xvfb-run", "-a", "scopestream", "run"]
    assert str(out) in hint(r.stderr)  # the user's own command, under Xvfb
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_demo_viewer_refuses_before_creating_the_store(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    out = tmp_path / "d.ome.zarr"
    r = cli("demo", "--frames", "3", "--viewer", "--out", str(out), env=no_display("offscreen"))
    assert r.code == 2, r.stderr
    assert hint(r.stderr)[:4] == ["xvfb-run", "-a", "scopestream", "demo"]
    assert not out.exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hints") / "run.ome.zarr"
    return record_sim(out, "--frames", "2", "--shape", "64x64", "--model", "none")


def test_view_without_display_talks_about_view_not_viewer(
    cli: Callable[..., CliResult], small_run: Path
) -> None:
    r = cli("view", str(small_run), env=no_display())
    assert r.code == 2, r.stderr
    assert "--viewer" not in r.stderr  # an option `view` does not have
    assert "view needs a display" in r.stderr
    argv = hint(r.stderr)
    assert argv[:5] == ["xvfb-run", "-a", "scopestream", "view", str(small_run)]
    assert "--screenshot" in argv  # under Xvfb nobody sees the window: save it


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs xvfb-run")
def test_the_view_hint_works_as_printed(
    cli: Callable[..., CliResult], small_run: Path, tmp_path: Path
) -> None:
    r = cli("view", str(small_run), "--screenshot", str(tmp_path / "v.png"), env=no_display())
    assert r.code == 2
    argv = hint(r.stderr)
    assert argv[-2:] == ["--screenshot", str(tmp_path / "v.png")]
    i = argv.index("scopestream")
    argv[i : i + 1] = [sys.executable, "-m", "scopestream"]
    done = subprocess.run(argv, env=no_display(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "v.png").stat().st_size > 0
