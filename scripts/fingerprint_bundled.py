"""Add the training-data `Fingerprint` to the bundled stain model, without retraining it.

    python scripts/fingerprint_bundled.py

Records the same simulated fields `train_bundled.py` trained on (same seeds, shape,
channels and clock), takes the same train split (same seed and patch) and writes
the fingerprint into each bundled ``manifest.yaml`` (the package's identity, the
manifest's sha256, changes; its files do not). Models trained now get theirs from
the trainer itself.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bundled import FIELDS, record

from scopestream.training.data import load_run_fields, split_regions
from scopestream.training.train import training_fingerprint

MODELS = Path(__file__).resolve().parents[1] / "scopestream" / "models"
#: model: (channels recorded, first seed, input channel)
DATA = {  # the denoiser is trained anew by train_bundled.py: its fingerprint is the trainer's
    "stain": ("brightfield:5,nuclei:30,membrane:30", 10, "brightfield"),
}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="scopestream-fingerprint-"))
    try:
        for name, (channels, seed0, channel) in DATA.items():
            manifest_path = MODELS / name / "v1" / "manifest.yaml"
            manifest = yaml.safe_load(manifest_path.read_text())
            cfg = manifest["training"]["config"]
            runs = [record(work / name, seed0 + s, channels) for s in range(FIELDS)]
            fields = [f for r in runs for f in load_run_fields(r, channel)]
            splits = split_regions(fields, int(cfg["patch"]), int(cfg["seed"]))
            fp = training_fingerprint(fields, splits["train"])
            manifest["fingerprint"] = fp.model_dump(mode="json")
            manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
            print(name, fp.model_dump_json())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
