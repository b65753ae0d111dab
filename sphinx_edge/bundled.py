"""What ships inside the package: sample images, SPHINX-Nano's trained weights and its int4 ONNX export.

Torch-free. Located with importlib.resources, so the paths hold in a checkout, an editable install and
an installed wheel alike. `make bundled-export` rewrites NANO_EXPORT from the bundled weights.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_PACKAGE = Path(str(resources.files("sphinx_edge")))

SAMPLES = _PACKAGE / "assets"  # small images for demos, tests and the exporter's check
WEIGHTS = _PACKAGE / "weights"  # one folder per size whose trained weights ship (nano)
NANO_EXPORT = _PACKAGE / "exports" / "nano_int4"  # `sphinx-edge run` answers from it with no export step
VERIFY_IMAGE = SAMPLES / "wide_2x1.png"  # 2:1, so the check covers encoded tiles and skip tokens
# Every question the README, the demo and the browser page ask about the sample images, with its answer
# (LLaVA json: `sphinx-edge eval --data` scores a model on it; the browser page suggests them).
SAMPLE_QUESTIONS = SAMPLES / "questions.json"


def bundled_weights(size: str) -> Path | None:
    """The folder of the weights that ship for `size`, or None."""
    folder = WEIGHTS / size
    return folder if (folder / "config.json").is_file() else None


def weight_sizes() -> list[str]:
    """Sizes whose weights ship."""
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file()) if WEIGHTS.is_dir() else []
