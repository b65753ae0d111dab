"""Shared test vectors for runtime/web: what the Python side computes, for the JS side to match.

    python tests/runtime/web_vectors.py OUT_DIR [TOKENIZER_MODEL]
    SPHINX_WEB_VECTORS=OUT_DIR node --test runtime/web/test/

Tiling: per case, the decoded RGBA pixels (as a browser canvas gives them), and Python's RGB image
(layout.load_image), canvas (make_canvas) and packed views (pack_views), plus the plan. Tokenizer:
tokenizer.json (web_bundle.tokenizer_json) and sentencepiece's ids and decoded text for many strings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sphinx_edge.layout import image_segments, load_image, make_canvas, make_views, pack_views, plan_tiles
from sphinx_edge.prompt import SYSTEM_PROMPT, VQA_SUFFIX, format_prompt
from sphinx_edge.runtime.web_bundle import tokenizer_json
from sphinx_edge.tokenizer import Tokenizer

NANO = dict(layout="sphinx-x", grid=2, tile_size=128, dino_size=56)  # Nano 1's views: geometry only, no model
# (name, width, height, geometry, alpha): aspect ratios 1:1, 2:1, 1:3, 4:1, tiny and odd sizes, an exact
# fit (no resampling), downscaling, the other layout, a 3x3 grid, full-size views, transparency.
TILING_CASES = [
    ("square_97", 97, 97, NANO, False),
    ("wide_2x1", 201, 100, NANO, False),
    ("tall_1x3", 50, 151, NANO, False),
    ("wide_4x1", 300, 75, NANO, False),
    ("pixel_1x1", 1, 1, NANO, False),
    ("tiny_3x2", 3, 2, NANO, False),
    ("thin_1x7", 1, 7, NANO, False),
    ("exact_256x128", 256, 128, NANO, False),
    ("down_640x481", 640, 481, NANO, False),
    ("1k_90x40", 90, 40, dict(layout="sphinx-1k", grid=2, tile_size=64, dino_size=28), False),
    ("1k_33x77", 33, 77, dict(layout="sphinx-1k", grid=2, tile_size=64, dino_size=28), False),
    ("grid3_100x30", 100, 30, dict(layout="sphinx-x", grid=3, tile_size=64, dino_size=28), False),
    ("full_tiny_300x140", 300, 140, dict(layout="sphinx-x", grid=2, tile_size=512, dino_size=224), False),
    ("alpha_41x29", 41, 29, NANO, True),
]

TOKENIZER_STRINGS = [
    "", " ", "a", "What colour is the circle?", "How many squares are there?",
    "Which side is the yellow triangle on?", "What number is written in the image?",
    "The number is 42.", "0123456789", "1 22 333 4444", "3.14159, -7 and 1e10", "x²+y³=z⁴",
    "line one\nline two", "\n", "\n\n###", "###", " ### Human:", "trailing newline\n", "tabs\there\tand\tthere",
    "  two leading spaces", "double  space   triple", "trailing space ", "\r\nwindows\r\n",
    "Hello, world! (really?) [yes] {no} <maybe> 'quotes' \"double\" `back`", "a-b_c/d\\e|f@g#h$i%j^k&l*m",
    "café naïve façade", "Grüße aus Köln", "日本語のテキスト", "한국어", "Привет, мир", "مرحبا", "🙂 emoji 🚀🚀",
    "e\u0301 combining", "\u2581 the escape char itself", "<s> </s> <unk> <0x41>", "ﬁ ligature ① Ｆｕｌｌ",
    "\x00 nul and \x7f del", "\ufeffbom", "A" * 60, "ab" * 40,
    SYSTEM_PROMPT, VQA_SUFFIX,
    format_prompt([("What colour is the circle?", None)]),
    format_prompt([("How many crosses are there?" + VQA_SUFFIX, None)]),
    format_prompt([("What shape is shown?", "circle"), ("And its colour? 日本 🙂", None)]),
]


def _pixels(width: int, height: int, seed: int, alpha: bool) -> np.ndarray:
    """Deterministic structure (gradients, a block, noise): [h, w, 4] uint8, opaque unless `alpha`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 7 + y * 3) % 256], -1)
    rgb = (rgb + rng.integers(-40, 40, rgb.shape)).clip(0, 255)
    rgb[height // 4: height // 2 + 1, width // 4: width // 2 + 1] = (200, 30, 30)
    a = rng.integers(0, 256, (height, width)) if alpha else np.full((height, width), 255)
    if alpha:
        a[0, :] = 0  # fully transparent and fully opaque rows, too
        a[-1, :] = 255
    return np.dstack([rgb, a]).astype(np.uint8)


def write_tiling_vectors(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for seed, (name, w, h, geometry, alpha) in enumerate(TILING_CASES):
        rgba = _pixels(w, h, seed, alpha)
        png = out / f"{name}.png"
        Image.fromarray(rgba if alpha else rgba[..., :3]).save(png)  # RGBA or RGB by the channel count
        image = load_image(png)  # the Python runtime's decode: RGB, alpha over white
        plan = plan_tiles(*image.size, **geometry)
        canvas = make_canvas(image, plan)
        views = pack_views(*make_views(image, plan))
        rgba.tofile(out / f"{name}.rgba")
        np.asarray(image, np.uint8).tofile(out / f"{name}.rgb")
        np.asarray(canvas, np.uint8).tofile(out / f"{name}.canvas")
        views.astype("<f4").tofile(out / f"{name}.views")
        cases.append({
            "name": name, "width": w, "height": h,
            "cfg": {"layout": plan.layout, "grid": plan.grid, "tileSize": plan.tile_size, "dinoSize": plan.dino_size},
            "canvasSize": plan.canvas_size, "contentBox": list(plan.content_box), "encoded": list(plan.encoded),
            "segments": [list(s) for s in image_segments(plan)], "viewsShape": list(views.shape),
        })
    (out / "tiling.json").write_text(json.dumps(cases, indent=1))
    return cases


def write_tokenizer_vectors(model_file: str | Path, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(model_file)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(model_file), ensure_ascii=False))
    cases = [{"text": s, "ids": tok.encode(s, bos=True), "decoded": tok.decode(tok.encode(s))} for s in TOKENIZER_STRINGS]
    # Decoding arbitrary id runs: stray byte pieces (invalid UTF-8), control ids, a leading "▁" piece.
    rng = np.random.default_rng(0)
    decode_cases = [[int(i) for i in rng.integers(0, tok.vocab_size, n)] for n in (1, 2, 3, 5, 8, 13, 30) for _ in range(6)]
    decode_cases += [[1, 2], [0], [0, 0, 5], [200, 201], [3, 3], [1, 3, 300]]
    byte = {b: tok.sp.PieceToId(f"<0x{b:02X}>") for b in range(256)}
    for text in ("é", "日本", "🙂"):  # complete, truncated and reordered UTF-8 byte runs
        ids = [byte[b] for b in text.encode()]
        decode_cases += [ids, ids[:-1], ids[1:], ids[::-1], [300, *ids[:-1], 300]]
    decode_cases = [{"ids": ids, "decoded": tok.decode(ids)} for ids in decode_cases]
    (out / "tokenizer_cases.json").write_text(json.dumps({"encode": cases, "decode": decode_cases}, ensure_ascii=False))
    return cases


def bundled_tokenizer() -> Path:
    import sphinx_edge

    return Path(sphinx_edge.__file__).parent / "weights" / "nano" / "tokenizer.model"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    target = Path(sys.argv[1])
    write_tiling_vectors(target)
    write_tokenizer_vectors(sys.argv[2] if len(sys.argv) == 3 else bundled_tokenizer(), target)
    print(f"wrote test vectors to {target}")
