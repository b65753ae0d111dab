"""Image loading, tiling, views and the image token layout of SPHINX-X (docs/ARCHITECTURE.md, section 1).

TORCH-FREE on purpose: the model (training, export) and the torch-free runtime both import this
module, so that both cut an image into views the same way. Only numpy, pillow and the standard
library may be imported here.

    image --load_image--> RGB --plan_tiles--> TilePlan --make_canvas--> canvas (PIL)
          --make_views--> ConvNeXt views [N, 3, tile, tile], DINOv2 views [N, 3, dino, dino]

Two layouts: "sphinx-1k" (pad to a centred square, resize to the canvas; all 4 tiles encoded,
parity with the released checkpoints; on a 1x1 grid the global view alone, as the one-view SPHINX
and SPHINX-MoE) and "sphinx-x" (resize the image into the top-left corner of a g x g tile canvas;
fully padded tiles are replaced by one skip token each).
"""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import LAYOUTS, layout_tiles

PAD_RGB = (122, 116, 104)  # int(255 * CLIP mean), as LLaMA2-Accessory pads: normalises to ~0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = str | os.PathLike | bytes | Image.Image
ORIENTATION_TAG = 0x0112  # EXIF

# ---------------------------------------------------------------------------------------------
# Loading


class ImageLoadError(ValueError):
    """The image cannot be used: missing, empty, not an image, corrupt, truncated or zero-sized."""


def load_image(source: ImageSource) -> Image.Image:
    """Decode `source` (path, encoded bytes or PIL image) into an upright RGB image.

    The whole image is decoded here, so a truncated file fails now with ImageLoadError rather
    than later with an OSError deep in preprocessing. Any failure of any Pillow plugin is an
    ImageLoadError that names the file.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        return _to_rgb(_decode(source, name), name)
    with _opened(source) as (im, name):
        image = _decode(im, name)
    return _to_rgb(image, name)


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of the upright image, read from the file's header: nothing is decoded."""
    if isinstance(source, Image.Image):
        im, name = source, getattr(source, "filename", "") or "<PIL image>"
        return _upright_size(im, name)
    with _opened(source) as (im, name):
        return _upright_size(im, name)


def _upright_size(im: Image.Image, name: str) -> tuple[int, int]:
    try:
        w, h = im.size
        if im.format == "PNG":  # PNG's getexif decodes the whole image to look past IDAT: the header's only
            exif = Image.Exif()
            if "exif" in im.info:
                exif.load(im.info["exif"])
            orientation = exif.get(ORIENTATION_TAG, 1)
        else:
            orientation = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception as e:  # noqa: BLE001 - a plugin's header parser may raise anything
        raise ImageLoadError(f"cannot read the header of {name!r}: the file is corrupt ({_reason(e)})") from e
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"{name!r} has a zero dimension ({w}x{h})")
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # EXIF orientations that turn the image


