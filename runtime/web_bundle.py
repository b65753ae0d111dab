"""The browser demo's site: an ONNX export plus what runtime/web/ needs, and a localhost server.

    build_site(export_dir, site_dir) writes
        site_dir/index.html, app.js, sphinx.js, tiling.js, tokenizer.js, decoding.js   (runtime/web/)
        site_dir/ort/        onnxruntime-web's wasm build (from runtime/web/node_modules)
        site_dir/samples/    the bundled sample images and index.json (each with its suggested questions)
        site_dir/model/      the three ONNX graphs (+ external data), manifest.json,
                             tokenizer.json (the SentencePiece vocabulary as JSON),
                             config.json (the numbers the JS needs: layout, ids, cache shape, prompt)
    serve(site_dir, port) serves it with the MIME types and the cross-origin isolation headers that
    onnxruntime-web's multi-threaded wasm needs.

Torch-free: only the standard library, sentencepiece's protobuf and the runtime's manifest checks.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sphinx_edge.bundled import SAMPLE_QUESTIONS, SAMPLES
from sphinx_edge.config import SphinxConfig
from sphinx_edge.io import atomic_path, write_text_atomic
from sphinx_edge.prompt import STOP_STRINGS, format_prompt
from sphinx_edge.runtime.manifest import ManifestError, check_files, graph_files, read_manifest
from sphinx_edge.tokenizer import Tokenizer, TokenizerError

WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_FILES = ("index.html", "app.js", "sphinx.js", "tiling.js", "tokenizer.js", "decoding.js")
# onnxruntime-web's wasm-only ES module build and the runtime it loads (threaded SIMD, plain wasm EP).
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
GRAPHS = ("vision_encoder", "token_embedding", "decoder")
QUESTION_MARK = "\x00QUESTION\x00"  # cannot occur in a template, so splitting on it is unambiguous


class WebBundleError(ValueError):
    """The site cannot be built: a missing export file, web file or npm package."""


def tokenizer_json(model_file: str | os.PathLike) -> dict[str, Any]:
    """A SentencePiece BPE model as JSON for runtime/web/tokenizer.js: every piece with its score and
    type, the special ids and the normaliser flags the encoder follows."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    try:
        proto = Tokenizer(model_file).model_proto()
    except TokenizerError as e:
        raise WebBundleError(str(e)) from e
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    model_type = pb.TrainerSpec.ModelType.Name(trainer.model_type)
    if model_type != "BPE":
        raise WebBundleError(f"{model_file} is a SentencePiece {model_type} model; tokenizer.js implements BPE only")
    # A precompiled character map (nmt_nfkc etc.) would need a Unicode normaliser in JS too.
    if norm.precompiled_charsmap:
        raise WebBundleError(f"{model_file} normalises text with rule {norm.name!r}; tokenizer.js supports "
                             "the identity normaliser only (as LLaMA's tokenizer uses)")
    return {
        "model_type": model_type,
        "pieces": [[p.piece, p.score, int(p.type)] for p in proto.pieces],
        "unk_id": trainer.unk_id,
        "bos_id": trainer.bos_id,
        "eos_id": trainer.eos_id,
        "byte_fallback": trainer.byte_fallback,
        "unk_surface": trainer.unk_surface,
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "escape_whitespaces": norm.escape_whitespaces,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
    }


def web_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """config.json: the model facts sphinx.js uses, taken from the manifest and the Python modules
    (the prompt comes from prompt.format_prompt, so the template lives in one place)."""
    cfg = SphinxConfig.from_dict(manifest["model"]["config"])
    files = graph_files(manifest, "onnx")
    before, after = format_prompt([(QUESTION_MARK, None)]).split(QUESTION_MARK)
    return {
        "name": cfg.name,
        "layout": cfg.layout,
        "grid": cfg.grid,
        "tileSize": cfg.convnext.image_size,
        "dinoSize": cfg.dinov2.image_size,
        "tokensPerView": cfg.tokens_per_view,
        "dim": cfg.llm.dim,
        "nLayers": cfg.llm.n_layers,
        "nKvHeads": cfg.llm.n_kv_heads,
        "headDim": cfg.llm.head_dim,
        "maxSeqLen": cfg.llm.max_seq_len,
        "skipId": cfg.skip_id,
        "prompt": {"before": before, "after": after},  # prompt = before + question + after
        "stopStrings": list(STOP_STRINGS),
        "quantization": manifest.get("quantization"),
        "graphs": {name: {"model": files[name][0], "data": files[name][1:]} for name in GRAPHS},
    }


