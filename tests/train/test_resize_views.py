"""Finer views for a trained model: the same weights, more tokens per view, and an image tiled to match."""

import pytest
import torch
from PIL import Image

from sphinx_edge.config import get_config
from sphinx_edge.generate import image_views
from sphinx_edge.model.sphinx import build_model
from sphinx_edge.train.resize_views import resize_views, resized_config


def test_finer_views_give_more_tokens_from_the_same_weights():
    model = build_model(get_config("test-tiny"), seed=2)  # 64 px views: 2 x 2 tokens
    finer = resize_views(model, 96)
    assert (finer.config.convnext.image_size, finer.config.dinov2.image_size) == (96, 42)
    assert finer.config.tokens_per_view == 3 * 3 + 3 and finer.config.llm == model.config.llm
    for name, tensor in model.state_dict().items():  # taken over, not copied
        assert finer.state_dict()[name].data_ptr() == tensor.data_ptr(), name

    image = Image.new("RGB", (150, 90), (200, 30, 40))
    _, convnext_views, dinov2_views = image_views(finer.config, image)
    assert convnext_views.shape[-1] == 96 and dinov2_views.shape[-1] == 42
    with torch.no_grad():
        tokens = finer.encode_views(torch.from_numpy(convnext_views), torch.from_numpy(dinov2_views))
    assert tokens.shape == (convnext_views.shape[0], 12, finer.config.llm.dim)
    assert torch.isfinite(tokens).all()
    assert resize_views(finer, 96) is finer


@pytest.mark.parametrize("view_size", [80, 16, 0])
def test_a_view_size_must_be_a_multiple_of_the_stride(view_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        resized_config(get_config("test-tiny"), view_size)


def test_four_expert_models_keep_their_views():
    with pytest.raises(ValueError, match="two-expert"):
        resized_config(get_config("test-ens5"), 64)
