"""The napari plugin under Xvfb: found by npe2, attached to a real MDA, running the simulator."""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from scopestream.streaming.saved_run import SavedRun

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from scopestream.viewer.plugin import ScopestreamWidget

pytestmark = [
    pytest.mark.qt,
    # pymmcore-widgets' icons come from superqt's iconify, which fetches them online and
    # warns (then draws a fallback) when there is no network, as in these tests
    pytest.mark.filterwarnings("ignore:Error fetching icon:UserWarning"),
]


@pytest.fixture(autouse=True)
def _xcb() -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


@pytest.fixture
def viewer() -> Iterator[Any]:
    with warnings.catch_warnings():  # third-party import-time warnings, not ours
        warnings.simplefilter("ignore")
        import napari
    v = napari.Viewer(show=False)
    yield v
    v.close()


def _process_until(cond: Callable[[], bool], timeout_s: float = 180) -> None:
    """Run the Qt event loop until ``cond()`` holds (the dock's layers and status are updated
    on the GUI thread, so it must keep running while the test waits).

    One ``QEventLoop.exec`` with a polling timer, not ``processEvents`` in a loop: PySide6
    6.12 on Python 3.11 drops a reference to ``None`` in every ``processEvents`` call, and
    a few thousand calls abort the interpreter (``none_dealloc``).
    """
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    deadline = time.monotonic() + timeout_s
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: (cond() or time.monotonic() > deadline) and loop.quit())
    timer.start()
    try:
        if not cond():
            loop.exec()
    finally:
        timer.stop()
    assert cond(), "timed out waiting on the GUI"


def _dock(viewer: Any, **kw: Any) -> ScopestreamWidget:
    from scopestream.viewer.plugin import ScopestreamWidget

    widget = ScopestreamWidget(viewer, **kw)
    viewer.window.add_dock_widget(widget, name="scopestream")
    return widget


def _assert_recorded(out: Path, images: list[str], frames: int) -> None:
    """The store ended complete, with every frame of every image on disk."""
    run = SavedRun(out)
    assert run.status == "complete"
    assert [im.name for im in run.images] == images
    for im in run.images:
        assert im.shape[0] == frames and im.complete().all(), im.name


def _predicted_layers_with_content(viewer: Any) -> list[str]:
    return [
        layer.name
        for layer in viewer.layers
        if layer.metadata.get("prediction") and float(np.std(layer.data)) > 0
    ]


def test_npe2_finds_the_dock_widget() -> None:
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("scopestream")
    widgets = manifest.contributions.widgets or []
    assert [(w.command, w.display_name) for w in widgets] == [("scopestream.dock", "scopestream")]
    command = pm.get_command("scopestream.dock")
    assert command.python_name == "scopestream.viewer.plugin:ScopestreamWidget"
    from scopestream.viewer.plugin import ScopestreamWidget

    assert widgets[0].get_callable() is ScopestreamWidget


@pytest.fixture
def mm_core(viewer: Any) -> Iterator[Any]:
    """``CMMCorePlus.instance()`` on the DemoCamera, set up the way napari-micromanager and
    pymmcore-gui set up theirs (while the Qt app runs)."""
    from pymmcore_plus import CMMCorePlus

    from scopestream.acquisition.mmcore import demo_config

    mm_dir, cfg = demo_config()
    core = CMMCorePlus.instance()
    core.setDeviceAdapterSearchPaths([mm_dir])
    core.loadSystemConfiguration(cfg)
    yield core
    core.mda.cancel()
    core.unloadAllDevices()


