"""The request file of the C++ runner (runtime/cpp): one question about one image, ready to run.

A device with no Python gets the whole input sequence (`multimodal_inputs.build_inputs`: token
ids and packed image views), the generation settings and the tokenizer's pieces, so the runner
needs neither an image library nor SentencePiece. Layout, all little-endian:

    8 bytes   MAGIC (b"SPHXREQ1")
    4 bytes   uint32: length H of the header
    H bytes   the header, JSON (UTF-8), described in runtime/cpp/README.md
    padding   zeros up to header["data_offset"] (a multiple of 64: the views stay aligned)
    data      the image views, float32 C-order; each image segment names its "offset" (bytes
              from data_offset) and "shape" [3, tile + dino, tile]

Torch-free, like the rest of the runtime.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from sphinx_edge.io import atomic_path
from sphinx_edge.layout import ImageSource
from sphinx_edge.prompt import STOP_STRINGS, ContextOverflowError
from sphinx_edge.runtime.image_cache import image_export_key, image_key
from sphinx_edge.runtime.multimodal_inputs import Segment, build_inputs, sequence_length
from sphinx_edge.runtime.pipeline import Pipeline
from sphinx_edge.tokenizer import Tokenizer

MAGIC = b"SPHXREQ1"
VERSION = 1
ALIGN = 64

# One character per piece: how SentencePiece's DecodeIds treats it. Normal and user-defined pieces
# are text ("▁" is a space), control pieces (<s>, </s>) vanish, the unknown piece prints the
# model's unk surface, byte pieces (<0xNN>) are raw bytes joined into UTF-8.
PIECE_KINDS = {"normal": "n", "control": "c", "unknown": "u", "byte": "b"}


def vocab_header(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a runner needs to turn ids into text exactly as `Tokenizer.decode` does."""
    sp, proto = tokenizer.sp, tokenizer.model_proto()
    # Our runners implement SentencePiece's plain decoding; refuse models that decode otherwise
    # rather than print subtly wrong text on the device.
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError("the tokenizer treats whitespace as a suffix; the C++ runner does not support that")
    if proto.HasField("denormalizer_spec") and proto.denormalizer_spec.precompiled_charsmap:
        raise ValueError("the tokenizer has denormalization rules; the C++ runner does not support them")
    pieces, kinds = [], []
    for i in range(sp.GetPieceSize()):
        pieces.append(sp.IdToPiece(i))
        kind = "control" if sp.IsControl(i) else "unknown" if sp.IsUnknown(i) else "byte" if sp.IsByte(i) else "normal"
        kinds.append(PIECE_KINDS[kind])
    return {
        "pieces": pieces,
        "kinds": "".join(kinds),
        "add_dummy_prefix": proto.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
        "unk_surface": proto.trainer_spec.unk_surface,
    }


def image_cache_entry(pipeline: Pipeline, image: ImageSource, layout: str,
                      image_tokens: int) -> dict[str, Any] | None:
    """Where the runner keeps `image`'s encoded part (runtime/cpp/image_cache.h, `--cache-dir`): the
    key a Pipeline on this export's pte program gives it (Pipeline.image_embeds: the views a request
    holds are never capped, so no max_views), and the part's shape [image tokens, dim]. None for an
    export without a pte program: no runner can run its request."""
    graphs = pipeline.manifest["graphs"].get("pte")
    if not graphs:
        return None
    # Pipeline's export key, from the manifest rather than graph_files, so that a Core ML export
    # gets its key off Apple hosts too.
    files = {name: graph["files"] for name, graph in graphs.items()}
    return {"key": image_key(image_export_key(pipeline.manifest, files), image, layout),
            "shape": [image_tokens, pipeline.config.llm.dim]}


