"""The size registry: closed-form parameter counts against the real modules, config round trip."""

import pytest

from sphinx_edge.config import SIZES, SphinxConfig, get_config, parameter_counts
from sphinx_edge.model.sphinx import build_model, count_parameters


@pytest.mark.parametrize("size", list(SIZES))
def test_closed_form_counts_equal_the_modules(size):
    cfg = get_config(size)
    model = build_model(cfg, device="meta")
    counts = parameter_counts(cfg)
    assert counts["llm"] == count_parameters(model.llm)
    assert counts["convnext"] == count_parameters(model.convnext)
    assert counts["dinov2"] == count_parameters(model.dinov2)
    assert counts.get("clip", 0) == (count_parameters(model.clip) if model.clip is not None else 0)
    assert counts.get("qformer", 0) == (count_parameters(model.qformer) if model.qformer is not None else 0)
    assert counts["total"] == count_parameters(model)


def test_published_sizes():
    tiny = parameter_counts(get_config("tiny"))
    assert tiny["llm"] == 1_100_048_384  # TinyLlama-1.1B
    assert tiny["dinov2"] == 1_136_480_768  # DINOv2 ViT-g/14 hub model
    assert tiny["convnext"] == 843_398_016  # open_clip convnext_xxlarge trunk without classifier
    assert 46.6e9 < parameter_counts(get_config("moe"))["llm"] < 46.8e9  # Mixtral-8x7B: 46.7B
    assert 13.0e9 < parameter_counts(get_config("plus"))["llm"] < 13.1e9  # LLaMA2-13B
    sphinx = parameter_counts(get_config("sphinx"))
    assert sphinx["llm"] == parameter_counts(get_config("plus"))["llm"]  # SPHINX: LLaMA2-13B too
    assert sphinx["clip"] == 303_179_776 + 1024 * 768  # open_clip ViT-L/14 visual tower (proj loaded, not applied)
    assert sphinx["qformer"] == 985_952_256 + 24_576 + 105_137_664  # blip2-opt-2.7b minus its language model
    assert 7.7e9 < parameter_counts(get_config("intern2"))["llm"] < 7.8e9  # InternLM2-7B: 7.74B


@pytest.mark.parametrize("size", list(SIZES))
def test_config_dict_round_trip(size):
    cfg = get_config(size)
    assert SphinxConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_configs_are_refused():
    data = get_config("tiny").to_dict()
    with pytest.raises(ValueError, match="unknown LLMConfig fields: bogus"):
        SphinxConfig.from_dict({**data, "llm": {**data["llm"], "bogus": 1}})
    with pytest.raises(ValueError, match="lacks the 'llm' section"):
        SphinxConfig.from_dict({k: v for k, v in data.items() if k != "llm"})
    with pytest.raises(ValueError, match="patch counts differ"):
        SphinxConfig.from_dict({**data, "dinov2": {**data["dinov2"], "image_size": 448}})
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        get_config("huge")


def test_configs_written_before_the_four_expert_fields_still_load():
    data = get_config("tiny").to_dict()
    assert data["clip"] is None and data["qformer"] is None
    old = {k: v for k, v in data.items() if k not in ("clip", "qformer")}
    old["convnext"] = {k: v for k, v in data["convnext"].items() if k not in ("input_size", "token_upsample")}
    assert SphinxConfig.from_dict(old) == get_config("tiny")


def test_four_expert_configs_are_checked():
    data = get_config("test-ens5").to_dict()
    with pytest.raises(ValueError, match="patch counts differ .*CLIP 9"):
        SphinxConfig.from_dict({**data, "clip": {**data["clip"], "image_size": 42}})
    with pytest.raises(ValueError, match="QFormerConfig views are 42 px, DINOv2's 28 px"):
        SphinxConfig.from_dict({**data, "qformer": {**data["qformer"], "image_size": 42}})
    with pytest.raises(ValueError, match="patch counts differ"):  # without the 2x2 repeat: 1 token, not 4
        SphinxConfig.from_dict({**data, "convnext": {**data["convnext"], "token_upsample": 1}})
    with pytest.raises(ValueError, match=r"2x2 grid \(or 1"):
        SphinxConfig.from_dict({**data, "grid": 3})
