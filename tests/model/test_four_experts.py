"""The four-expert models (llama_ens, llama_ens5, mixtral_sparse_ens, mixtral_sparse_ens5): the view each
expert reads, the expert order in visual_proj and the tokens of a view, against LLaMA2-Accessory's
`encode_image` re-written here from the reference (accessory/model/LLM/llama_ens.py, llama_ens5.py,
mixtral_sparse_ens.py, mixtral_sparse_ens5.py @ 3777c43) at test scale: 224 px -> 28, 256 -> 32,
448 -> 56, 512 -> 64, 1024 -> 128."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sphinx_edge.checkpoints.accessory import from_our_names
from sphinx_edge.config import get_config
from sphinx_edge.generate import build_inputs
from sphinx_edge.layout import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, image_segments, make_canvas
from sphinx_edge.layout import normalize, plan_tiles, preprocess
from sphinx_edge.model.sphinx import build_model
from tests.conftest import make_image

SIZES = {"test-ens": "llama_ens", "test-ens5": "llama_ens5", "test-sparse-ens": "mixtral_sparse_ens",
         "test-sparse-ens5": "mixtral_sparse_ens5"}


def quadrants(x: torch.Tensor, side: int) -> list[torch.Tensor]:
    return [x[..., :side, :side], x[..., :side, side:], x[..., side:, :side], x[..., side:, side:]]


def reference_views(x: torch.Tensor, llama_type: str, s224: int, s256: int, s512: int):
    """(views of CLIP, the Q-Former and DINOv2; ConvNeXt's input) from the padded_resize canvas x
    [1, 3, S, S], as each llama_type's encode_image cuts them (fp32 here, fp16 there)."""
    bicubic = lambda t, n: F.interpolate(t, size=(n, n), mode="bicubic")  # noqa: E731
    if llama_type == "llama_ens":  # canvas 224: the image itself; ConvNeXt: nearest to 256
        views = x
        return views, F.interpolate(views, size=(s256, s256))
    if llama_type == "llama_ens5":  # canvas 448: bicubic to 224, then the four 224 crops
        views = torch.cat([bicubic(x, s224), *quadrants(x, s224)])
        return views, F.interpolate(views, size=(s256, s256))
    if llama_type == "mixtral_sparse_ens":  # canvas 512: ConvNeXt the image (nearest 512 -> 512)
        return bicubic(x, s224), F.interpolate(x, size=(s512, s512))
    assert llama_type == "mixtral_sparse_ens5"  # canvas 1024
    views = torch.cat([bicubic(x, s224), *quadrants(bicubic(x, 2 * s224), s224)])
    return views, torch.cat([bicubic(x, s512), *quadrants(x, s512)])


def reference_encode(model, views: torch.Tensor, convnext_in: torch.Tensor, llama_type: str) -> torch.Tensor:
    """[N, 1 + Q + 1 + patches + 1, dim]: [start_img, qformer_proj(Q-Former), visual_proj(cat(CLIP, ConvNeXt,
    DINOv2)), end_img] per view."""
    queries = model.qformer(views)  # get_qformer_features(pixel_values).last_hidden_state
    clip = model.clip(views)  # clip_encode_image: all tokens after ln_post, no proj
    c = model.convnext
    grid = c.head["norm"](c.stages(c.stem(convnext_in)))  # the trunk, pooling and fc removed
    if llama_type.startswith("llama_ens"):
        grid = grid.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    convnext = grid.flatten(-2).permute(0, 2, 1)
    convnext = torch.cat([convnext.mean(dim=1, keepdim=True), convnext], dim=1)
    view = lambda v: torch.tensor(v).view(3, 1, 1)  # noqa: E731
    dinov2 = model.dinov2((views * view(CLIP_STD) + view(CLIP_MEAN) - view(IMAGENET_MEAN)) / view(IMAGENET_STD))
    ens = torch.cat([clip, convnext, dinov2], dim=2)
    tokens = torch.cat([model.qformer_proj(queries), model.visual_proj(ens)], dim=1)
    n = tokens.shape[0]
    return torch.cat([model.start_img.expand(n, -1, -1), tokens, model.end_img.expand(n, -1, -1)], dim=1)


@pytest.mark.parametrize("size", list(SIZES))
def test_views_expert_order_and_tokens_follow_the_reference(size):
    cfg = get_config(size)
    llama_type = SIZES[size]
    assert cfg.llama_type == llama_type
    model = build_model(cfg, seed=5).eval()
    image = make_image(90, 61)
    plan, cv, dv = preprocess(image, layout=cfg.layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                              dino_size=cfg.dinov2.image_size)
    x = torch.from_numpy(normalize(make_canvas(image, plan)))[None]  # padded_resize + ToTensor + Normalize
    canvas = {"llama_ens": 28, "llama_ens5": 56, "mixtral_sparse_ens": 64, "mixtral_sparse_ens5": 128}[llama_type]
    assert x.shape[-1] == canvas
    views, convnext_in = reference_views(x, llama_type, s224=28, s256=32, s512=64)
    n_views = 1 if llama_type in ("llama_ens", "mixtral_sparse_ens") else 5
    assert plan.n_views == n_views and views.shape[0] == convnext_in.shape[0] == n_views
    with torch.no_grad():
        want = reference_encode(model, views, convnext_in, llama_type)
        got = model.encode_views(torch.from_numpy(cv), torch.from_numpy(dv))
    # start + 4 queries + (mean + 2x2 patches) + end: 1 + 32 + 257 + 1 = 291 at full size
    assert got.shape == want.shape == (n_views, 1 + 4 + 5 + 1, cfg.llm.dim) and cfg.tokens_per_view == 11
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got[:, 0], model.start_img[0].expand(n_views, -1))
    assert torch.equal(got[:, -1], model.end_img[0].expand(n_views, -1))