def encode_request(pipeline: Pipeline, segments: list[Segment], max_new_tokens: int,
                   image_cache: dict[str, Any] | None = None) -> bytes:
    """The request file's bytes for `segments` of `pipeline`'s model; `image_cache` (from
    `image_cache_entry`) lets the runner keep the encoded image across runs."""
    cfg = pipeline.config
    entries, blobs, offset = [], [], 0
    for s in segments:
        if s.kind == "tokens":
            entries.append({"tokens": [int(t) for t in s.tokens]})
            continue
        view = np.ascontiguousarray(s.image, dtype="<f4")
        entries.append({"image": {"shape": list(view.shape), "offset": offset}})
        blobs.append(view.tobytes())
        offset += view.nbytes
    header: dict[str, Any] = {
        "version": VERSION,
        "model": cfg.name,
        # What the program must be: the runner checks these against its constant methods, so a
        # request made for another export fails clearly instead of producing noise.
        "program": {"tokens_per_view": cfg.tokens_per_view, "tile_size": cfg.convnext.image_size,
                    "dino_size": cfg.dinov2.image_size, "skip_id": cfg.skip_id,
                    "vocab_size": cfg.llm.vocab_size, "max_seq_len": cfg.llm.max_seq_len,
                    "embedding_rows": cfg.llm.vocab_size + cfg.n_special_tokens},
        "sequence_length": sequence_length(segments, cfg.tokens_per_view),
        "max_new_tokens": max_new_tokens,
        "eos_ids": [pipeline.tokenizer.eos_id],
        "stop_strings": list(STOP_STRINGS),
        "segments": entries,
        "data_bytes": offset,
        "vocab": vocab_header(pipeline.tokenizer),
    }
    if image_cache is not None:  # optional: a runner given a request without it does not cache
        header["image_cache"] = image_cache
    # data_offset depends on the header's own length: fix it at a bound, then pad to it.
    header["data_offset"] = 0
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    data_offset = -(-(len(MAGIC) + 4 + len(text) + 16) // ALIGN) * ALIGN
    header["data_offset"] = data_offset
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<I", len(text)) + text
    assert len(prefix) <= data_offset  # the 16 spare bytes cover data_offset's own digits
    return prefix + bytes(data_offset - len(prefix)) + b"".join(blobs)


def write_request(export_dir: str | os.PathLike, image: ImageSource | None, question: str,
                  out: str | os.PathLike, *, max_new_tokens: int = 128, layout: str | None = None) -> dict[str, Any]:
    """Writes the request for `question` about `image` (atomically) and returns a summary:
    sequence length, image tokens, views, skip tokens, bytes. `layout` overrides the model's."""
    # No backend: only the manifest checks, the model config and the tokenizer.
    pipeline = Pipeline(export_dir, backend=None)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    layout = layout or pipeline.config.layout
    segments = build_inputs(pipeline.config, pipeline.tokenizer, image, question, layout=layout)
    length = sequence_length(segments, pipeline.config.tokens_per_view)
    if length >= pipeline.config.llm.max_seq_len:
        raise ContextOverflowError(f"the prompt takes {length} tokens; the context holds "
                                   f"{pipeline.config.llm.max_seq_len}. Ask a shorter question.")
    skip, views = pipeline.config.skip_id, sum(s.kind == "image" for s in segments)
    skipped = sum(t == skip for s in segments for t in s.tokens)
    image_tokens = views * pipeline.config.tokens_per_view + skipped
    cache = image_cache_entry(pipeline, image, layout, image_tokens) if image is not None else None
    blob = encode_request(pipeline, segments, max_new_tokens, cache)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(blob)
    return {"sequence_length": length, "image_tokens": image_tokens, "views": views, "skipped_tiles": skipped,
            "bytes": len(blob)}


def read_request_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a request file (for tools and tests; the runner parses it in C++)."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a sphinx-edge request file (bad magic)")
        (size,) = struct.unpack("<I", head[len(MAGIC):])
        return json.loads(f.read(size).decode())


def decode_request(blob: bytes) -> tuple[dict[str, Any], list[Segment]]:
    """The header and segments of a request file's bytes, checked as the C++ reader checks them
    (runtime/cpp/request.h): ValueError for anything out of bounds."""
    if len(blob) < len(MAGIC) + 4 or blob[: len(MAGIC)] != MAGIC:
        raise ValueError("not a sphinx-edge request file (bad magic)")
    (size,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    if len(MAGIC) + 4 + size > len(blob):
        raise ValueError("truncated: the header runs past the end of the file")
    header = json.loads(blob[len(MAGIC) + 4:len(MAGIC) + 4 + size].decode())  # ValueError when broken
    try:
        segments = _segments(blob, header)
        if "image_cache" in header:
            _check_image_cache(header["image_cache"], segments, header["sequence_length"])
        return header, segments
    except (KeyError, TypeError, AttributeError, IndexError, OverflowError) as e:
        raise ValueError(f"the request header is malformed ({type(e).__name__}: {e})") from e


def _segments(blob: bytes, header: dict[str, Any]) -> list[Segment]:
    offset, nbytes = header["data_offset"], header["data_bytes"]
    if not (0 <= offset <= len(blob) and 0 <= nbytes <= len(blob) - offset and nbytes % 4 == 0):
        raise ValueError("truncated: the image data runs past the end of the file")
    data = np.frombuffer(blob, dtype="<f4", count=nbytes // 4, offset=offset)
    program = header["program"]
    rows = program["embedding_rows"] if "embedding_rows" in program else program["vocab_size"] + 3
    segments = []
    for entry in header["segments"]:
        if "tokens" in entry:
            tokens = [int(t) for t in entry["tokens"]]
            if not tokens or not all(0 <= t < rows for t in tokens):
                raise ValueError("a token segment is empty or holds an id outside the embedding table")
            segments.append(Segment(tokens=tuple(tokens)))
            continue
        shape, start = entry["image"]["shape"], entry["image"]["offset"]
        count = int(np.prod(shape)) if len(shape) == 3 and all(d > 0 for d in shape) else -1
        if count < 0 or start % 4 or not 0 <= start <= nbytes or count > (nbytes - start) // 4:
            raise ValueError("an image segment's shape or offset does not fit the image data")
        segments.append(Segment(image=data[start // 4:start // 4 + count].reshape(shape)))
    return segments


def _check_image_cache(entry: dict[str, Any], segments: list[Segment], length: int) -> None:
    """As request.h's cached_image: a key that can only name a file, and an image part inside the
    sequence, from the first view on."""
    key, shape = entry["key"], entry["shape"]
    if not (isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)
            and len(shape) == 2 and all(type(d) is int and d >= 1 for d in shape)):
        raise ValueError("image_cache needs a key of 64 hex digits and a shape [tokens, dim]")
    kinds = [s.kind for s in segments]
    if "image" not in kinds:
        raise ValueError("image_cache names an image, the request has none")
    start = sum(len(s.tokens) for s in segments[:kinds.index("image")])
    if shape[0] > length - start:
        raise ValueError(f"the image part ({shape[0]} tokens) runs past the sequence")
