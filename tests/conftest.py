from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker and the
    processes it starts get their share of the cores: two workers each running torch on
    every core would fight for them and both run slower than one alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, share)


_share_the_cores()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def json(self) -> dict[str, Any]:
        lines = [ln for ln in self.stdout.strip().splitlines() if ln.strip()]
        assert lines, f"no stdout; stderr:\n{self.stderr}"
        out: dict[str, Any] = json.loads(lines[-1])
        return out


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    def run(
        *args: str, timeout: float = 600, env: dict[str, str] | None = None, **kw: Any
    ) -> CliResult:
        env = {**(env or os.environ), "COLUMNS": "200", "NO_COLOR": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "scopestream", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            **kw,
        )
        return CliResult(proc)

    return run


def record_sim(out: Path, *args: str, timeout: float = 300) -> Path:
    """Record a simulated run to ``out`` (``scopestream run --source sim ARGS``); fail loudly."""
    subprocess.run(
        [sys.executable, "-m", "scopestream", "run", "--source", "sim", *args, "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    return out


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_after_each_module() -> Iterator[None]:
    """What the module's fixtures leaked is collected at its end (see the per-test one)."""
    yield
    gc.unfreeze()
    gc.collect()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test(
    _collect_garbage_after_each_module: None,
) -> Iterator[None]:
    """An object a test leaks (an unclosed file or socket) is collected in that test, so its
    ResourceWarning fails the test that leaked it, not whichever test runs next.

    What is still alive after the collection (imported modules, module fixtures) is
    frozen, so the next test's collection scans only what that test made: a full
    collection with torch and napari loaded scans half a million objects (0.4 s, three
    minutes over the suite). The module-scoped fixture unfreezes and collects
    everything at the end of each module.
    """
    yield
    gc.collect()
    gc.freeze()
