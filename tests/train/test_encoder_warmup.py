"""The experts' supervised warm-up: answers as slots, the data it reads, that it learns, what it saves."""

from __future__ import annotations

import json

import pytest
import torch

from sphinx_edge.checkpoints import load_model
from sphinx_edge.config import get_config
from sphinx_edge.layout import CLIP_STD, IMAGENET_STD, preprocess
from sphinx_edge.model.sphinx import build_model
from sphinx_edge.train.data import DataError
from sphinx_edge.train.encoder_warmup import (END, PIXEL_RANGE, SLOTS, AnswerHead, WarmupData, answer_pieces, main,
                                              read_views, warmup_encoders)
from sphinx_edge.train.synthetic import canonical_question, generate

from tests.conftest import make_image


@pytest.fixture(scope="module")
def synth_json(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("warmup"), 24, seed=3, split="train", extra_questions=True)


def test_answer_pieces():
    assert answer_pieces("407") == ["4", "0", "7"]
    assert answer_pieces(" Red ") == ["red"]
    assert answer_pieces("left") == ["left"]


def test_answer_head_reads_the_tokens_as_a_set():
    # No token index reaches the answer, as none reaches the LLM: the experts' features must say
    # where things are. Shuffling the tokens changes nothing; changing one token does.
    torch.manual_seed(0)
    head = AnswerHead(vision_dim=24, n_questions=3, n_pieces=7).eval()
    features, questions = torch.randn(2, 17, 24), torch.tensor([0, 2])
    logits = head(features, questions)
    assert logits.shape == (2, SLOTS, 7)
    torch.testing.assert_close(head(features[:, torch.randperm(17)], questions), logits, rtol=1e-5, atol=1e-5)
    changed = features.clone()
    changed[:, 5] = torch.randn(2, 24)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(head(changed, questions), logits, atol=1e-4)


def test_data_rows_and_views(synth_json):
    config = get_config("nano")
    data = WarmupData([synth_json], config, workers=1)
    records = json.loads(synth_json.read_text())
    assert len(data.convnext) == len(records)
    assert len(data) == sum(len(r["conversations"]) // 2 for r in records)  # every answer fits in SLOTS
    assert data.pieces[0] == END and data.targets.shape == (len(data), SLOTS)
    # Row 0 is record 0's first question; its target spells the answer, then <end> padding.
    answer = records[0]["conversations"][1]["value"]
    pieces = [data.pieces[i] for i in data.targets[0].tolist()]
    assert pieces == answer_pieces(answer) + [END] * (SLOTS - len(answer_pieces(answer)))
    # The cached uint8 global views normalise back to the layout's own global views.
    _, cv, dv = preprocess(synth_json.parent / records[0]["image"], layout=config.layout, grid=config.grid,
                           tile_size=config.convnext.image_size, dino_size=config.dinov2.image_size)
    got_cv, got_dv, counts, _, _ = data.batch(torch.tensor([0]))
    assert counts.tolist() == [1] and len(got_cv) == 1
    half_step = (PIXEL_RANGE[1] - PIXEL_RANGE[0]) / 255 / 2  # the uint8 code's rounding, in pixel units
    assert (got_cv[0] - torch.from_numpy(cv[0])).abs().max() <= half_step / min(CLIP_STD) + 1e-5
    assert (got_dv[0] - torch.from_numpy(dv[0])).abs().max() <= half_step / min(IMAGENET_STD) + 1e-5


def test_all_views_are_the_layouts_views_read_as_one_set(synth_json):
    """views="all": each image's encoded views (global, then unpadded tiles) as the LLM gets them; the
    head reads a row's tokens of all its views, and the padding of rows with fewer views changes nothing."""
    config = get_config("nano")
    data = WarmupData([synth_json], config, workers=1, views="all")
    records = json.loads(synth_json.read_text())
    assert data.n_images == len(records) and len(data.convnext) == int(data.view_count.sum()) > len(records)
    half_step = (PIXEL_RANGE[1] - PIXEL_RANGE[0]) / 255 / 2
    rows = torch.tensor([0, len(data) - 1])  # the first and the last record's first/last questions
    cv, dv, counts, questions, _ = data.batch(rows)
    for row, image in zip(rows.tolist(), data.image_index[rows].tolist()):
        _, want_cv, want_dv = preprocess(synth_json.parent / records[image]["image"], layout=config.layout,
                                         grid=config.grid, tile_size=config.convnext.image_size,
                                         dino_size=config.dinov2.image_size)
        start = 0 if row == 0 else int(counts[0])
        n = len(want_cv)
        assert int(data.view_count[image]) == n
        assert (cv[start:start + n] - torch.from_numpy(want_cv)).abs().max() <= half_step / min(CLIP_STD) + 1e-5
        assert (dv[start:start + n] - torch.from_numpy(want_dv)).abs().max() <= half_step / min(IMAGENET_STD) + 1e-5
    assert sorted(set(data.view_count.tolist())) != [1]  # some images have padded tiles, some not
    model = build_model(config, seed=0).eval()
    head = AnswerHead(config.vision_dim, len(data.questions), len(data.pieces)).eval()
    pick = torch.tensor([int(torch.argmax(data.view_count[data.image_index])),
                         int(torch.argmin(data.view_count[data.image_index]))])  # most and fewest views
    with torch.no_grad():
        cv, dv, counts, questions, _ = data.batch(pick)
        assert counts[0] > counts[1]
        features, mask = read_views(model, cv, dv, counts)
        both = head(features, questions, mask)
        for i in range(2):
            alone, no_mask = read_views(model, *data.batch(pick[i:i + 1])[:3])
            assert no_mask is None or bool(no_mask.all())
            torch.testing.assert_close(head(alone, questions[i:i + 1]), both[i:i + 1], rtol=1e-4, atol=1e-5)
    _, rows = warmup_encoders(model, data, steps=4, batch_size=8, warmup_steps=1, log=lambda s: None, log_every=2)
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


def test_paraphrases_share_a_question_query(tmp_path):
    """The classifier learns one query per question; a paraphrase must not split its examples."""
    path = generate(tmp_path, 27, seed=2, extra_questions=True, look="varied", domains=("colour", "count", "shape"))
    asked = {t["value"].removeprefix("<image>\n") for r in json.loads(path.read_text()) for t in r["conversations"][::2]}
    data = WarmupData([path], get_config("nano"), workers=1)
    assert len(data.questions) == len({canonical_question(q) for q in asked}) < len(asked)


def test_bad_image_is_a_data_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    make_image(40, 30).save(tmp_path / "ok.png")
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"image": "ok.png", "conversations": conv}, {"image": "broken.png", "conversations": conv}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="broken.png"):
        WarmupData([tmp_path / "d.json"], get_config("nano"), workers=1)


