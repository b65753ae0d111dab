"""`manifest.json`: what an export directory holds, and the check that it is intact.

The manifest names the model (its full config), the layout, the quantization, every file with
its size and SHA-256, the IO of every graph, the tool versions and the export's own verification
figures. The runtime loads nothing that the manifest does not vouch for. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def decoder_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The ONNX decoder's input and output names, in order (optimum's contract; `export/graphs.py`)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


class ManifestError(ValueError):
    """An export directory that is missing, incomplete, tampered with or of another version."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed manifest of `export_dir` (not yet checked against the files: see `check_files`)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise ManifestError(f"{export_dir} is not a directory; give the directory `sphinx-edge export` wrote")
    if not path.exists():
        raise ManifestError(f"{export_dir} has no {MANIFEST}: it is not a finished sphinx-edge export "
                            "(an interrupted export leaves no manifest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ManifestError(f"{path} has format version {version!r}; this sphinx-edge reads version {FORMAT_VERSION}")
    for key in ("model", "files", "graphs"):
        if key not in manifest:
            raise ManifestError(f"{path} lacks the {key!r} section")
    _check_structure(manifest, path)
    return manifest


def _check_structure(manifest: dict[str, Any], path: Path) -> None:
    """The manifest's shape, and every file it names confined to the export directory: a file
    entry is a plain name (no directory part, no "..", not absolute) with a size and a SHA-256."""
    files = manifest["files"]
    if not isinstance(files, dict):
        raise ManifestError(f"{path}: 'files' must map file names to entries")
    for name, entry in files.items():
        check_file_name(name, path)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool)
                and entry["bytes"] >= 0 and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
                and all(c in "0123456789abcdef" for c in entry["sha256"])):
            raise ManifestError(f"{path}: the entry of {name!r} needs 'bytes' (a size) and 'sha256' (64 hex digits)")
    if not isinstance(manifest["model"], dict) or not isinstance(manifest["model"].get("config"), dict):
        raise ManifestError(f"{path}: 'model' must hold the model's 'config'")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        raise ManifestError(f"{path}: 'graphs' must map each format to its components")
    for fmt, components in graphs.items():
        for component, graph in components.items():
            names = graph.get("files") if isinstance(graph, dict) else None
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in files for n in names):
                raise ManifestError(f"{path}: graph {fmt}/{component} must list its files, each one in 'files'")
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or tokenizer not in files):
        raise ManifestError(f"{path}: the tokenizer {tokenizer!r} is not in 'files'")


def check_file_name(name: Any, manifest_path: Path) -> None:
    """A manifest's file names are plain names inside the export directory."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or name == MANIFEST):
        raise ManifestError(f"{manifest_path}: {name!r} is not a file name inside the export directory")


def check_files(export_dir: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Raises ManifestError unless every listed file (or those in `names`) exists with its recorded
    size and hash."""
    export_dir = Path(export_dir)
    files = manifest["files"]
    for name in names if names is not None else list(files):
        if name not in files:
            raise ManifestError(f"{name} is not listed in {export_dir / MANIFEST}")
        path = export_dir / name
        if not path.exists():
            raise ManifestError(f"{path} is missing (listed in the manifest)")
        entry = files[name]
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise ManifestError(f"{path} does not match its manifest hash: the file was changed or "
                                "belongs to another export; export again")


def graph_files(manifest: dict[str, Any], fmt: str) -> dict[str, list[str]]:
    """{component: [files]} for format "onnx" or "pte"; ManifestError if the export lacks it."""
    graphs = manifest["graphs"].get(fmt)
    if not graphs:
        have = ", ".join(manifest["graphs"]) or "none"
        raise ManifestError(f"this export has no {fmt} graphs (it has: {have}); export with --format {fmt}")
    program = graphs.get("program", {})
    delegate = program.get("delegate", program.get("backend", "xnnpack"))  # "backend" before 2026-12-03
    if delegate == "coreml" and sys.platform != "darwin":
        raise ManifestError("this export's vision encoder is a Core ML delegate, which runs on Apple devices only; "
                            "run it there, or export with --delegate xnnpack to run it here")
    return {name: g["files"] for name, g in graphs.items()}
