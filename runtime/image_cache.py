"""Encoded images, kept: the image part of the sequence ([image tokens, dim], after the vision encoder
and the skip embeddings) for as long as a Pipeline lives, and optionally on disk across processes.

An entry is keyed by what decides its values: the export (the SHA-256 of its vision encoder and token
embedding files, from the manifest), the image's bytes (or pixels, for an image given decoded), the
layout and the view budget. On disk (`--cache-dir`) each entry is one file written atomically, whose header carries a
checksum of the array: a file that does not match (cut short, altered) is refused, removed and the
image encoded again. The folder is bounded in size; the entries used least recently go first.
Torch-free.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from sphinx_edge.io import atomic_path
from sphinx_edge.layout import ImageSource

MAGIC = b"SPHINX-EDGE-IMAGE-1\n"
SUFFIX = ".img"
MEMORY_ENTRIES = 8  # images kept in memory per pipeline (a conversation needs one)
DEFAULT_DISK_BYTES = 512 * 2**20


def export_key(manifest: dict, files: list[str]) -> str:
    """What identifies an export's image encoding: the hashes of the files that compute it."""
    digests = [manifest["files"][f]["sha256"] for f in sorted(files)]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def image_export_key(manifest: dict, files_by_graph: dict[str, list[str]]) -> str:
    """`export_key` over the graphs that compute an image's part of the sequence: all but the decoder's."""
    return export_key(manifest, [f for graph, files in files_by_graph.items() if graph != "decoder" for f in files])


def image_key(export: str, image: ImageSource, layout: str, max_views: int | None = None) -> str:
    h = hashlib.sha256(f"{export}\n{layout}\n".encode() + (f"max_views {max_views}\n".encode() if max_views else b""))
    if isinstance(image, Image.Image):
        h.update(f"{image.mode} {image.size}\n".encode())
        h.update(image.tobytes())
    elif isinstance(image, bytes):
        h.update(image)
    else:
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ImageCache:
    """In memory (a few entries, most recent kept) and, with `directory`, on disk (bounded LRU)."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, tuple[np.ndarray, dict]] = OrderedDict()
        self.refused: list[str] = []  # disk entries found corrupt (and removed) by this cache

    def get(self, key: str) -> tuple[np.ndarray, dict] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        found = self._read(key) if self.directory is not None else None
        if found is not None:
            self._remember(key, found)
        return found

    def put(self, key: str, embeds: np.ndarray, info: dict) -> None:
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        self._remember(key, (embeds, info))
        if self.directory is not None:
            self._write(key, embeds, info)

    # -- memory ------------------------------------------------------------------------------

    def _remember(self, key: str, entry: tuple[np.ndarray, dict]) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY_ENTRIES:
            self._memory.popitem(last=False)

    # -- disk --------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _write(self, key: str, embeds: np.ndarray, info: dict) -> None:
        data = embeds.tobytes()
        header = json.dumps({"shape": list(embeds.shape), "dtype": "float32", "info": info,
                             "sha256": hashlib.sha256(data).hexdigest()}).encode()
        with atomic_path(self._path(key)) as tmp:
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(4, "little") + header + data)
        self._evict()

    def _read(self, key: str) -> tuple[np.ndarray, dict] | None:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            if not raw.startswith(MAGIC):
                raise ValueError("not a sphinx-edge image cache entry")
            stream = io.BytesIO(raw[len(MAGIC):])
            header = json.loads(stream.read(int.from_bytes(stream.read(4), "little")))
            data = stream.read()
            if hashlib.sha256(data).hexdigest() != header["sha256"]:
                raise ValueError("its checksum does not match")
            embeds = np.frombuffer(data, dtype=np.float32).reshape(header["shape"])
        except (ValueError, KeyError, TypeError) as e:  # a corrupt entry: refused, removed, recomputed
            self.refused.append(f"{path.name}: {e}")
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # most recently used
        return embeds, header["info"]

    def _evict(self) -> None:
        entries = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in self.directory.glob(f"*{SUFFIX}"))
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
