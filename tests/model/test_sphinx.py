"""The whole model: view encoding, sequence assembly with skip tokens, and generation."""

import pytest
import torch

from sphinx_edge.generate import build_inputs, generate
from sphinx_edge.prompt import ContextOverflowError
from sphinx_edge.layout import image_segments, preprocess
from sphinx_edge.model.sphinx import build_model, count_parameters
from sphinx_edge.config import get_config
from tests.conftest import make_image


def views_for(model, image):
    cfg = model.config
    plan, cv, dv = preprocess(image, layout=cfg.layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                              dino_size=cfg.dinov2.image_size)
    return plan, torch.from_numpy(cv), torch.from_numpy(dv)


def test_encode_views_wraps_each_view_in_start_and_end(model_factory):
    model = model_factory("test-tiny")
    _, cv, dv = views_for(model, make_image(96, 96))
    with torch.no_grad():
        out = model.encode_views(cv, dv)
    assert out.shape == (5, model.config.tokens_per_view, model.config.llm.dim)
    assert torch.equal(out[:, 0], model.start_img[0].expand(5, -1))
    assert torch.equal(out[:, -1], model.end_img[0].expand(5, -1))
    assert not torch.allclose(out[0, 1:-1], out[1, 1:-1])  # views differ


@pytest.mark.parametrize(
    "size, image_wh, views, skips",
    [("test-tiny", (120, 60), 3, 2), ("test-tiny", (40, 120), 3, 2), ("test-tiny", (90, 90), 5, 0),
     ("test-1k", (120, 60), 5, 0)],
)
def test_sequence_length_follows_the_tile_plan(model_factory, tokenizer, size, image_wh, views, skips):
    model = model_factory(size)
    embeds, image_tokens = build_inputs(model, tokenizer, "What colour?", make_image(*image_wh))
    text = len(tokenizer.encode("What colour?", bos=True))
    assert image_tokens == views * model.config.tokens_per_view + skips
    assert embeds.shape == (1, text + image_tokens, model.config.llm.dim)


def test_skip_embedding_sits_in_place_of_padded_tiles(model_factory, tokenizer):
    model = model_factory("test-tiny")
    plan, cv, dv = views_for(model, make_image(120, 60))  # 2:1 -> bottom tiles padded
    ids = torch.tensor(tokenizer.encode("hi", bos=True))
    with torch.no_grad():
        seq = model.embed_sequence(ids, model.encode_views(cv, dv), image_segments(plan))[0]
    tpv = model.config.tokens_per_view
    skip_positions = [1 + 3 * tpv, 2 + 3 * tpv]
    for pos in skip_positions:
        assert torch.equal(seq[pos], model.skip[0, 0])
    assert torch.equal(seq[0], model.llm.tok_embeddings.weight[ids[0]])


def test_1k_layout_has_no_skip_embedding(model_factory):
    model = model_factory("test-1k")
    assert model.skip is None
    with pytest.raises(ValueError, match="no skip embedding"):
        model.embed_sequence(torch.tensor([1, 5]), None, [("skip", 3)])


def test_cached_generation_matches_uncached_greedy_loop(model_factory, tokenizer):
    """KV-cache decoding against recomputing the whole sequence at every step."""
    model = model_factory("test-tiny", seed=3)
    image = make_image(120, 60)
    out = generate(model, tokenizer, "What colour is the square?", image, max_new_tokens=12)
    embeds, _ = build_inputs(model, tokenizer, out and __import__("sphinx_edge.prompt").prompt.format_prompt(
        [("What colour is the square?", None)]), image)
    expected = []
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            token = int(model.llm(embeds)[0, -1].argmax())
            expected.append(token)
            embeds = torch.cat([embeds, model.llm.tok_embeddings(torch.tensor([[token]]))], dim=1)
    assert out.token_ids == expected
    assert out.prompt_len == embeds.shape[1] - len(expected)


def test_streamed_text_equals_final_text(model_factory, tokenizer):
    model = model_factory("test-tiny", seed=4)
    pieces = []
    out = generate(model, tokenizer, "How many circles?", make_image(64, 64), max_new_tokens=10,
                   temperature=0.8, top_p=0.9, seed=1, on_text=pieces.append)
    assert "".join(pieces) == out.text
    again = generate(model, tokenizer, "How many circles?", make_image(64, 64), max_new_tokens=10,
                     temperature=0.8, top_p=0.9, seed=1)
    assert again.token_ids == out.token_ids  # sampling is reproducible with a seed


def test_prompt_longer_than_context_is_refused(model_factory, tokenizer):
    model = model_factory("test-tiny")
    with pytest.raises(ContextOverflowError, match="context holds 512"):
        generate(model, tokenizer, "red " * 600, make_image(64, 64))


def test_full_size_models_build_on_meta_without_memory():
    model = build_model(get_config("tiny"), device="meta")
    llm = count_parameters(model.llm)
    assert 1.09e9 < llm < 1.11e9  # TinyLlama-1.1B: 1,100,048,384
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("size", ["test-tiny", "test-ens5"])
def test_a_model_materialised_module_by_module_has_the_weights_of_one_built_whole(size):
    """`materialize` with `random_fill` draws what `build_model` draws, so an export that makes random
    weights one module at a time exports the same model."""
    from sphinx_edge.model.sphinx import RandomFill, SphinxModel, materialize

    whole = build_model(get_config(size), seed=4).state_dict()
    with torch.device("meta"):
        model = SphinxModel(get_config(size))
    streamed = materialize(model, RandomFill(seed=4)).state_dict()
    assert whole.keys() == streamed.keys()
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)


def test_each_module_is_handed_over_before_the_next_one_gets_weights():
    """What keeps a large export's memory down: when `on_module` sees a module, its own weights are
    real and every module after it is still on the meta device (nothing allocated), so a quantizing
    hook never has the fp32 model whole."""
    from sphinx_edge.model.sphinx import RandomFill, SphinxModel, materialize

    with torch.device("meta"):
        model = SphinxModel(get_config("test-tiny"))
    order = [name for name, _ in model.named_modules()]
    seen = []

    def look(name, module):
        seen.append(name)
        assert all(not p.is_meta for p in module.parameters(recurse=False))
        later = order[order.index(name) + 1:]
        mods = dict(model.named_modules())
        assert all(p.is_meta for n in later for p in mods[n].parameters(recurse=False))

    materialize(model, RandomFill(seed=0), look)
    assert seen == order


def test_parts_made_on_their_own_have_the_weights_of_the_whole_model():
    """`only`: one part of a model made without the rest (an export's reference runs one expert at a
    time); the generator jumps over the skipped parts once it has seen them, and lands where drawing
    them would have left it."""
    from sphinx_edge.model.sphinx import RandomFill, SphinxModel, materialize

    whole = build_model(get_config("test-tiny"), seed=2).state_dict()
    fill = RandomFill(seed=2)
    for part in ("dinov2", "llm", "start_img", "dinov2", "llm.tok_embeddings", "convnext"):  # draws, then jumps
        with torch.device("meta"):
            model = SphinxModel(get_config("test-tiny"))
        materialize(model, fill.restart(), only=(part,))
        made = {k: v for k, v in model.state_dict().items() if not v.is_meta}
        assert made and all(k == part or k.startswith(part + ".") for k in made)
        assert all(torch.equal(v, whole[k]) for k, v in made.items()), part
