"""Shared fixtures: a SentencePiece tokenizer trained on the fly, small images, small models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest
from PIL import Image

CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
### Human: What colour is the square? ### Assistant: red
### Human: How many circles are there? ### Assistant: three
Answer the question using a single word or phrase. blue green yellow one two four five
What is written in the image? The number is 42. left right top bottom shape triangle
"""


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_stay_under_pytests_folder(tmp_path_factory):
    """Temporary files of the tests, and of the processes they start, go under pytest's own folder,
    which keeps only the last three runs: some tests kill an export on purpose, and a killed process
    cannot remove its temporary folders (left in /tmp, they filled a shared disk over many runs)."""
    folder = tmp_path_factory.mktemp("tempfiles")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # Python caches the folder on first use: look again


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> str:
    """A tiny SentencePiece model (vocab <= 200 < the test sizes' 256)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tokenizer")
    (d / "corpus.txt").write_text(CORPUS * 20)
    spm.SentencePieceTrainer.Train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=200, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],  # keep newlines: the stop string is "\n###"
    )
    return str(d / "tokenizer.model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    from sphinx_edge.tokenizer import Tokenizer

    return Tokenizer(tokenizer_file)


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tool(reason: str) -> NoReturn:
    """A tool that `make deps` installs is absent: skip on a developer's machine (saying how to get
    it), fail under CI (CI=true), where make deps ran and a skip would hide a broken install step."""
    if under_ci():
        pytest.fail(f"{reason} -- under CI, `make deps` must have provided it")
    pytest.skip(reason)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image with structure (gradients and a rectangle), not flat colour."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    rgb = (rgb + rng.integers(0, 30, rgb.shape)).clip(0, 255).astype("uint8")
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (200, 30, 30)
    return Image.fromarray(rgb, "RGB")


@pytest.fixture
def model_factory():
    """build(size) -> an eval-mode randomly initialised SphinxModel."""
    from sphinx_edge.config import get_config
    from sphinx_edge.model.sphinx import build_model

    def build(size: str, seed: int = 0):
        return build_model(get_config(size), seed=seed).eval()

    return build


def _export(tmp_path_factory, tokenizer_file, quant: str, formats: tuple[str, ...]):
    from sphinx_edge.config import get_config
    from sphinx_edge.export.exporter import ExportOptions, export_model
    from sphinx_edge.model.sphinx import build_model
    from sphinx_edge.tokenizer import Tokenizer

    model = build_model(get_config("test-tiny"), seed=0).eval()
    out = tmp_path_factory.mktemp("export") / f"test-tiny-{quant}"
    manifest = export_model(model, Tokenizer(tokenizer_file), out, ExportOptions(quant=quant, formats=formats),
                            source={"random_init": True, "seed": 0})
    return model, out, manifest


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory, tokenizer_file):
    """(model, export dir, manifest): test-tiny exported to fp32 ONNX, verified."""
    return _export(tmp_path_factory, tokenizer_file, "fp32", ("onnx",))


@pytest.fixture(scope="session")
def pte_export(tmp_path_factory, tokenizer_file):
    """(model, export dir, manifest): test-tiny exported to an fp32 ExecuTorch program, verified."""
    return _export(tmp_path_factory, tokenizer_file, "fp32", ("pte",))


@pytest.fixture(scope="session")
def nano_int4_pte(tmp_path_factory):
    """Export dir: the bundled SPHINX-Nano as an int4 ExecuTorch program (what ships to devices). Made
    once per test run, whichever pytest-xdist worker asks first (a few minutes on 2 cores)."""
    from filelock import FileLock

    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.bundled import WEIGHTS
    from sphinx_edge.export.exporter import ExportOptions, export_model
    from sphinx_edge.tokenizer import Tokenizer

    nano, shared = WEIGHTS / "nano", tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # this run's folder, common to its workers
    out = shared / "nano-int4-pte"
    with FileLock(str(shared / "nano-int4-pte.lock")):
        if not (out / "manifest.json").is_file():
            export_model(lambda: load_model(nano, "nano").eval(), Tokenizer(nano / "tokenizer.model"), out,
                         ExportOptions(quant="int4", formats=("pte",), verify=False), source={"bundled": "nano"},
                         overwrite=True)
    return out


def run_torch_free(body: str, timeout: float = 120):
    """Runs `body` (Python source) in a fresh interpreter where importing torch fails, and checks at the
    end that nothing imported it: the runtime's promise. Returns the CompletedProcess."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
    """) + textwrap.dedent(body) + '\nassert "torch" not in sys.modules\n'
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# The browser demo's tools (runtime/web/install-deps.sh)

INSTALL = "run runtime/web/install-deps.sh"
WEB_DIR = Path(__file__).resolve().parents[1] / "runtime" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def need_node() -> str:
    node = shutil.which("node")
    if node is None:
        missing_tool(f"node not installed: {INSTALL} (needs Node.js >= 20)")
    return node


def need_npm_packages(*names: str) -> None:
    for name in names:
        if not (WEB_DIR / "node_modules" / name / "package.json").is_file():
            missing_tool(f"npm package {name} not installed in runtime/web/node_modules: {INSTALL}")


@pytest.fixture(scope="session")
def browser_tools() -> str:
    """node's path, once node, the npm packages and chromium are there (checked before the export)."""
    node = need_node()
    need_npm_packages("onnxruntime-web", "playwright-core")
    if not os.access(CHROMIUM, os.X_OK):
        missing_tool(f"chromium not installed at {CHROMIUM}: {INSTALL} (or set CHROMIUM)")
    return node


def ask_in_browser(node: str, site, cases: list[dict], workdir, max_new_tokens: int):
    """Serves `site` on localhost and drives its page in headless Chromium (runtime/web/test/e2e.mjs)
    through `cases` ({"image", "question"}); the finished process, one JSON line per case."""
    import json
    import subprocess
    import threading

    from sphinx_edge.runtime.web_bundle import make_server

    (workdir / "cases.json").write_text(json.dumps(cases))
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        return subprocess.run([node, "test/e2e.mjs", url, str(workdir / "cases.json")], cwd=WEB_DIR,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "CHROMIUM": CHROMIUM, "MAX_NEW_TOKENS": str(max_new_tokens)})
    finally:
        server.shutdown()
        server.server_close()


def assert_exports_at_any_view_count(model, size: int) -> None:
    """`model` ([N, 3, size, size] views in) exported with a dynamic view count gives its own outputs
    at 1 and 3 views."""
    import torch

    views = torch.export.Dim("views", min=1, max=8)
    program = torch.export.export(model, (torch.randn(2, 3, size, size),), dynamic_shapes={"x": {0: views}})
    for n in (1, 3):
        x = torch.randn(n, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)