@contextlib.contextmanager
def _opened(source: str | os.PathLike | bytes) -> Iterator[tuple[Image.Image, str]]:
    """The image opened lazily (header parsed, pixels not decoded) and its name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError("the image data is empty (0 bytes)")
        name, fp = "<bytes>", io.BytesIO(bytes(source))
    else:
        name = fp = os.fspath(source)
        if not os.path.exists(name):
            raise ImageLoadError(f"image file {name!r} does not exist")
        if not os.path.isfile(name):
            raise ImageLoadError(f"image path {name!r} is not a file")
        if os.path.getsize(name) == 0:
            raise ImageLoadError(f"image file {name!r} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused above twice the limit
            im = Image.open(fp)
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name!r} is not an image in a format Pillow can read") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name!r} is too large to decode safely ({_reason(e)})") from e
    except PermissionError as e:
        raise ImageLoadError(f"cannot read {name!r}: permission denied") from e
    except Exception as e:  # noqa: BLE001 - plugins raise ValueError, NotImplementedError, SyntaxError, ...
        raise ImageLoadError(f"cannot read {name!r}: the file is corrupt or of an unsupported kind ({_reason(e)})") from e
    try:
        yield im, name
    finally:
        im.close()


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _decode(im: Image.Image, name: str) -> Image.Image:
    """Force the full decode and apply the EXIF orientation; returns a copy detached from the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused above twice the limit
            im.load()
            image = ImageOps.exif_transpose(im)  # a new image either way: the caller's stays untouched
    except (MemoryError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{name!r} is too large to decode safely ({_reason(e)})") from e
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageLoadError(f"cannot decode {name!r}: the file is corrupt or truncated ({_reason(e)})") from e
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{name!r} has a zero dimension ({image.width}x{image.height})")
    return image


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    try:
        return _rgb(im)
    except MemoryError as e:
        raise ImageLoadError(f"{name!r} is too large to convert ({im.width}x{im.height} {im.mode})") from e
    except Exception as e:  # noqa: BLE001 - a mode Pillow cannot convert, or a broken palette
        raise ImageLoadError(f"{name!r}: cannot convert image mode {im.mode!r} to RGB ({_reason(e)})") from e


def _rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are composited onto white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF, PGM decode to "I;16*" or "I"): scale 0..65535 -> 0..255.
        # Pillow's own convert("L") clips at 255 instead, which turns most images white.
        return _gray_to_rgb(np.clip(np.asarray(im, np.float64), 0, 65535) / 257.0)
    if mode == "F":
        # Float images come as 0..1 (most TIFF writers) or 0..255 (Pillow's convention): a
        # maximum <= 1 means the former. Non-finite values become black.
        x = np.nan_to_num(np.asarray(im, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return _gray_to_rgb(np.clip(x * 255.0 if x.max() <= 1.0 else x, 0, 255))
    if mode in ("La", "RGBa"):
        # Premultiplied alpha: colour over white = premultiplied colour + (255 - alpha).
        x = np.asarray(im).astype(np.int32)
        rgb = np.clip(x[..., :-1] + 255 - x[..., -1:], 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(rgb, 3 // rgb.shape[-1], axis=-1))
    if _has_alpha(im):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    # "transparency" covers palette tRNS and colour-key transparency of L / RGB PNGs.
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(gray).astype(np.uint8)).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Tiling


@dataclass(frozen=True)
class TilePlan:
    """Where an image lands on the canvas and which of the grid x grid tiles get encoded."""

    layout: str  # "sphinx-1k" or "sphinx-x"
    grid: int  # tiles per side
    tile_size: int  # ConvNeXt view side (512 at full size)
    dino_size: int  # DINOv2 view side (224 at full size)
    image_size: tuple[int, int]  # original (w, h)
    canvas_size: int  # grid * tile_size
    content_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the image pixels on the canvas
    encoded: tuple[bool, ...]  # per tile, row-major: True = encoded, False = skip token (sphinx-1k 1x1: none)

    @property
    def view_tiles(self) -> tuple[int, ...]:
        """Indices of the encoded tiles, row-major: views 1.. of make_views, in this order."""
        return tuple(i for i, enc in enumerate(self.encoded) if enc)

    @property
    def n_views(self) -> int:
        return 1 + len(self.view_tiles)  # the global view + the encoded tiles

    @property
    def n_skipped(self) -> int:
        """Skip tokens in the sequence: one per tile not encoded (none in sphinx-1k, which has no skip token)."""
        return len(self.encoded) - len(self.view_tiles) if self.layout == "sphinx-x" else 0

    def n_image_tokens(self, tokens_per_view: int) -> int:
        return self.n_views * tokens_per_view + self.n_skipped

    def tile_box(self, index: int, side: int | None = None) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of tile `index` on a canvas of grid x grid cells of `side` (default tile_size)."""
        side = self.tile_size if side is None else side
        r, c = divmod(index, self.grid)
        return c * side, r * side, (c + 1) * side, (r + 1) * side


def plan_tiles(
    width: int, height: int, *, layout: str, grid: int = 2, tile_size: int = 512, dino_size: int = 224,
    max_views: int | None = None,
) -> TilePlan:
    """Decide the canvas geometry and the encoded tiles from the image size alone (no pixels).

    `max_views` is a budget of encoded views, the global one included (1 = the global view alone):
    the tiles holding the most image pixels are kept (row-major among equals) and the others are
    left out as a fully padded tile is (docs/ARCHITECTURE.md, "Views and tokens").
    """
    args = dict(width=width, height=height, grid=grid, tile_size=tile_size, dino_size=dino_size)
    if max_views is not None:
        args["max_views"] = max_views
    for arg, value in args.items():
        if operator.index(value) < 1:
            raise ValueError(f"{arg} must be positive, got {value}")
    w, h, grid, tile_size, dino_size = (operator.index(args[k]) for k in ("width", "height", "grid", "tile_size", "dino_size"))
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "sphinx-1k" and grid not in (1, 2):
        raise ValueError(f"the sphinx-1k layout has a 2x2 grid (or 1: the global view alone), got grid={grid}")
    canvas = grid * tile_size
    if layout == "sphinx-1k":
        # The image sits centred in an S x S square that is scaled by canvas / S. The box is the
        # image's scaled float edges rounded outward (exact integer arithmetic); bicubic
        # resampling blends the edge pixels with the padding anyway. Every tile is encoded; a 1x1
        # grid has none (its one tile would be the global view again).
        side = max(w, h)
        ox, oy = (side - w) // 2, (side - h) // 2
        box = (
            ox * canvas // side,
            oy * canvas // side,
            _ceil_div((ox + w) * canvas, side),
            _ceil_div((oy + h) * canvas, side),
        )
        encoded = (True,) * layout_tiles(layout, grid)
    else:
        new_w, new_h = fit_size(w, h, canvas)
        box = (0, 0, new_w, new_h)
        # A tile is encoded iff it holds at least one image pixel; the image is at the top-left.
        cols = [c * tile_size < new_w for c in range(grid)]
        rows = [r * tile_size < new_h for r in range(grid)]
        encoded = tuple(row and col for row in rows for col in cols)
    if max_views is not None and sum(encoded) > max_views - 1:
        encoded = _within_budget(encoded, box, grid, tile_size, max_views - 1)
    return TilePlan(layout, grid, tile_size, dino_size, (w, h), canvas, box, encoded)


def _within_budget(encoded: tuple[bool, ...], box: tuple[int, int, int, int], grid: int, tile_size: int,
                   n_tiles: int) -> tuple[bool, ...]:
    """The `n_tiles` encoded tiles with the largest share of the image (row-major among equals)."""
    x0, y0, x1, y1 = box

    def pixels(tile: int) -> int:
        r, c = divmod(tile, grid)
        w = min(x1, (c + 1) * tile_size) - max(x0, c * tile_size)
        h = min(y1, (r + 1) * tile_size) - max(y0, r * tile_size)
        return max(w, 0) * max(h, 0)

    kept = sorted((t for t, enc in enumerate(encoded) if enc), key=lambda t: (-pixels(t), t))[:n_tiles]
    return tuple(t in kept for t in range(len(encoded)))


def fit_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) scaled so that the longer side equals `side`, aspect kept, each at least 1 pixel.

    Rounds half up in exact integer arithmetic (round(w * side / max(w, h)) would round half to
    even and depend on float error).
    """
    longer = max(width, height)
    return (max(1, (2 * width * side + longer) // (2 * longer)),
            max(1, (2 * height * side + longer) // (2 * longer)))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_canvas(image: Image.Image, plan: TilePlan) -> Image.Image:
    """The canvas_size x canvas_size RGB canvas, resized with PIL bicubic as the reference does.

    (PIL resamples in two uint8 passes; a one-pass float bicubic differs by up to 20 grey levels at
    sharp edges, so PIL it is.) sphinx-1k materialises the padded S x S square, as the reference
    does: memory grows with the longer side squared for extreme aspect ratios.
    """
    if image.mode != "RGB" or image.size != plan.image_size:
        raise ValueError(f"expected an RGB image of size {plan.image_size}, got {image.mode} {image.size} "
                         "(use load_image, and plan_tiles on its size)")
    canvas = plan.canvas_size
    if plan.layout == "sphinx-1k":
        w, h = image.size
        side = max(w, h)
        square = Image.new("RGB", (side, side), PAD_RGB)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return square.resize((canvas, canvas), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (canvas, canvas), PAD_RGB)
    out.paste(image.resize(plan.content_box[2:], Image.Resampling.BICUBIC), (0, 0))
    return out


# ---------------------------------------------------------------------------------------------
# Views


def resize_bicubic(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[..., H, W] float32 -> [..., out_h, out_w], as torch's F.interpolate(mode="bicubic",
    align_corners=False, antialias=False) given `size=`: separable, one matrix product per axis."""
    x = np.asarray(x, dtype=np.float32)
    *lead, h, w = x.shape
    rows = x.reshape(-1, w) @ _bicubic_matrix(w, out_w).T  # [B*H, out_w]
    out = _bicubic_matrix(h, out_h) @ rows.reshape(-1, h, out_w)  # [B, out_h, out_w]
    return out.reshape(*lead, out_h, out_w)


@functools.lru_cache(maxsize=16)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 weights: output i = sum_j m[i, j] * input[j].

    Torch's recipe: cubic convolution with A = -0.75 over input taps floor(s)-1 .. floor(s)+2,
    where s = (i + 0.5) * in/out - 0.5 is NOT clamped to >= 0 (unlike linear modes) and the taps
    are clamped to [0, in-1] (clamped taps add up). Torch computes in float32, and its vectorised
    CPU kernels fuse s's multiply-add; emulating both (float64 of float32 operands, rounded once)
    keeps us within ~2e-6 of torch instead of ~5e-4 at 1024 -> 224.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    half = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * half.astype(np.float64) - 0.5).astype(np.float32)
    base = np.floor(src).astype(np.int64)
    t = (src - base.astype(np.float32)).astype(np.float64)
    taps = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for k, weight in enumerate(taps):
        np.add.at(m, (rows, np.clip(base - 1 + k, 0, in_size - 1)), weight.astype(np.float32))
    m = m.astype(np.float32)
    m.flags.writeable = False  # cached and shared
    return m


_A = -0.75  # torch's (and OpenCV's) cubic convolution constant; PIL uses -0.5


def _cubic_near(d: np.ndarray) -> np.ndarray:  # kernel for |d| <= 1
    return ((_A + 2) * d - (_A + 3)) * d * d + 1


def _cubic_far(d: np.ndarray) -> np.ndarray:  # kernel for 1 < |d| < 2
    return ((_A * d - 5 * _A) * d + 8 * _A) * d - 4 * _A


def normalize(canvas: Image.Image) -> np.ndarray:
    """RGB image -> CLIP-normalised float32 [3, H, W], bit-exact with torchvision's
    ToTensor + Normalize."""
    x = np.asarray(canvas, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def clip_to_imagenet() -> tuple[np.ndarray, np.ndarray]:
    """(gain, shift) float32 [3, 1, 1]: CLIP-normalised pixels x -> x * gain + shift in ImageNet
    statistics, as DINOv2 reads them (the four-expert models undo it for CLIP and the Q-Former)."""
    clip_mean, clip_std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    in_mean, in_std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    # reshape, not [:, None, None]: that gives 0 strides, which ExecuTorch refuses in a graph constant.
    gain = (clip_std / in_std).astype(np.float32).reshape(3, 1, 1)
    shift = ((clip_mean - in_mean) / in_std).astype(np.float32).reshape(3, 1, 1)
    return gain, shift


def make_views(image: Image.Image, plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
    """(ConvNeXt views [n_views, 3, tile, tile], DINOv2 views [n_views, 3, dino, dino]) float32.

    View order: the global view, then the encoded tiles row-major (plan.view_tiles). The four-expert
    models' CLIP and Q-Former read the DINOv2 views (CLIP-normalised again, in the model). The
    reference resamples in fp16 (`F.interpolate(x.half(), ...)`); these are float32.
    """
    x = normalize(make_canvas(image, plan))
    tile, dino = plan.tile_size, plan.dino_size

    def crops(src: np.ndarray, side: int) -> list[np.ndarray]:
        return [src[:, y0:y1, x0:x1] for x0, y0, x1, y1 in (plan.tile_box(i, side) for i in plan.view_tiles)]

    # ConvNeXt: the global view is resampled; the tiles are raw crops of the canvas.
    convnext = np.stack([resize_bicubic(x, tile, tile), *crops(x, tile)])
    # DINOv2: the tiles are crops of the canvas resampled to grid * dino.
    dino_grid = resize_bicubic(x, plan.grid * dino, plan.grid * dino) if plan.view_tiles else x
    dinov2 = np.stack([resize_bicubic(x, dino, dino), *crops(dino_grid, dino)])
    # Re-normalise CLIP -> ImageNet statistics in place of a second pass from the pixels.
    gain, shift = clip_to_imagenet()
    return convnext, dinov2 * gain + shift


def pack_views(convnext_views: np.ndarray, dinov2_views: np.ndarray) -> np.ndarray:
    """One tensor per view, as exported vision encoders take it: [N, 3, tile + dino, tile].

    Rows [0, tile) hold the ConvNeXt view; rows [tile, tile + dino) hold the DINOv2 view in their
    first `dino` columns (zeros elsewhere). One input lets a runner that passes one image tensor
    per call (ExecuTorch's MultimodalRunner) feed both experts exactly, with no in-graph resize.
    """
    n, _, tile, _ = convnext_views.shape
    dino = dinov2_views.shape[-1]
    if dino > tile:
        raise ValueError(f"the DINOv2 view ({dino} px) must not be larger than the ConvNeXt tile ({tile} px)")
    packed = np.zeros((n, 3, tile + dino, tile), dtype=np.float32)
    packed[:, :, :tile] = convnext_views
    packed[:, :, tile:, :dino] = dinov2_views
    return packed


def preprocess(
    source: ImageSource, *, layout: str, grid: int = 2, tile_size: int = 512, dino_size: int = 224,
    max_views: int | None = None,
) -> tuple[TilePlan, np.ndarray, np.ndarray]:
    """One call from a file (or bytes, or PIL image) to (plan, ConvNeXt views, DINOv2 views)."""
    image = load_image(source)
    plan = plan_tiles(*image.size, layout=layout, grid=grid, tile_size=tile_size, dino_size=dino_size,
                      max_views=max_views)
    return (plan, *make_views(image, plan))


# ---------------------------------------------------------------------------------------------
# Token layout


def image_segments(plan: TilePlan) -> list[tuple[str, int]]:
    """The image part of the sequence, right after BOS.

    ("view", k): the k-th view of make_views, wrapped in start_img/end_img (tokens_per_view);
    ("skip", t): tile t is not encoded (fully padded, or left out by a view budget), one skip token.
    Order: global view, then tiles row-major. The sphinx-1k layout has no skip token: a tile left
    out by a budget is left out of the sequence.
    """
    segments, n_views = [("view", 0)], 1
    for tile, encoded in enumerate(plan.encoded):
        if encoded:
            segments.append(("view", n_views))
            n_views += 1
        elif plan.layout == "sphinx-x":
            segments.append(("skip", tile))
    return segments