def test_each_mda_on_an_attached_core_is_one_recording(tmp_path: Path) -> None:
    import useq

    from scopestream.acquisition.mmcore import demo_config, load_core
    from scopestream.viewer.plugin import PluginSession, RunSettings

    core = load_core(*demo_config())  # psygnal signals: the MDA's thread calls the session
    ready: list[tuple[Any, bool]] = []
    said: list[str] = []
    ended = threading.Semaphore(0)

    def say(message: str) -> None:
        said.append(message)
        if message.startswith(("complete", "stopped", "failed")):  # a run's last word
            ended.release()

    session = PluginSession(lambda pipe, started: ready.append((pipe, started)), say)
    settings = RunSettings(("denoise",), backend="onnxruntime", every_frame=True,
                           out_dir=tmp_path, model_channels=("DAPI", "FITC"))  # fmt: skip
    try:
        session.attach(core, settings)
        for loops in (2, 3):
            seq = useq.MDASequence(
                time_plan={"interval": 0, "loops": loops},
                channels=[{"config": "DAPI", "exposure": 5}, {"config": "FITC", "exposure": 5}],
            )
            core.mda.run(seq)  # the user's MDA, here on this thread
            assert ended.acquire(timeout=120), said
        session.detach()
        core.mda.run(seq)  # no longer attached: not recorded
    finally:
        session.shutdown()
        core.unloadAllDevices()
    assert [(p.out, started) for p, started in ready] == [
        (str(tmp_path / "mda-001.ome.zarr"), True),
        (str(tmp_path / "mda-002.ome.zarr"), True),
    ]
    assert session.runs == [p for p, _ in ready]
    _assert_recorded(tmp_path / "mda-001.ome.zarr", ["raw", "denoise"], 2)
    _assert_recorded(tmp_path / "mda-002.ome.zarr", ["raw", "denoise"], 3)
    assert not (tmp_path / "mda-003.ome.zarr").exists()
    assert [m for m in said if m.startswith("complete")] == [
        f"complete: {n} frames written, 0 lost → {tmp_path / f'mda-00{i}.ome.zarr'}"
        for i, n in ((1, 4), (2, 6))
    ]


def test_an_mda_run_from_the_mda_widget_is_predicted_live_and_recorded(
    viewer: Any, mm_core: Any, tmp_path: Path
) -> None:
    import useq
    from pymmcore_widgets import MDAWidget

    # the MDA widget's own layer would sit next to ours; a stand-in that must stay put
    other = viewer.add_image(np.ones((8, 8), np.uint16), name="someone else's layer")
    widget = _dock(viewer)  # attaches to CMMCorePlus.instance()
    widget.set_models(["denoise"])
    widget.model_channels.setText("DAPI")  # the DemoCamera's: not what the denoiser knows
    widget.backend.setCurrentText("onnxruntime")  # `auto` picks another backend on a GPU
    widget.every_frame.setChecked(True)
    widget.out_dir.setText(str(tmp_path))
    widget.attach_btn.click()
    assert widget.session.core is mm_core
    mda = MDAWidget(mmcore=mm_core)
    viewer.window.add_dock_widget(mda, name="MDA")
    mda.setValue(
        useq.MDASequence(
            time_plan={"interval": 0.05, "loops": 4},
            channels=[{"config": "DAPI", "exposure": 5}],
        )
    )
    finished: list[object] = []
    mm_core.mda.events.sequenceFinished.connect(finished.append)
    try:
        mda.control_btns.run_btn.click()  # the user starts the MDA from its widget
        _process_until(
            lambda: widget.live is not None
            and widget.live.final is not None
            and bool(_predicted_layers_with_content(viewer))
            and len(finished) == 1
            and widget.status.text().startswith("complete")
        )
        out = tmp_path / "mda-001.ome.zarr"
        assert widget.status.text() == f"complete: 4 frames written, 0 lost → {out}"
        assert widget.live is not None  # the live viewer's rows, in this dock
        rows = widget.live.widget.values
        assert (rows["state"], rows["progress"], rows["written / lost"]) == (
            "finished",
            "4/4",
            "4 / 0",
        )
        widget.attach_btn.click()  # detached: the next MDA is not recorded
        assert not widget.session.attached
        mda.control_btns.run_btn.click()
        _process_until(lambda: len(finished) == 2)
    finally:
        widget.close_runs()
    assert not (tmp_path / "mda-002.ome.zarr").exists()
    (pipe,) = widget.session.runs
    s = pipe.summary
    assert s is not None and s["status"] == "complete", s
    assert s["frames_written"] == s["frames_acquired"] == 4 and s["frames_lost"] == 0
    assert s["models"]["model:denoise"]["predicted"] == 4
    assert pipe.out == str(out)
    _assert_recorded(out, ["raw", "denoise"], 4)
    names = [layer.name for layer in viewer.layers]
    assert names[0] == other.name  # the window's other layers are left where they were
    assert {"DAPI (raw)", "DAPI (denoised)"} <= set(names)
    assert _predicted_layers_with_content(viewer) == ["DAPI (denoised)"]
    assert widget.live is None  # retired by close_runs; the dock showed the run's rows


