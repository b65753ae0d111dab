"""The package as a user installs it: the wheel, built from this checkout, in a fresh virtual
environment with no torch. There the bundled SPHINX-Nano export answers, `sphinx-edge web` writes a site
that answers in a browser as the Python runtime does, and the wheel carries the C++ runner's sources.

The install fetches the runtime's dependencies (numpy, pillow, onnxruntime, sentencepiece, typer, rich)
from the package index or pip's cache, as a user's `pip install sphinx-edge` would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sphinx_edge import __version__
from sphinx_edge.bundled import NANO_EXPORT, SAMPLES
from conftest import ask_in_browser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchao", "executorch", "transformers", "safetensors", "onnx", "onnxscript")
IMAGE, QUESTION = SAMPLES / "shapes_2x1.png", "What color is the circle?"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel and what building it printed."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = out.glob("sphinx_edge-*.whl")
    return wheel, build.stdout + build.stderr


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with only the wheel and its own dependencies; returns its bin/."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    install = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              str(wheel[0])], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return env / "bin"


def _cli(bin_dir: Path, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(bin_dir / "sphinx-edge"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**env, "COLUMNS": "200"})


def test_the_wheel_builds_without_warnings_and_carries_what_runs_outside_a_checkout(wheel):
    path, log = wheel
    assert "warning" not in log.lower(), log[-3000:]
    names = set(zipfile.ZipFile(path).namelist())
    for needed in ("sphinx_edge/runtime/web/index.html", "sphinx_edge/runtime/cpp/sphinx_runner.cpp",
                   "sphinx_edge/runtime/cpp/CMakeLists.txt", "sphinx_edge/assets/wide_2x1.png",
                   "sphinx_edge/weights/nano/model.safetensors",
                   *(f"sphinx_edge/exports/nano_int4/{f}" for f in os.listdir(NANO_EXPORT))):
        assert needed in names, needed
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = {re.split(r"[<>=!~ ;\[]", line.split(": ", 1)[1])[0].lower()
                for line in zipfile.ZipFile(path).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert requires == {"numpy", "pillow", "onnxruntime", "sentencepiece", "typer", "rich"}, requires


def test_a_fresh_install_answers_from_the_bundled_export_without_torch(venv):
    python = str(venv / "python")
    probe = subprocess.run([python, "-c", "import importlib.util as u, json; "
                            f"print(json.dumps({{m: u.find_spec(m) is not None for m in {HEAVY!r}}}))"],
                           capture_output=True, text=True, check=True)
    assert not any(json.loads(probe.stdout).values()), probe.stdout
    blocked = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "No module named 'torch'" in blocked.stderr

    version = _cli(venv, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"sphinx-edge {__version__}"

    result = _cli(venv, "run", "--image", IMAGE, QUESTION, "--max-new-tokens", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    # The same export in this checkout's runtime gives the same answer.
    from sphinx_edge.runtime.pipeline import Pipeline

    want = Pipeline(NANO_EXPORT).answer(QUESTION, IMAGE, max_new_tokens=8)
    assert want.text.strip() and result.stdout.splitlines()[0].strip() == want.text.strip()

    bench = _cli(venv, "bench", NANO_EXPORT, "--format", "onnx", "--llm-only", "--pp", "16", "--tg", "4", "-r", "1",
                 "--warmup", "0", "-t", "1", "--no-bandwidth", "-o", "json")
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    (case,) = json.loads(bench.stdout)["cases"]
    assert case["backend"] == "onnx" and case["llm"]["tg_tok_s"]["mean"] > 0


def test_a_fresh_install_builds_a_working_web_site(venv, tmp_path, browser_tools):
    from sphinx_edge.runtime.pipeline import Pipeline

    result = _cli(venv, "web", "--out", tmp_path / "site", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    page = ask_in_browser(browser_tools, tmp_path / "site", [{"image": str(IMAGE), "question": QUESTION}], tmp_path,
                          max_new_tokens=8)
    assert page.returncode == 0, page.stdout[-3000:] + page.stderr[-3000:]
    (answer,) = [json.loads(line) for line in page.stdout.splitlines() if line.startswith("{")]
    want = Pipeline(NANO_EXPORT).answer(QUESTION, IMAGE, max_new_tokens=8)
    assert answer["state"] == "done" and answer["errors"] == [], answer
    assert answer["result"]["tokenIds"] == want.token_ids and answer["result"]["text"] == want.text