def test_visual_features_are_clip_then_convnext_then_dinov2():
    """visual_proj's input channels: [0, 40) CLIP (on the DINOv2 views in CLIP statistics, the views the
    reference gives it), [40, 72) ConvNeXt, [72, 96) DINOv2 (1024 / 3072 / 1536 at full size)."""
    model = build_model(get_config("test-ens5"), seed=6).eval()
    cfg = model.config
    _, cv, dv = preprocess(make_image(80, 50), layout=cfg.layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                           dino_size=cfg.dinov2.image_size)
    cv, dv = torch.from_numpy(cv), torch.from_numpy(dv)
    view = lambda v: torch.tensor(v).view(3, 1, 1)  # noqa: E731
    clip_views = (dv * view(IMAGENET_STD) + view(IMAGENET_MEAN) - view(CLIP_MEAN)) / view(CLIP_STD)
    with torch.no_grad():
        features = model.visual_features(cv, dv)
        parts = [model.clip(clip_views), model.convnext(cv), model.dinov2(dv)]
    assert [p.shape[-1] for p in parts] == [40, 32, 24] and features.shape[-1] == cfg.vision_dim == 96
    torch.testing.assert_close(features, torch.cat(parts, dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size, views",
                         [("test-ens", 1), ("test-ens5", 5), ("test-sparse-ens", 1), ("test-sparse-ens5", 5)])
def test_sequence_is_bos_views_text(size, views, tokenizer):
    model = build_model(get_config(size), seed=7).eval()
    cfg = model.config
    embeds, image_tokens = build_inputs(model, tokenizer, "What colour?", make_image(120, 60))
    text = len(tokenizer.encode("What colour?", bos=True))
    assert image_tokens == views * cfg.tokens_per_view == cfg.max_image_tokens  # no skip tokens
    assert embeds.shape == (1, text + image_tokens, cfg.llm.dim)
    plan = plan_tiles(120, 60, layout=cfg.layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                      dino_size=cfg.dinov2.image_size)
    assert image_segments(plan) == [("view", k) for k in range(views)]
    assert torch.equal(embeds[0, 1], model.start_img[0, 0])
    assert torch.equal(embeds[0, image_tokens], model.end_img[0, 0])


@pytest.mark.parametrize("size, llama_type, views, canvas",
                         [("sphinx", "llama_ens", 1, 224), ("sphinx-1k", "llama_ens5", 5, 448),
                          ("moe-512", "mixtral_sparse_ens", 1, 512), ("moe", "mixtral_sparse_ens5", 5, 1024)])
def test_released_four_expert_sizes(size, llama_type, views, canvas):
    """291 tokens per view (1 + 32 + 257 + 1), visual_proj over 1024 + 3072 + 1536 = 5632 channels, the
    reference's canvas, and LLaMA2-Accessory's parameter names (on the meta device)."""
    cfg = get_config(size)
    assert cfg.llama_type == llama_type and cfg.layout == "sphinx-1k"
    assert cfg.tokens_per_view == 1 + 32 + 257 + 1 == 291 and cfg.max_image_tokens == 291 * views
    assert cfg.vision_dim == 1024 + 3072 + 1536 and cfg.grid * cfg.convnext.image_size == canvas
    assert cfg.views_per_image == views and cfg.convnext.n_patches == cfg.dinov2.n_patches == cfg.clip.n_patches == 256
    model = build_model(cfg, device="meta")
    assert model.visual_proj[0].weight.shape == (cfg.llm.dim, 5632)
    assert model.qformer_proj[0].weight.shape == (cfg.llm.dim, 768)
    names = set(from_our_names(model.state_dict(), cfg))
    for name in ("llma.clip.visual.transformer.resblocks.23.attn.in_proj_weight", "llma.clip.visual.proj",
                 "llma.clip.visual.ln_post.bias", "llma.qformer.query_tokens",
                 "llma.qformer.vision_model.encoder.layers.38.self_attn.qkv.bias",
                 "llma.qformer.qformer.encoder.layer.10.crossattention.attention.value.weight",
                 "llma.qformer.qformer.encoder.layer.11.output_query.LayerNorm.weight", "llma.qformer_proj.1.bias",
                 "llma.openclip_convnext_xxl.stages.3.blocks.2.conv_dw.weight",
                 "llma.dinov2_vitg14.blocks.39.mlp.w3.bias"):
        assert name in names, name
    no_cross = "llma.qformer.qformer.encoder.layer.11.crossattention"  # every 2nd layer cross-attends
    assert not any(k.startswith(("llma.skip", no_cross)) for k in names)


def test_encode_views_exports_at_a_dynamic_view_count():
    """The four-expert vision (ConvNeXt's nearest resize and token repeat, CLIP and the Q-Former on the
    DINOv2 views) traces with torch.export for 1..5 views, as the export's vision graph must."""
    model = build_model(get_config("test-ens5"), seed=8).eval()
    cfg = model.config

    class Views(torch.nn.Module):
        def forward(self, convnext_views, dinov2_views):
            return model.encode_views(convnext_views, dinov2_views)

    t, d = cfg.convnext.image_size, cfg.dinov2.image_size
    views = torch.export.Dim("views", min=1, max=5)
    ep = torch.export.export(Views(), (torch.randn(2, 3, t, t), torch.randn(2, 3, d, d)),
                             dynamic_shapes={"convnext_views": {0: views}, "dinov2_views": {0: views}})
    for n in (1, 5):
        cv, dv = torch.randn(n, 3, t, t), torch.randn(n, 3, d, d)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(cv, dv), model.encode_views(cv, dv), rtol=0, atol=1e-5)