def build_site(export_dir: str | os.PathLike, site_dir: str | os.PathLike, *,
               node_modules: str | os.PathLike | None = None) -> Path:
    """Writes the demo site for an ONNX export into `site_dir` (created or updated); returns it.

    Every copied export file is checked against the manifest's hashes first. `node_modules` defaults
    to runtime/web/node_modules (runtime/web/install-deps.sh fills it).
    """
    export_dir, site = Path(export_dir), Path(site_dir)
    manifest = read_manifest(export_dir)
    files = graph_files(manifest, "onnx")
    missing = [g for g in GRAPHS if g not in files]
    if missing:
        raise ManifestError(f"{export_dir}: the ONNX export lacks {', '.join(missing)}")
    tokenizer = manifest.get("tokenizer")
    if not tokenizer:
        raise ManifestError(f"{export_dir} carries no tokenizer")
    model_files = [f for g in GRAPHS for f in files[g]]
    check_files(export_dir, manifest, model_files + [tokenizer])

    dist = Path(node_modules) / "onnxruntime-web" / "dist" if node_modules else WEB_DIR / ORT_DIST
    sources = {WEB_DIR / f: site / f for f in WEB_FILES}
    sources.update({dist / f: site / "ort" / f for f in ORT_FILES})
    sources.update({export_dir / f: site / "model" / f for f in model_files})
    for src in sources:
        if not src.is_file():
            hint = (" (onnxruntime-web is not installed: in a checkout run runtime/web/install-deps.sh; a wheel built "
                    "before that carries none)") if src.parent == dist else ""
            raise WebBundleError(f"{src} is missing{hint}")

    samples = sample_index()
    sources.update({SAMPLES / entry["image"]: site / "samples" / entry["image"] for entry in samples})
    for src, dst in sources.items():
        _copy(src, dst)
    write_text_atomic(site / "samples" / "index.json", json.dumps(samples, indent=1))
    model = site / "model"
    write_text_atomic(model / "tokenizer.json", json.dumps(tokenizer_json(export_dir / tokenizer), ensure_ascii=False))
    write_text_atomic(model / "config.json", json.dumps(web_config(manifest), indent=1, ensure_ascii=False))
    write_text_atomic(model / "manifest.json", json.dumps(manifest, indent=1))
    return site


def sample_index() -> list[dict[str, Any]]:
    """The page's sample gallery: [{"image": name, "questions": [...]}, ...] in SAMPLE_QUESTIONS' order."""
    index: dict[str, list[str]] = {}
    for record in json.loads(SAMPLE_QUESTIONS.read_text(encoding="utf-8")):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        index.setdefault(record["image"], []).append(question)
    return [{"image": image, "questions": questions} for image, questions in index.items()]


def _copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return  # already there (rebuilding a site only refreshes what changed)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


class _Handler(http.server.SimpleHTTPRequestHandler):
    # Browsers refuse to compile wasm streamed with another type, and ES modules need a JS type.
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
                      ".json": "application/json", ".onnx": "application/octet-stream",
                      ".data": "application/octet-stream"}

    def end_headers(self) -> None:
        # Cross-origin isolation enables SharedArrayBuffer, hence onnxruntime-web's wasm threads.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet unless asked
        if self.server.verbose:  # type: ignore[attr-defined]
            super().log_message(format, *args)


def make_server(site_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = False) -> http.server.ThreadingHTTPServer:
    """An HTTP server for `site_dir` (port 0 picks a free port: see server.server_address)."""
    site = Path(site_dir)
    if not (site / "index.html").is_file():
        raise WebBundleError(f"{site} has no index.html; build it with `sphinx-edge web EXPORT_DIR --out {site}`")
    server = http.server.ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=str(site)))
    server.verbose = verbose  # type: ignore[attr-defined]
    return server
