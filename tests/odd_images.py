"""A corpus of odd image files, built here: every format Pillow can write, in the modes it takes,
each also truncated, corrupted and oversized; plus decompression bombs and files of formats
Pillow only reads that are broken in the ways their plugins trip over.

`build_corpus(dir)` returns {file name: kind}, kind one of "good", "truncated", "corrupted",
"oversized" (decodes, but larger than any tiling needs), "bomb" (more pixels than Pillow will
decode) and "broken" (hand-made headers of read-only formats).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("RGB", "L", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "LA", "YCbCr")
SKIP_FORMATS = {"PDF", "PALM", "XVTHUMB"}  # write-only for Pillow (it cannot read them back)


def _sample(mode: str, size: tuple[int, int] = (48, 32)) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * y) % 256], -1).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode in ("I;16", "I", "F"):
        return Image.fromarray((np.asarray(im.convert("L"), np.float32) * 257).astype(
            {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]), mode)
    return im.convert(mode)


def _encodings() -> dict[str, bytes]:
    """Every (format, mode) pair Pillow writes and can read back: {"FORMAT-MODE.ext": bytes}."""
    Image.init()
    out = {}
    for fmt in sorted(Image.SAVE):
        if fmt in SKIP_FORMATS:
            continue
        ext = next((e for e, f in Image.EXTENSION.items() if f == fmt), "." + fmt.lower())
        for mode in MODES:
            buf = io.BytesIO()
            try:
                _sample(mode).save(buf, format=fmt)
                with Image.open(io.BytesIO(buf.getvalue())) as back:
                    back.load()
            except Exception:  # noqa: BLE001 - this format does not take this mode
                continue
            out[f"{fmt}-{mode.replace(';', '_')}{ext}"] = buf.getvalue()
    return out


def _corrupt(data: bytes) -> bytes:
    """Bytes flipped through the middle of the file, the header (first 16 bytes) kept."""
    b = bytearray(data)
    rng = np.random.default_rng(len(data))
    for i in rng.integers(min(16, len(b) - 1), len(b), size=max(4, len(b) // 50)):
        b[i] ^= 0xFF
    return bytes(b)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A grey PNG of side x side pixels (400 MP at the default) that compresses to about 0.4 MB."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" * (side + 1)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A small valid PNG with a zTXt chunk that inflates past Pillow's text limit."""
    buf = io.BytesIO()
    _sample("RGB").save(buf, "PNG")
    data = buf.getvalue()
    ztxt = b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)
    return data[:33] + _png_chunk(b"zTXt", ztxt) + data[33:]


def _broken_read_only() -> dict[str, bytes]:
    """Headers of formats Pillow reads but does not write, broken where their plugins are fragile."""
    dds_header = (b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + b"\x00" * 44
                  + struct.pack("<2I", 32, 0x4) + b"XYZW" + b"\x00" * 20 + struct.pack("<5I", 0x1000, 0, 0, 0, 0))
    tiff = io.BytesIO()
    _sample("RGB").save(tiff, "TIFF", save_all=True)
    tiff_bytes = bytearray(tiff.getvalue())
    tiff_bytes[4:8] = struct.pack("<I", len(tiff_bytes) + 1000)  # the first IFD lies past the end
    fits = b"".join(f"{card:<80}".encode() for card in ("SIMPLE  =                    T", "BITPIX  =                    8",
                                                         "NAXIS   =                    0", "END")).ljust(2880, b" ")
    return {"DDS-fourcc-XYZW.dds": dds_header + b"\x00" * 256, "TIFF-ifd-past-end.tif": bytes(tiff_bytes),
            "FITS-no-data.fits": fits, "PNG-text-bomb.png": png_text_bomb(), "PNG-bomb.png": png_bomb()}


def build_corpus(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}

    def write(name: str, data: bytes, kind: str) -> None:
        (directory / name).write_bytes(data)
        kinds[name] = kind

    for name, data in _encodings().items():
        write(name, data, "good")
        write(f"truncated-{name}", data[: max(1, len(data) // 2)], "truncated")
        write(f"corrupted-{name}", _corrupt(data), "corrupted")
    for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("TIFF", ".tif")):
        buf = io.BytesIO()
        _sample("RGB", (3000, 2000)).save(buf, fmt)
        write(f"oversized-{fmt}{ext}", buf.getvalue(), "oversized")
        buf = io.BytesIO()
        _sample("RGB", (4000, 3)).save(buf, fmt)  # extreme aspect ratio
        write(f"oversized-thin-{fmt}{ext}", buf.getvalue(), "oversized")
    for name, data in _broken_read_only().items():
        write(name, data, "bomb" if "bomb" in name else "broken")
    write("empty.png", b"", "broken")
    write("not-an-image.jpg", b"just text, not pixels\n" * 10, "broken")
    return kinds