def test_run_simulator_records_and_shows_its_layers_and_stop_ends_it(
    viewer: Any, tmp_path: Path
) -> None:
    from scopestream.viewer.plugin import ScopestreamWidget

    # as Plugins → scopestream opens it: napari finds it through npe2 and hands it the
    # viewer behind its public-only proxy
    _, widget = viewer.window.add_plugin_dock_widget("scopestream", "scopestream")
    assert isinstance(widget, ScopestreamWidget)
    widget.set_models(["denoise"])
    widget.backend.setCurrentText("onnxruntime")
    widget.out_dir.setText(str(tmp_path))
    widget.channels.setText("nuclei:10")
    widget.frames.setValue(12)
    try:
        widget.run_btn.click()
        _process_until(
            lambda: widget.live is not None
            and widget.live.final is not None
            and bool(_predicted_layers_with_content(viewer))
        )
        first = widget.live
        assert first is not None
        assert first.widget.values["state"] == "finished"
        assert first.widget.values["progress"] == "12/12"
        layers = list(viewer.layers)
        # a second run, open-ended in practice, stopped from the dock once it shows frames
        widget.frames.setValue(100_000)
        widget.run_btn.click()
        _process_until(lambda: widget.live is not first and widget.live.updates > 0)
        widget.stop_btn.click()
        second = widget.live
        _process_until(lambda: second.final is not None)
        assert second.widget.values["state"] == "finished"
        assert list(viewer.layers) == layers  # the same layers, reused by the next run
    finally:
        widget.close_runs()
    one, two = widget.session.runs
    s = one.summary
    assert s is not None and s["status"] == "complete"
    assert s["frames_written"] == 12 and s["frames_lost"] == 0
    # the dock's default policy predicts the newest frame (live); the recording is whole
    run = SavedRun(tmp_path / "sim-001.ome.zarr")
    assert run.status == "complete"
    assert run.raw.shape[0] == 12 and run.raw.complete().all()
    predicted = s["models"]["model:denoise"]["predicted"]
    assert 0 < predicted <= 12
    assert int(run.image("denoise").complete().sum()) == predicted
    assert [layer.name for layer in viewer.layers] == ["nuclei (raw)", "nuclei (denoised)"]
    assert float(np.std(viewer.layers["nuclei (raw)"].data)) > 0
    s = two.summary
    assert s is not None and s["status"] == "stopped"
    n = s["frames_acquired"]
    assert 0 < n < 100_000 and s["frames_written"] == n and s["frames_lost"] == 0
    stopped = SavedRun(tmp_path / "sim-002.ome.zarr")
    assert stopped.status == "stopped" and int(stopped.raw.complete().sum()) == n


def test_the_dock_runs_a_denoiser_on_the_channels_it_is_given_and_a_stain_on_its_own(
    tmp_path: Path,
) -> None:
    from scopestream.viewer.plugin import RunSettings

    plain = RunSettings(("denoise", "stain"), out_dir=tmp_path)
    assert plain.config(tmp_path / "a.ome.zarr")["models"] == ["denoise", "stain"]
    told = RunSettings(("denoise", "stain"), out_dir=tmp_path, model_channels=("DAPI", "FITC"))
    assert told.config(tmp_path / "a.ome.zarr")["models"] == ["denoise:DAPI,FITC", "stain"]