def test_warmup_learns_and_trains_only_the_experts(synth_json):
    config = get_config("nano")
    data = WarmupData([synth_json], config, workers=1)
    model = build_model(config, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, rows = warmup_encoders(model, data, steps=30, batch_size=16, lr=3e-3, warmup_steps=5, log=lambda s: None,
                           log_every=10)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("convnext.", "dinov2.")) for k in changed)
    assert any(k.startswith("convnext.") for k in changed) and any(k.startswith("dinov2.") for k in changed)


def test_main_writes_a_model_the_recipe_can_start_from(synth_json, tmp_path, tokenizer_file, capsys):
    out = main([str(synth_json)], str(tmp_path / "warm"), steps=2, batch_size=8, workers=1, tokenizer=tokenizer_file,
               eval_json=str(synth_json))
    model = load_model(out)
    fresh = build_model(get_config("nano"), seed=0)
    assert torch.equal(model.llm.output.weight, fresh.llm.output.weight)  # the LLM is as build_model draws it
    assert not torch.equal(model.convnext.stem[0].weight, fresh.convnext.stem[0].weight)
    assert (out / "tokenizer.model").is_file()
    scored = capsys.readouterr().out.split("experts + warm-up classifier on ")[1]
    assert "of 24 (" in scored and all(d in scored for d in ("colour", "count", "shape", "text", "position"))


def test_a_warm_up_continues_from_init(synth_json, tmp_path):
    """--init: the experts start where a previous warm-up left them (with lr 0 they stay there), and the
    rest of the model directory comes along."""
    first = main([str(synth_json)], str(tmp_path / "first"), steps=2, batch_size=8, workers=1, seed=5)
    again = main([str(synth_json)], str(tmp_path / "again"), steps=1, batch_size=8, workers=1, lr=0.0,
                 init=str(first))
    before, after = load_model(first).state_dict(), load_model(again).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_warm_up_on_other_views(synth_json, tmp_path):
    """view_size: `make nano` warms Nano 1's experts up on 128 px views (the registered Nano reads 192 px);
    the model directory it writes says so, and its experts saw views of that size. A size that is no
    multiple of 32 is refused before any data is read or anything written."""
    assert get_config("nano").convnext.image_size != 128
    out = main([str(synth_json)], str(tmp_path / "w128"), steps=1, batch_size=8, workers=1, view_size=128)
    config = load_model(out).config
    assert (config.convnext.image_size, config.dinov2.image_size) == (128, 56)
    with pytest.raises(ValueError, match="multiple of 32"):
        main([str(tmp_path / "missing.json")], str(tmp_path / "bad"), steps=1, workers=1, view_size=100)
    assert not (tmp_path / "bad").exists()


def test_sampling_per_image_gives_every_image_the_same_share(synth_json):
    """sample_per="image": an image that is asked three questions is drawn as often as one asked one."""
    data = WarmupData([synth_json], get_config("nano"), workers=1, limit=6)
    asked = torch.bincount(data.image_index)
    assert len(set(asked.tolist())) > 1  # the set asks some images more questions than others
    weights = data.row_weights("image")
    per_image = torch.zeros(data.n_images).index_add_(0, data.image_index, weights)
    assert torch.allclose(per_image, torch.ones(data.n_images))
    assert torch.equal(data.row_weights("question"), torch.ones(len(data)))
    with pytest.raises(ValueError, match="per must be one of"):
        data.row_weights("domain")
    model = build_model(get_config("nano"), seed=0)
    _, rows = warmup_encoders(model, data, steps=2, batch_size=4, log=lambda s: None, log_every=1, sample_per="image")
    assert [r["step"] for r in rows] == [1, 2]
