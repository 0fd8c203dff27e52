from __future__ import annotations

import json
import shutil
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from scopestream.inference.backends import OnnxBackend
from scopestream.inference.engine import InferenceEngine
from scopestream.inference.package import Registry
from scopestream.inference.predictor import Predictor
from scopestream.inference.watcher import (
    MAX_REASONS,
    RegistryWatcher,
    SwapRefused,
    swap_incompatibility,
)
from scopestream.streaming.frame import make_meta

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from scopestream.inference.package import ModelPackage

SHAPE = (64, 72)
WAIT_S = 60  # a guard against a hang, never a synchronisation


class _Writer:
    """Just enough of an output image for the engine."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    def write(self, data: np.ndarray, meta: Any) -> None:
        pass

    def update_attrs(self, **attrs: Any) -> None:
        self.attrs.update(attrs)

    def close(self, status: str, **attrs: Any) -> None:
        self.attrs.update(attrs, status=status)


def _predictor(pkg: ModelPackage) -> Predictor:
    return Predictor(pkg, OnnxBackend(pkg, threads=1))


def _engine(pkg: ModelPackage) -> InferenceEngine:
    return InferenceEngine(_predictor(pkg), _Writer(), source_channels=("nuclei",))


def _frame(eng: InferenceEngine) -> None:
    seq = eng.predicted + eng.ignored
    meta = make_meta(t=seq, c=0, z=0)
    meta["seq"] = seq
    eng.write(np.full(SHAPE, 300, np.uint16), meta)


def _temporal(make_package: Callable[..., ModelPackage], window: int = 3) -> ModelPackage:
    return make_package(params={"in_channels": window}, spatial="2.5d-t", window=window)


class _FlakyRegistry(Registry):
    """A registry whose first ``fail`` reads raise, like a network share that hiccups."""

    def __init__(self, root: Path, fail: int) -> None:
        super().__init__(root, bundled=False)
        self.fail = fail
        self.failed = threading.Event()

    def versions(self, name: str) -> list[tuple[int, Path]]:
        if self.fail > 0:
            self.fail -= 1
            self.failed.set()
            raise OSError("Stale file handle")
        return super().versions(name)


# -- D6: versions are packages (sha256), not numbers ------------------------------------


def test_a_retrain_over_a_bundled_model_swaps_in(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    bundled = tmp_path / "bundled"
    Registry(bundled, bundled=False).publish(make_package(seed=1))
    pipeline_reg = Registry(tmp_path / "user", bundled=False, read_only_roots=[bundled])
    running = pipeline_reg.resolve("denoise")
    assert running.version == 1
    eng = _engine(running)
    swapped = threading.Event()
    seen: list[dict[str, Any]] = []

    def on_swap(identity: dict[str, Any]) -> None:
        seen.append(identity)
        swapped.set()

    watcher = RegistryWatcher(
        pipeline_reg, "denoise", eng, _predictor, interval_s=0.01, on_swap=on_swap
    )
    watcher.start()
    try:
        # the trainer publishes where it cannot see the bundled models: its first
        # retrain is a user v1, with the same number as the running bundled v1
        retrained = Registry(tmp_path / "user", bundled=False).publish(make_package(seed=2))
        assert retrained.version == 1
        assert swapped.wait(WAIT_S)
    finally:
        watcher.stop()
    assert [i["sha256"] for i in seen] == [retrained.sha256]
    _frame(eng)
    assert eng.predictor.package.sha256 == retrained.sha256


def test_a_higher_number_with_the_same_package_is_no_swap(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    reg = Registry(tmp_path / "reg", bundled=False)
    first = reg.publish(make_package(seed=1))
    eng = _engine(first)
    made: list[ModelPackage] = []

    def make(pkg: ModelPackage) -> Predictor:
        made.append(pkg)
        return _predictor(pkg)

    watcher = RegistryWatcher(reg, "denoise", eng, make)
    assert watcher.poll() == "unchanged"
    # the same package copied in under a higher number: same sha256, nothing to do
    shutil.copytree(first.path, tmp_path / "reg" / "denoise" / "v7")
    assert reg.latest_version("denoise") == 7
    assert watcher.poll() == "unchanged"
    assert made == []
    assert watcher.counters()["swaps"] == 0


# -- D11: errors are counted, reported, and the watching goes on ----------------------


def test_a_transient_registry_error_does_not_end_the_watching(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    trainer = Registry(tmp_path / "reg", bundled=False)
    first = trainer.publish(make_package(seed=1))
    flaky = _FlakyRegistry(tmp_path / "reg", fail=1)
    eng = _engine(first)
    swapped = threading.Event()
    watcher = RegistryWatcher(
        flaky,
        "denoise",
        eng,
        _predictor,
        interval_s=0.01,
        on_swap=lambda identity: swapped.set(),
    )
    watcher.start()
    try:
        assert flaky.failed.wait(WAIT_S)
        second = trainer.publish(make_package(seed=2))
        assert swapped.wait(WAIT_S)  # the poll after the error still looked
    finally:
        watcher.stop()
    _frame(eng)
    assert eng.predictor.package.sha256 == second.sha256


def test_errors_are_counted_reported_and_bounded(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    trainer = Registry(tmp_path / "reg", bundled=False)
    first = trainer.publish(make_package(seed=1))
    flaky = _FlakyRegistry(tmp_path / "reg", fail=MAX_REASONS + 5)
    reasons: list[str] = []
    watcher = RegistryWatcher(
        flaky, "denoise", _engine(first), _predictor, on_error=reasons.append
    )
    for _ in range(MAX_REASONS + 5):
        assert watcher.poll() == "error"
    assert len(reasons) == MAX_REASONS + 5
    assert "Stale file handle" in reasons[0]
    trainer.publish(make_package(seed=2))
    assert watcher.poll() == "swapped"
    assert watcher.counters() == {
        "polls": MAX_REASONS + 6,
        "swaps": 1,
        "refused": 0,
        "errors": MAX_REASONS + 5,
    }
    described = json.loads(json.dumps(watcher.describe()))  # JSON-able as it is
    assert len(described["errors"]) == MAX_REASONS  # the last few, the rest only counted
    assert described["running"]["version"] == 2
    assert described["refused"] == []


def test_a_failing_callback_is_recorded_not_fatal(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    reg = Registry(tmp_path / "reg", bundled=False)
    eng = _engine(reg.publish(make_package(seed=1)))

    def broken(identity: dict[str, Any]) -> None:
        raise KeyError("viewer gone")

    watcher = RegistryWatcher(reg, "denoise", eng, _predictor, on_swap=broken)
    reg.publish(make_package(seed=2))
    assert watcher.poll() == "swapped"
    assert watcher.counters()["errors"] == 1
    assert "KeyError" in watcher.errors[0]


# -- swap validation: incompatible or broken versions are refused -----------------------


@pytest.mark.parametrize(
    ("old_kw", "new_kw", "what"),
    [
        ({}, {"spatial": "2.5d-t", "window": 3, "params": {"in_channels": 3}}, "spatial mode"),
        (
            {"spatial": "2.5d-t", "window": 3, "params": {"in_channels": 3}},
            {"spatial": "2.5d-t", "window": 5, "params": {"in_channels": 5}},
            "window",
        ),
    ],
)
def test_engine_refuses_a_model_with_another_input(
    make_package: Callable[..., ModelPackage],
    old_kw: dict[str, Any],
    new_kw: dict[str, Any],
    what: str,
) -> None:
    old = make_package(seed=1, **old_kw)
    eng = _engine(old)
    with pytest.raises(ValueError, match=what):
        eng.swap(_predictor(make_package(seed=2, **new_kw)))
    _frame(eng)  # the running model goes on
    assert eng.predictor.package.sha256 == old.sha256
    assert len(eng.versions) == 1


def test_swap_incompatibility_names_every_difference(
    make_package: Callable[..., ModelPackage],
) -> None:
    two_d = make_package(seed=1).manifest
    assert swap_incompatibility(two_d, make_package(seed=2).manifest) is None
    stain = make_package(
        kind="stain_unet",
        params={"in_channels": 3, "out_channels": 2, "base": 8},
        inputs=("brightfield",),
        outputs=("nuclei", "membrane"),
        spatial="2.5d-z",
        window=3,
    ).manifest
    reason = swap_incompatibility(two_d, stain)
    assert reason is not None
    for what in ("spatial mode", "window", "input channels", "outputs"):
        assert what in reason


def test_watcher_refuses_broken_or_incompatible_versions_and_runs_on(
    make_package: Callable[..., ModelPackage], tmp_path: Path
) -> None:
    reg = Registry(tmp_path / "reg", bundled=False)
    first = reg.publish(make_package(seed=1))
    eng = _engine(first)
    refused: list[tuple[dict[str, Any], str]] = []
    made: list[int] = []
    fail_compile = {4}

    def make(pkg: ModelPackage) -> Predictor:
        made.append(pkg.version)
        if pkg.version in fail_compile:
            raise RuntimeError("CUDA out of memory")
        return _predictor(pkg)

    watcher = RegistryWatcher(
        reg, "denoise", eng, make, on_refused=lambda i, r: refused.append((i, r))
    )

    reg.publish(_temporal(make_package))  # v2: 2d -> 2.5d-t
    assert watcher.poll() == "refused"
    assert watcher.poll() == "unchanged"  # a refused package is not tried again
    assert made == []  # refused before compiling
    ident, reason = refused[-1]
    assert ident["version"] == 2
    assert "spatial mode '2d' -> '2.5d-t'" in reason

    v3 = reg.publish(make_package(seed=3))
    (v3.path / "weights.pt").write_bytes(b"edited")  # v3: fails verification
    assert watcher.poll() == "refused"
    assert refused[-1][0]["sha256"] == v3.sha256
    assert "does not match its sha256" in refused[-1][1]

    reg.publish(make_package(seed=4))  # v4: fails to compile
    assert watcher.poll() == "refused"
    assert refused[-1][1] == "RuntimeError: CUDA out of memory"

    _frame(eng)
    assert eng.predictor.package.sha256 == first.sha256  # v1 ran on through all of it

    v5 = reg.publish(make_package(seed=5))
    assert watcher.poll() == "swapped"
    _frame(eng)
    assert eng.predictor.package.sha256 == v5.sha256
    assert watcher.counters() == {"polls": 5, "swaps": 1, "refused": 3, "errors": 0}
    described = json.loads(json.dumps(watcher.describe()))
    assert [r["version"] for r in described["refused"]] == [2, 3, 4]
    assert all(r["reason"] for r in described["refused"])


def test_swap_refused_is_a_value_error() -> None:
    assert issubclass(SwapRefused, ValueError)
