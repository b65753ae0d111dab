"""Tiling geometry, views, token layout and image loading (sphinx_edge.layout)."""

import io
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sphinx_edge.layout import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_RGB,
    ImageLoadError,
    TilePlan,
    image_segments,
    load_image,
    make_canvas,
    make_views,
    normalize,
    plan_tiles,
    preprocess,
    resize_bicubic,
)

TPV = 259  # tokens per view: start_img + 257 + end_img


def test_layout_is_torch_free():
    code = "import sys, sphinx_edge.layout; assert 'torch' not in sys.modules, 'layout imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sphinx_1k_always_five_views():
    for w, h in [(1024, 1024), (640, 480), (1, 10000), (3000, 17)]:
        plan = plan_tiles(w, h, layout="sphinx-1k")
        assert plan.canvas_size == 1024 and plan.encoded == (True,) * 4
        assert plan.n_views == 5 and plan.n_skipped == 0
        assert plan.n_image_tokens(TPV) == 1295
        assert image_segments(plan) == [("view", k) for k in range(5)]


def test_sphinx_x_wide_2_to_1():
    plan = plan_tiles(2000, 1000, layout="sphinx-x")
    assert plan.content_box == (0, 0, 1024, 512)
    assert plan.encoded == (True, True, False, False)
    assert plan.view_tiles == (0, 1)
    assert plan.n_views == 3 and plan.n_skipped == 2
    assert plan.n_image_tokens(TPV) == 779 == 3 * 259 + 2
    assert image_segments(plan) == [("view", 0), ("view", 1), ("view", 2), ("skip", 2), ("skip", 3)]


def test_sphinx_x_square():
    plan = plan_tiles(300, 300, layout="sphinx-x")
    assert plan.content_box == (0, 0, 1024, 1024)
    assert plan.n_views == 5 and plan.n_image_tokens(TPV) == 1295


def test_sphinx_x_tall_1_to_3():
    plan = plan_tiles(400, 1200, layout="sphinx-x")
    assert plan.content_box == (0, 0, 341, 1024)
    assert plan.encoded == (True, False, True, False)  # TL, BL encoded; TR, BR skipped
    assert image_segments(plan) == [("view", 0), ("view", 1), ("skip", 1), ("view", 2), ("skip", 3)]
    assert plan.n_image_tokens(TPV) == 3 * 259 + 2


def test_sphinx_x_just_over_half_encodes_the_next_tile():
    # 513 px of the 1024 canvas width reach one pixel into the right column of tiles.
    assert plan_tiles(1024, 513, layout="sphinx-x").encoded == (True, True, True, True)
    assert plan_tiles(1024, 512, layout="sphinx-x").encoded == (True, True, False, False)


def test_sphinx_x_grid_3_small_tiles():
    plan = plan_tiles(1000, 100, layout="sphinx-x", grid=3, tile_size=64, dino_size=28)
    assert plan.canvas_size == 192 and plan.content_box == (0, 0, 192, 19)
    assert plan.encoded == (True, True, True) + (False,) * 6
    assert plan.n_image_tokens(TPV) == 4 * TPV + 6


def test_a_view_budget_of_one_keeps_the_global_view_alone():
    plan = plan_tiles(300, 300, layout="sphinx-x", max_views=1)
    assert plan.n_views == 1 and plan.encoded == (False,) * 4
    assert image_segments(plan) == [("view", 0)] + [("skip", t) for t in range(4)]  # left-out tiles: skip tokens
    assert plan.n_image_tokens(TPV) == TPV + 4


def test_a_view_budget_keeps_the_tiles_with_the_most_image():
    # 1000 x 700 fills the top row (512 x 512 each) and 205 px of the bottom row.
    assert plan_tiles(1000, 700, layout="sphinx-x").encoded == (True,) * 4
    assert plan_tiles(1000, 700, layout="sphinx-x", max_views=3).encoded == (True, True, False, False)
    # Equal shares: row-major order decides.
    assert plan_tiles(300, 300, layout="sphinx-x", max_views=2).encoded == (True, False, False, False)
    # A near-square tall image: its left column is whole, its right one 487 px wide.
    assert plan_tiles(976, 1000, layout="sphinx-x", max_views=2).encoded == (True, False, False, False)
    assert plan_tiles(976, 1000, layout="sphinx-x", max_views=3).encoded == (True, False, True, False)
    # A budget the layout never reaches changes nothing.
    assert plan_tiles(2000, 1000, layout="sphinx-x", max_views=5) == plan_tiles(2000, 1000, layout="sphinx-x")


def test_a_view_budget_in_sphinx_1k_leaves_tiles_out_of_the_sequence():
    plan = plan_tiles(640, 480, layout="sphinx-1k", max_views=2)  # letterboxed: four equal shares
    assert plan.encoded == (True, False, False, False) and plan.n_views == 2 and plan.n_skipped == 0  # the released 1k models have no skip token
    assert image_segments(plan) == [("view", 0), ("view", 1)]
    assert plan.n_image_tokens(TPV) == 2 * TPV


def test_sphinx_1k_content_box_centred():
    plan = plan_tiles(1000, 501, layout="sphinx-1k")  # offset (0, 249) in the 1000 square
    assert plan.content_box == (0, 254, 1024, 768)  # floor(249*1.024)=254, ceil(750*1.024)=768


def test_fit_size_extremes():
    assert plan_tiles(1, 10000, layout="sphinx-x").content_box == (0, 0, 1, 1024)
    assert plan_tiles(10000, 1, layout="sphinx-x").content_box == (0, 0, 1024, 1)
    assert plan_tiles(1, 1, layout="sphinx-x").content_box == (0, 0, 1024, 1024)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=0, height=5, layout="sphinx-x"), "width"),
        (dict(width=5, height=-1, layout="sphinx-x"), "height"),
        (dict(width=5, height=5, layout="sphinx-y"), "unknown layout"),
        (dict(width=5, height=5, layout="sphinx-1k", grid=3), "2x2"),
        (dict(width=5, height=5, layout="sphinx-x", grid=0), "grid"),
        (dict(width=5, height=5, layout="sphinx-x", tile_size=0), "tile_size"),
        (dict(width=5, height=5, layout="sphinx-x", dino_size=0), "dino_size"),
        (dict(width=5, height=5, layout="sphinx-x", max_views=0), "max_views"),
    ],
)
def test_plan_tiles_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_tiles(**kwargs)


# ---------------------------------------------------------------------------------------------
# Geometry: properties


@st.composite
def image_sizes(draw):
    """(w, h) from 1 to 8192 px, aspect ratios up to 50:1 either way."""
    longer = draw(st.integers(1, 8192))
    shorter = draw(st.integers(max(1, -(-longer // 50)), longer))
    return (longer, shorter) if draw(st.booleans()) else (shorter, longer)


def expected_box(plan: TilePlan) -> tuple[int, int, int, int]:
    """The content box from first principles, in exact rational arithmetic."""
    (w, h), c = plan.image_size, plan.canvas_size
    if plan.layout == "sphinx-x":
        f = Fraction(c, max(w, h))
        half_up = lambda v: max(1, int(v * f + Fraction(1, 2)))  # noqa: E731
        return (0, 0, half_up(w), half_up(h))
    s = max(w, h)
    f = Fraction(c, s)
    ox, oy = (s - w) // 2, (s - h) // 2
    ceil = lambda v: -int(-v // 1)  # noqa: E731
    return (int(ox * f // 1), int(oy * f // 1), ceil((ox + w) * f), ceil((oy + h) * f))


def check_plan(plan: TilePlan) -> None:
    g, t, c = plan.grid, plan.tile_size, plan.canvas_size
    assert c == g * t and len(plan.encoded) == g * g
    x0, y0, x1, y1 = plan.content_box
    assert plan.content_box == expected_box(plan)
    assert 0 <= x0 < x1 <= c and 0 <= y0 < y1 <= c
    if plan.layout == "sphinx-x":
        assert (x0, y0) == (0, 0) and max(x1, y1) == c  # top-left, longer side fills the canvas
        w, h = plan.image_size
        assert abs(x1 - w * c / max(w, h)) <= 0.5 or x1 == 1  # aspect kept up to rounding
        assert abs(y1 - h * c / max(w, h)) <= 0.5 or y1 == 1

    # Brute force over the content box's pixel columns and rows: the tile columns / rows that
    # hold image pixels. Every pixel lies in exactly one tile column and one tile row, so every
    # image pixel lies in exactly one tile (tiles partition the canvas).
    def holders(lo: int, hi: int) -> set[int]:
        out = set()
        for p in range(lo, hi):
            owners = [k for k in range(g) if k * t <= p < (k + 1) * t]
            assert len(owners) == 1
            out.update(owners)
        return out

    cols, rows = holders(x0, x1), holders(y0, y1)
    with_pixels = {r * g + k for r in rows for k in cols}
    assert all(plan.encoded[i] for i in with_pixels)  # no image pixel lands in a skipped tile
    if plan.layout == "sphinx-x":
        assert set(plan.view_tiles) == with_pixels  # skipped exactly when fully padded
    else:
        assert plan.view_tiles == tuple(range(g * g))
    # The tile boxes cover the canvas without overlap.
    area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in map(plan.tile_box, range(g * g)))
    assert area == c * c and plan.tile_box(g * g - 1)[2:] == (c, c)

    # Views, skips and tokens agree.
    segments = image_segments(plan)
    assert len(segments) == 1 + g * g and segments[0] == ("view", 0)
    assert [i for kind, i in segments if kind == "view"] == list(range(plan.n_views))
    assert [i for kind, i in segments if kind == "skip"] == [i for i, e in enumerate(plan.encoded) if not e]
    assert plan.n_views == 1 + len(plan.view_tiles) and plan.n_views + plan.n_skipped == 1 + g * g
    assert plan.n_image_tokens(TPV) == plan.n_views * TPV + plan.n_skipped
    assert plan.encoded[0]  # the top-left tile always holds pixels


@settings(max_examples=300, deadline=None)
@given(size=image_sizes(), layout=st.sampled_from(["sphinx-1k", "sphinx-x"]), tile=st.sampled_from([512, 64]))
@example(size=(1, 10000), layout="sphinx-x", tile=512)
@example(size=(10000, 1), layout="sphinx-x", tile=512)
@example(size=(1, 10000), layout="sphinx-1k", tile=512)
@example(size=(10000, 1), layout="sphinx-1k", tile=64)
@example(size=(1, 1), layout="sphinx-x", tile=64)
def test_plan_properties_grid_2(size, layout, tile):
    check_plan(plan_tiles(*size, layout=layout, grid=2, tile_size=tile))


@settings(max_examples=100, deadline=None)
@given(size=image_sizes(), tile=st.sampled_from([512, 64]))
@example(size=(1, 10000), tile=64)
@example(size=(10000, 1), tile=512)
def test_plan_properties_grid_3(size, tile):
    check_plan(plan_tiles(*size, layout="sphinx-x", grid=3, tile_size=tile))


@settings(max_examples=100, deadline=None)
@given(
    grid=st.integers(2, 3),
    tile=st.sampled_from([512, 64]),
    data=st.data(),
    scale=st.integers(1, 4),
    delta=st.sampled_from([-1, 0, 1]),
    wide=st.booleans(),
)
@example(grid=2, tile=512, data=None, scale=1, delta=0, wide=False)  # content exactly 512 wide
def test_plan_properties_at_tile_boundaries(grid, tile, data, scale, delta, wide):
    """Images whose shorter side lands exactly on (or one pixel off) a tile edge."""
    k = data.draw(st.integers(1, grid - 1)) if data is not None else 1
    canvas = grid * tile
    short = (k * tile + delta) * scale  # scaled by canvas / (canvas * scale): exactly k * tile + delta
    size = (canvas * scale, short) if wide else (short, canvas * scale)
    plan = plan_tiles(*size, layout="sphinx-x", grid=grid, tile_size=tile)
    check_plan(plan)
    assert max(plan.content_box[2:]) == canvas and min(plan.content_box[2:]) == k * tile + delta
    assert plan.n_skipped == grid * (grid - k - (delta > 0))


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    grid=st.integers(1, 3),
    tile=st.sampled_from([16, 32, 48]),
)
def test_sphinx_x_canvas_matches_plan(size, grid, tile):
    """The pixels agree with the geometry: the content box is image, the rest is pad."""
    plan = plan_tiles(*size, layout="sphinx-x", grid=grid, tile_size=tile)
    canvas = np.asarray(make_canvas(Image.new("RGB", size, (255, 0, 0)), plan))
    x0, y0, x1, y1 = plan.content_box
    inside = np.zeros(canvas.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    assert (canvas[inside] == (255, 0, 0)).all() and (canvas[~inside] == PAD_RGB).all()
    for i, enc in enumerate(plan.encoded):
        bx0, by0, bx1, by1 = plan.tile_box(i)
        assert enc == inside[by0:by1, bx0:bx1].any()


# ---------------------------------------------------------------------------------------------
# Canvas


def test_make_canvas_sphinx_1k_centres_with_floor_offsets():
    # 5x2 image: square side 5, vertical offset (5-2)//2 = 1 (odd padding: 1 above, 2 below).
    # With canvas side 10 (grid 2, tile 5) the scale is exactly 2.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 5, 3), dtype=np.uint8)
    plan = plan_tiles(5, 2, layout="sphinx-1k", tile_size=5, dino_size=3)
    canvas = make_canvas(Image.fromarray(pixels), plan)
    square = np.empty((5, 5, 3), np.uint8)
    square[:] = PAD_RGB
    square[1:3] = pixels
    expected = Image.fromarray(square).resize((10, 10), Image.Resampling.BICUBIC)
    assert canvas.size == (10, 10) and canvas.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(canvas), np.asarray(expected))
    assert plan.content_box == (0, 2, 10, 6)


def test_make_canvas_sphinx_1k_pad_region_and_odd_offsets():
    # 3x8 solid image in an 8x8 square: x offset (8-3)//2 = 2 (2 left, 3 right).
    # Canvas 8x8 (tile 4): no resampling, so the pixels are exact.
    plan = plan_tiles(3, 8, layout="sphinx-1k", tile_size=4, dino_size=2)
    canvas = np.asarray(make_canvas(Image.new("RGB", (3, 8), (0, 200, 0)), plan))
    assert (canvas[:, 2:5] == (0, 200, 0)).all()
    assert (canvas[:, :2] == PAD_RGB).all() and (canvas[:, 5:] == PAD_RGB).all()
    assert plan.content_box == (2, 0, 5, 8)


def test_make_canvas_sphinx_x_top_left():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    plan = plan_tiles(60, 30, layout="sphinx-x", tile_size=64, dino_size=28)
    canvas = np.asarray(make_canvas(image, plan))
    assert canvas.shape == (128, 128, 3)
    np.testing.assert_array_equal(canvas[:64], np.asarray(image.resize((128, 64), Image.Resampling.BICUBIC)))
    assert (canvas[64:] == PAD_RGB).all()


def test_make_canvas_rejects_mismatch():
    plan = plan_tiles(10, 10, layout="sphinx-x", tile_size=8)
    with pytest.raises(ValueError, match="size"):
        make_canvas(Image.new("RGB", (11, 10)), plan)
    with pytest.raises(ValueError, match="RGB"):
        make_canvas(Image.new("L", (10, 10)), plan)


# ---------------------------------------------------------------------------------------------
# Bicubic resize (must match torch)


def torch_bicubic(x: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(x)
    squeeze = t.ndim == 3
    out = F.interpolate(
        t[None] if squeeze else t, size=(h, w), mode="bicubic", align_corners=False, antialias=False
    )
    return (out[0] if squeeze else out).numpy()


@pytest.mark.parametrize(
    "shape, out",
    [
        ((3, 1024, 1024), (224, 224)),
        ((3, 1024, 1024), (448, 448)),
        ((3, 128, 128), (64, 64)),
        ((3, 37, 53), (101, 19)),  # up in one axis, down in the other
        ((3, 7, 9), (29, 31)),  # upscale: negative source coordinates (not clamped)
        ((2, 3, 301, 517), (64, 999)),  # a batch
        ((1, 1, 1), (5, 3)),
        ((3, 5, 5), (1, 1)),
    ],
)
def test_resize_bicubic_matches_torch(shape, out):
    x = np.random.default_rng(0).uniform(-2.2, 2.7, shape).astype(np.float32)  # CLIP-normalised range
    got = resize_bicubic(x, *out)
    assert got.dtype == np.float32 and got.shape == shape[:-2] + out
    assert np.abs(got - torch_bicubic(x, *out)).max() <= 1e-5


@settings(max_examples=60, deadline=None)
@given(sizes=st.tuples(*[st.integers(1, 40)] * 4), seed=st.integers(0, 9))
def test_resize_bicubic_matches_torch_random_sizes(sizes, seed):
    h, w, oh, ow = sizes
    x = np.random.default_rng(seed).uniform(-2.2, 2.7, (3, h, w)).astype(np.float32)
    assert np.abs(resize_bicubic(x, oh, ow) - torch_bicubic(x, oh, ow)).max() <= 1e-5


def test_resize_bicubic_identity():
    x = np.random.default_rng(0).random((3, 17, 23), dtype=np.float32)
    np.testing.assert_allclose(resize_bicubic(x, 17, 23), x, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Views


def to_dinov2(x: np.ndarray) -> np.ndarray:
    gain = (np.array(CLIP_STD) / np.array(IMAGENET_STD)).astype(np.float32)[:, None, None]
    shift = ((np.array(CLIP_MEAN) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32)
    return x * gain + shift[:, None, None]


@pytest.mark.parametrize(
    "layout, size", [("sphinx-x", (100, 50)), ("sphinx-x", (40, 90)), ("sphinx-1k", (90, 61))]
)
def test_make_views_against_torch(layout, size):
    tile, dino, g = 64, 28, 2
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    plan = plan_tiles(*size, layout=layout, grid=g, tile_size=tile, dino_size=dino)
    convnext, dinov2 = make_views(image, plan)
    assert convnext.shape == (plan.n_views, 3, tile, tile) and convnext.dtype == np.float32
    assert dinov2.shape == (plan.n_views, 3, dino, dino) and dinov2.dtype == np.float32

    # The reference pipeline in torch: ToTensor + Normalize, then F.interpolate.
    canvas = torch.from_numpy(np.asarray(make_canvas(image, plan)).copy()).permute(2, 0, 1).float().div(255)
    x = ((canvas - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]).numpy()
    np.testing.assert_array_equal(normalize(make_canvas(image, plan)), x)

    np.testing.assert_allclose(convnext[0], torch_bicubic(x, tile, tile), atol=1e-5, rtol=0)
    np.testing.assert_allclose(dinov2[0], to_dinov2(torch_bicubic(x, dino, dino)), atol=1e-5, rtol=0)
    dino_grid = torch_bicubic(x, g * dino, g * dino)
    for view, tile_index in enumerate(plan.view_tiles, start=1):
        r, c = divmod(tile_index, g)
        # ConvNeXt tiles are the raw canvas crops, exactly.
        np.testing.assert_array_equal(convnext[view], x[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
        crop = dino_grid[:, r * dino:(r + 1) * dino, c * dino:(c + 1) * dino]
        np.testing.assert_allclose(dinov2[view], to_dinov2(crop), atol=1e-5, rtol=0)


def test_make_views_order_is_global_then_row_major():
    # Four solid quadrants: each local view must be its own colour, in order TL, TR, BL, BR.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    pixels = np.zeros((64, 64, 3), np.uint8)
    for i, colour in enumerate(colours):
        r, c = divmod(i, 2)
        pixels[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = colour
    plan = plan_tiles(64, 64, layout="sphinx-1k", tile_size=32, dino_size=14)
    convnext, dinov2 = make_views(Image.fromarray(pixels), plan)
    for view, colour in enumerate(colours, start=1):
        want = (np.array(colour) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        np.testing.assert_allclose(convnext[view], np.broadcast_to(want[:, None, None], convnext[view].shape),
                                   atol=1e-5)
        # DINOv2 tile centres are far from the quadrant edges: pure colour, ImageNet statistics.
        in_want = (np.array(colour) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        centre = dinov2[view][:, 5:9, 5:9]
        np.testing.assert_allclose(centre, np.broadcast_to(in_want[:, None, None], centre.shape), atol=1e-4)


def test_dinov2_renormalisation_on_pad_colour():
    # A PAD_RGB image: CLIP-normalised ~0, and DINOv2 gets (pixel/255 - in_mean) / in_std.
    assert PAD_RGB == tuple(int(m * 255) for m in CLIP_MEAN)  # truncated, as LLaMA2-Accessory pads
    plan = plan_tiles(50, 20, layout="sphinx-x", tile_size=64, dino_size=28)
    convnext, dinov2 = make_views(Image.new("RGB", (50, 20), PAD_RGB), plan)
    assert plan.n_views == 3
    assert np.abs(convnext).max() < 0.02  # 122/255 vs 0.48145 etc.: within half a grey level
    want = (np.array(PAD_RGB) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(dinov2, np.broadcast_to(want[None, :, None, None], dinov2.shape), atol=1e-5)


def test_make_views_full_size_shapes():
    image = Image.new("RGB", (2000, 1000), (10, 20, 30))
    plan = plan_tiles(*image.size, layout="sphinx-x")
    convnext, dinov2 = make_views(image, plan)
    assert convnext.shape == (3, 3, 512, 512) and dinov2.shape == (3, 3, 224, 224)


def test_preprocess_from_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (90, 30), (1, 2, 3)).save(buf, "PNG")
    plan, convnext, dinov2 = preprocess(buf.getvalue(), layout="sphinx-x", tile_size=64, dino_size=28)
    assert plan.image_size == (90, 30) and plan.encoded == (True, True, False, False)
    assert convnext.shape == (3, 3, 64, 64) and dinov2.shape == (3, 3, 28, 28)


# ---------------------------------------------------------------------------------------------
# Loading


def save(path, image, fmt=None, **kw):
    image.save(path, fmt, **kw)
    return path


def test_load_rgb_roundtrip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = load_image(save(tmp_path / "a.png", Image.fromarray(pixels)))
    assert out.mode == "RGB" and out.size == (5, 7)
    np.testing.assert_array_equal(np.asarray(out), pixels)
    assert np.asarray(load_image(str(tmp_path / "a.png"))).shape == (7, 5, 3)  # str paths too


def test_load_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue (as stored)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = save(tmp_path / "o.jpg", Image.fromarray(pixels), exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # width and height swapped
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 50  # top is the stored left: red
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 50  # bottom is blue


def test_load_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    path = save(tmp_path / "p.png", im, transparency=0)
    arr = np.asarray(load_image(path))
    assert (arr[0, 0] == 255).all()  # transparent index -> white
    assert tuple(arr[0, 1]) == (255, 0, 0)


def test_load_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    arr = np.asarray(load_image(save(tmp_path / "a.png", Image.fromarray(rgba))))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 1]) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in arr[0, 2])  # half black over white
    la = Image.fromarray(np.array([[[0, 0], [10, 255]]], np.uint8), "LA")
    arr = np.asarray(load_image(save(tmp_path / "la.png", la)))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (10, 10, 10)


def test_load_16bit_grayscale_scales_not_clips(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)  # -> 0, 1, 128, 255
    path = save(tmp_path / "g16.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(load_image(path))
    np.testing.assert_array_equal(arr[..., 0], [[0, 1, 128, 255]])
    assert (arr[..., 0] == arr[..., 2]).all()
    # The same data as mode "I" and big-endian "I;16B".
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(as_i))[..., 1], [[0, 1, 128, 255]])
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(load_image(big))[..., 1], [[0, 1, 128, 255]])


def test_load_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))  # 0..1 convention
    np.testing.assert_array_equal(np.asarray(load_image(unit))[..., 0], [[0, 128, 255]])
    eight_bit = Image.fromarray(np.array([[0.0, 100.0, 300.0, np.nan]], np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(eight_bit))[..., 0], [[0, 100, 255, 0]])


def test_load_cmyk_jpeg(tmp_path):
    path = save(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    r, g, b = np.asarray(load_image(path)).astype(int)[4, 4]
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["L", "1", "YCbCr", "HSV", "RGBX", "PA", "La", "RGBa"])
def test_load_other_modes(tmp_path, mode):
    out = load_image(Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_load_grayscale_and_1bit_files(tmp_path):
    gray = np.array([[0, 100, 255]], np.uint8)
    arr = np.asarray(load_image(save(tmp_path / "l.png", Image.fromarray(gray))))
    np.testing.assert_array_equal(arr, np.repeat(gray[..., None], 3, axis=-1))
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    arr = np.asarray(load_image(save(tmp_path / "b.png", bits)))
    np.testing.assert_array_equal(arr[0, :, 0], [0, 255])


def test_load_extreme_aspect(tmp_path):
    assert load_image(save(tmp_path / "tall.png", Image.new("RGB", (1, 10000), (5, 6, 7)))).size == (1, 10000)
    assert load_image(save(tmp_path / "wide.png", Image.new("L", (10000, 1)))).size == (10000, 1)


def test_load_does_not_mutate_the_callers_image():
    im = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    out = load_image(im)
    assert im.mode == "RGBA" and out.mode == "RGB" and out is not im


def test_load_truncated_jpeg(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg.*(corrupt or truncated)"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(buf.getvalue()[:-200])
    lazy = Image.open(path)  # a PIL image opened but not yet decoded
    with pytest.raises(ImageLoadError, match=r"cut\.jpg.*truncated"):
        load_image(lazy)
    lazy.close()


def test_load_decompression_bomb(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match=r"big\.png.*too large"):
        load_image(path)


def test_load_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(ImageLoadError, match=r"notes\.png.*not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageLoadError, match=r"missing\.jpg.*does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match=r"empty \(0 bytes\)"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="zero dimension"):
        load_image(Image.new("RGB", (0, 5)))
    assert issubclass(ImageLoadError, ValueError)


@pytest.mark.parametrize("tile, dino", [(28, 28), (64, 28)])  # llama_ens (224 / 224), mixtral_sparse_ens (512 / 224)
def test_sphinx_1k_on_a_1x1_grid_is_the_global_view_alone(tile, dino):
    """The one-view SPHINX and SPHINX-MoE: pad to a square, resize to the canvas (one tile); that canvas is
    ConvNeXt's view as is and, resized bicubic, DINOv2's (CLIP's and the Q-Former's)."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (61, 90, 3), dtype=np.uint8))
    plan = plan_tiles(90, 61, layout="sphinx-1k", grid=1, tile_size=tile, dino_size=dino)
    assert plan.canvas_size == tile and plan.encoded == () and plan.n_views == 1 and plan.n_skipped == 0
    assert plan.n_image_tokens(291) == 291 and image_segments(plan) == [("view", 0)]
    assert plan_tiles(90, 61, layout="sphinx-1k", grid=1, tile_size=tile, max_views=1).n_views == 1
    convnext, dinov2 = make_views(image, plan)
    x = normalize(make_canvas(image, plan))
    assert convnext.shape == (1, 3, tile, tile) and dinov2.shape == (1, 3, dino, dino)
    np.testing.assert_array_equal(convnext[0], x)
    np.testing.assert_allclose(dinov2[0], to_dinov2(torch_bicubic(x, dino, dino)), atol=1e-5, rtol=0)
