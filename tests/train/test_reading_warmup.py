"""The experts' reading warm-up: text canvases and their targets, the per-token head, a short run, what it saves."""

from __future__ import annotations

import random

import numpy as np
import torch

from sphinx_edge.checkpoints import load_model
from sphinx_edge.checkpoints.native import save_native
from sphinx_edge.config import get_config
from sphinx_edge.model.sphinx import build_model
from sphinx_edge.train.reading_warmup import (CHARACTERS, IGNORE, SUB, Glyph, ReadingHead, canvas_side,
                                              draw_text_canvas, main, reading_loss, sub_cell_targets, text_sample,
                                              warmup_reading)
from sphinx_edge.train.resize_views import resized_config

NANO_1 = resized_config(get_config("nano"), 128)  # the views these hand-made cases were drawn for


def test_canvases_are_the_same_for_a_seed():
    config = NANO_1
    a, b = text_sample(random.Random(3), config), text_sample(random.Random(3), config)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    cv, dv, targets = a
    n = SUB * 4  # Nano 1: 4 x 4 tokens per view
    assert cv.shape == (5, 3, 128, 128) and dv.shape == (5, 3, 56, 56) and targets.shape == (5, n, n)
    assert not np.array_equal(text_sample(random.Random(4), config)[2], targets)


def test_each_glyph_centre_sits_on_its_ink():
    """The drawing record against the pixels: around every glyph's centre (a box of half its size) the
    canvas has ink, i.e. much darker or more coloured pixels than the light background."""
    rng, checked = random.Random(0), 0
    for _ in range(20):
        image, glyphs = draw_text_canvas(rng, 256)
        pixels = np.asarray(image.convert("L"), np.float32)
        for g in glyphs:
            if g.height < 20:
                continue
            x0, x1 = int(g.x - g.width / 4), int(g.x + g.width / 4) + 1
            y0, y1 = int(g.y - g.height / 4), int(g.y + g.height / 4) + 1
            region = pixels[max(0, y0):y1, max(0, x0):x1]
            assert region.max() - region.min() > 40, (g, region.min(), region.max())
            checked += 1
    assert checked > 50


def test_sub_cell_targets_follow_the_views():
    """Nano 1: a 256 px canvas, the global view at half scale and four 128 px tiles; 16 px sub-cells."""
    config = NANO_1
    side = canvas_side(config)
    assert side == 256
    a = CHARACTERS.index("a") + 1
    seven = CHARACTERS.index("7") + 1
    glyphs = [Glyph(150.0, 40.0, a, 10.0, 16.0),  # top-right tile; 8 px high in the global view
              Glyph(20.0, 200.0, seven, 4.0, 8.0),  # bottom-left tile; too small for the global view
              Glyph(100.0, 100.0, a, 10, 20), Glyph(104.0, 102.0, seven, 10, 20)]  # two centres in one cell
    global_view = sub_cell_targets(glyphs, 0, side, config)
    assert global_view[40 // 2 // 16, 150 // 2 // 16] == a
    assert global_view[200 // 2 // 16, 20 // 2 // 16] == IGNORE
    assert global_view[100 // 2 // 16, 100 // 2 // 16] == IGNORE
    assert (global_view > 0).sum() == 1
    top_right = sub_cell_targets(glyphs, 2, side, config)
    assert top_right[40 // 16, (150 - 128) // 16] == a and (top_right != 0).sum() == 1
    bottom_left = sub_cell_targets(glyphs, 3, side, config)
    assert bottom_left[(200 - 128) // 16, 20 // 16] == seven and (bottom_left != 0).sum() == 1
    top_left = sub_cell_targets(glyphs, 1, side, config)
    assert top_left[100 // 16, 100 // 16] == IGNORE and (top_left != 0).sum() == 1
    assert (sub_cell_targets(glyphs, 4, side, config) == 0).all()


def test_the_head_reads_each_token_alone():
    """A token's features decide its own sub-cells and no others: what it says must be in that token."""
    torch.manual_seed(0)
    head = ReadingHead(vision_dim=24, tokens_per_side=4).eval()
    patches = torch.randn(2, 16, 24)
    logits = head(patches)
    assert logits.shape == (2, 4 * SUB, 4 * SUB, len(CHARACTERS) + 1)
    changed = patches.clone()
    changed[:, 6] = torch.randn(2, 24)  # token (1, 2) -> sub-cells rows 2-3, columns 4-5
    moved = (head(changed) - logits).abs().amax(dim=(0, 3)) > 1e-6
    expected = torch.zeros(4 * SUB, 4 * SUB, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(moved, expected)


def test_the_loss_weighs_characters_and_leaves_out_ignored_cells():
    logits = torch.zeros(1, 2, 2, len(CHARACTERS) + 1)
    targets = torch.tensor([[[0, 3], [IGNORE, 0]]])
    uniform = float(np.log(len(CHARACTERS) + 1))
    assert abs(reading_loss(logits, targets).item() - 1.5 * uniform) < 1e-5
    logits[0, 1, 0] = 100.0  # the ignored cell: any logits, same loss
    assert abs(reading_loss(logits, targets).item() - 1.5 * uniform) < 1e-5
    nothing_written = torch.tensor([[[0, 0], [IGNORE, 0]]])  # no character in the batch: a finite loss
    assert abs(reading_loss(logits, nothing_written).item() - 0.5 * uniform) < 1e-5


def test_a_short_warmup_learns_and_trains_only_the_experts():
    model = build_model(get_config("test-tiny"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, rows = warmup_reading(model, steps=24, canvases=4, lr=3e-3, warmup_steps=2, log=lambda s: None, log_every=8)
    assert [r["step"] for r in rows] == [8, 16, 24]
    assert rows[-1]["loss"] < 0.93 * rows[0]["loss"]  # the empty cells come first; characters take longer
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("convnext.") for k in changed) and any(k.startswith("dinov2.") for k in changed)
    assert all(k.startswith(("convnext.", "dinov2.")) for k in changed)


def test_main_keeps_everything_of_init_but_the_experts(tmp_path, tokenizer_file):
    init = save_native(build_model(get_config("test-tiny"), seed=7), tmp_path / "init", tokenizer=tokenizer_file)
    out, accuracy = main(str(tmp_path / "read"), init=str(init), size="test-tiny", steps=2, canvases=2,
                         eval_canvases=20)
    assert set(accuracy) == {"global", "tiles"} and all(0 <= v <= 1 for v in accuracy.values())
    before, after = load_model(init).state_dict(), load_model(out).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("convnext.", "dinov2.")) for k in changed)
    assert (out / "tokenizer.model").read_bytes() == (init / "tokenizer.model").read_bytes()
