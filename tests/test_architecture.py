"""The model/view split and the import contracts hold (STYLE.md 9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_core_imports_without_heavy_dependencies() -> None:
    code = (
        "import sys, json\n"
        "import scopestream, scopestream.cli, scopestream.config\n"
        "import scopestream.streaming.runner, scopestream.streaming.zarr_sink\n"
        "import scopestream.streaming.protocol, scopestream.acquisition.factory\n"
        "heavy = ['torch', 'napari', 'PySide6', 'qtpy', 'onnxruntime', 'pycromanager']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []
