"""Size registry: every SPHINX-X size and the small test sizes.

All model facts live here (docs/ARCHITECTURE.md states the rules that use them), so that a correction is a one-line change.
Torch-free: the runtime reads configs from export manifests through `SphinxConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LLM_FAMILIES = ("llama", "internlm2", "mixtral")
LAYOUTS = ("sphinx-1k", "sphinx-x")


def layout_tiles(layout: str, grid: int) -> int:
    """Tiles a layout encodes besides the global view when the image fills the canvas: grid x grid,
    except sphinx-1k's 1x1 grid, whose one tile would be the global view again (the one-view SPHINX
    and SPHINX-MoE encode it once)."""
    return 0 if layout == "sphinx-1k" and grid == 1 else grid * grid


def llama_ffn_dim(dim: int, multiple_of: int = 256) -> int:
    """LLaMA2-Accessory's FFN rule: 256 * ceil(int(8 * dim / 3) / 256) (TinyLlama 2048 -> 5632)."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


@dataclass(frozen=True)
class LLMConfig:
    family: str  # one of LLM_FAMILIES
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    n_experts: int = 0  # > 0 only for the mixtral family
    n_experts_per_tok: int = 2

    def __post_init__(self) -> None:
        if self.family not in LLM_FAMILIES:
            raise ValueError(f"unknown LLM family {self.family!r}; expected one of {LLM_FAMILIES}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, heads {self.n_heads}, kv heads {self.n_kv_heads} do not divide")
        if (self.family == "mixtral") != (self.n_experts > 0):
            raise ValueError("n_experts > 0 exactly when family is 'mixtral'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class ConvNeXtConfig:
    """CLIP-ConvNeXt (open_clip / timm ConvNeXt). Output stride is 32."""

    depths: tuple[int, ...] = (3, 4, 30, 3)
    dims: tuple[int, ...] = (384, 768, 1536, 3072)
    norm_eps: float = 1e-5
    mlp_ratio: int = 4
    image_size: int = 512  # the side of one view (the ConvNeXt tile on the canvas)
    # The four-expert llama_ens / llama_ens5 read a 224 px view as 256 px (nearest resize) and
    # repeat each token of the 8x8 map 2x2 times: 256 tokens, as DINOv2's 16x16 (model/convnext.py).
    input_size: int = 0  # > 0: the view is resized (nearest) to this side before the trunk
    token_upsample: int = 1  # each token of the last map repeated u x u times

    def __post_init__(self) -> None:
        if self.input_size < 0 or self.token_upsample < 1:
            raise ValueError(f"ConvNeXt input_size {self.input_size} must be >= 0 and token_upsample "
                             f"{self.token_upsample} >= 1")

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    @property
    def trunk_size(self) -> int:
        """The side of what the trunk sees: the view, or its resize."""
        return self.input_size or self.image_size

    @property
    def n_patches(self) -> int:
        return (self.trunk_size // 32 * self.token_upsample) ** 2


@dataclass(frozen=True)
class DINOv2Config:
    """DINOv2 ViT (hub layout, no registers)."""

    embed_dim: int = 1536
    depth: int = 40
    n_heads: int = 24
    patch_size: int = 14
    ffn: str = "swiglu"  # "swiglu" (fused w12/w3, ViT-g) or "mlp" (fc1/fc2, ViT-S/B/L)
    mlp_ratio: float = 4.0
    pos_grid: int = 37  # stored position embeddings: pos_grid x pos_grid (+ CLS)
    interpolate_offset: float = 0.1
    norm_eps: float = 1e-6
    image_size: int = 224  # the side of one view

    def __post_init__(self) -> None:
        if self.ffn not in ("swiglu", "mlp"):
            raise ValueError(f"unknown DINOv2 ffn {self.ffn!r}")

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":  # DINOv2's SwiGLUFFNFused rounding: 6144 -> 4096 for ViT-g
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# --- The further experts of the four-expert checkpoints ----------------------------------------
# llama_ens / llama_ens5 / mixtral_sparse_ens(5) (SPHINX, SPHINX-1k / v2-1k, SPHINX-MoE(-1k)) add
# OpenAI CLIP ViT-L/14 and BLIP-2's EVA ViT-g + Q-Former to the ConvNeXt and DINOv2 above. Both see
# 224 px views (sphinx_edge/model/clip_vit.py and qformer.py state what they return).


@dataclass(frozen=True)
class CLIPViTConfig:
    """OpenAI CLIP ViT (open_clip `VisionTransformer`); defaults are ViT-L/14 at 224 px."""

    width: int = 1024
    layers: int = 24
    heads: int = 16  # open_clip: width // head_width (64)
    patch_size: int = 14
    image_size: int = 224  # no position-embedding resize: the reference adds the table as is
    mlp_ratio: float = 4.0
    output_dim: int = 768  # columns of `proj`, which SPHINX loads but does not apply
    # OpenAI's weights were trained with QuickGELU (open_clip's `pretrained='openai'` path up to
    # 2.x builds it so); see clip_vit.py for why this is a setting.
    quick_gelu: bool = True
    norm_eps: float = 1e-5

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 (blip2-opt-2.7b): EVA ViT-g vision model, Q-Former and its query tokens.

    Defaults are transformers' `Blip2Config()` ones, which equal the blip2-opt-2.7b config.json that
    LLaMA2-Accessory bundles (accessory/resources/hf/Salesforce/blip2-opt-2.7b/config.json).
    """

    vision_dim: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    patch_size: int = 14
    image_size: int = 224
    vision_norm_eps: float = 1e-6
    qformer_dim: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    cross_attention_every: int = 2  # layers 0, 2, 4, ... cross-attend to the image tokens
    n_queries: int = 32
    qformer_norm_eps: float = 1e-12

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class SphinxConfig:
    name: str
    llm: LLMConfig
    convnext: ConvNeXtConfig = field(default_factory=ConvNeXtConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    layout: str = "sphinx-x"  # one of LAYOUTS
    grid: int = 2  # tiles per side of the canvas (sphinx-1k: 1 = the global view alone)
    paper_name: str = ""
    llama_type: str = "llama_ens5_light"  # LLaMA2-Accessory's meta.json name for this model kind
    # The four-expert ensembles' further experts; both read the DINOv2 view (CLIP-normalised).
    clip: CLIPViTConfig | None = None
    qformer: QFormerConfig | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.layout == "sphinx-1k" and self.grid not in (1, 2):
            raise ValueError("the sphinx-1k layout has a 2x2 grid (or 1: the global view alone)")
        counts = {"ConvNeXt": self.convnext.n_patches, "DINOv2": self.dinov2.n_patches}
        if self.clip is not None:
            counts["CLIP"] = self.clip.n_patches
        if len(set(counts.values())) > 1:
            raise ValueError(f"patch counts differ ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
                             "the experts' features are concatenated per token")
        for expert in (self.clip, self.qformer):
            if expert is not None and expert.image_size != self.dinov2.image_size:
                raise ValueError(f"{type(expert).__name__} views are {expert.image_size} px, DINOv2's "
                                 f"{self.dinov2.image_size} px: both read the DINOv2 view")

    @property
    def vision_dim(self) -> int:
        """Channels of the concatenated expert tokens, in the reference's order: CLIP (if any),
        ConvNeXt, DINOv2 (1024 + 3072 + 1536 = 5632 for the four-expert models)."""
        return (self.clip.width if self.clip else 0) + self.convnext.out_dim + self.dinov2.embed_dim

    @property
    def n_queries(self) -> int:
        """Q-Former tokens per view (32 for the four-expert models, else none)."""
        return self.qformer.n_queries if self.qformer else 0

    @property
    def tokens_per_view(self) -> int:
        """start_img + Q-Former queries + (pooled + patch tokens) + end_img: 259 for the two-expert
        released models, 1 + 32 + 257 + 1 = 291 for the four-expert ones."""
        return 1 + self.n_queries + self.convnext.n_patches + 1 + 1

    @property
    def views_per_image(self) -> int:
        """Views of an image that fills the canvas: the global view and every tile."""
        return 1 + layout_tiles(self.layout, self.grid)

    @property
    def max_image_tokens(self) -> int:
        return self.views_per_image * self.tokens_per_view

    @property
    def n_special_tokens(self) -> int:
        return 3  # skip, start_img, end_img: ids just past the text vocabulary

    @property
    def skip_id(self) -> int:
        return self.llm.vocab_size

    @property
    def start_img_id(self) -> int:
        return self.llm.vocab_size + 1

    @property
    def end_img_id(self) -> int:
        return self.llm.vocab_size + 2

    def with_context(self, max_seq_len: int) -> SphinxConfig:
        """This config with an LLM context of `max_seq_len` tokens (an export built for a shorter one)."""
        return dataclasses.replace(self, llm=dataclasses.replace(self.llm, max_seq_len=max_seq_len))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SphinxConfig:
        """The inverse of to_dict; configs written before a field existed load with its default."""
        data = dict(data)
        try:
            parts = {
                "llm": _build(LLMConfig, data.pop("llm")),
                "convnext": _build(ConvNeXtConfig, data.pop("convnext", {})),
                "dinov2": _build(DINOv2Config, data.pop("dinov2", {})),
            }
        except KeyError as e:
            raise ValueError(f"model config lacks the {e.args[0]!r} section") from None
        for name, kind in (("clip", CLIPViTConfig), ("qformer", QFormerConfig)):
            section = data.pop(name, None)
            parts[name] = None if section is None else _build(kind, section)
        return _build(cls, {**data, **parts})


def _build(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# --- The registry -----------------------------------------------------------------------------
# Released SPHINX models (LLaMA2-Accessory directories, read by checkpoints/accessory.py):
#   two experts, ConvNeXt + DINOv2 ("light"): tiny (llama_ens5_light), intern2 (internlm_ems5_light;
#   the llama_type is inferred from LLaMA2-Accessory's naming);
#   four experts, + CLIP ViT-L/14 and BLIP-2's Q-Former: sphinx (llama_ens, SPHINX), sphinx-1k
#   (llama_ens5, SPHINX-1k and SPHINX-v2-1k), moe-512 (mixtral_sparse_ens, SPHINX-MoE) and moe
#   (mixtral_sparse_ens5, SPHINX-MoE-1k).
# Ours to train, with SPHINX-X's two-expert ensemble and skip tokens: nano, plus (LLaMA2-13B, as
# SPHINX-X's SPHINX-Plus) and moe-light (Mixtral-8x7B). A two-expert Mixtral has no llama_type of its
# own in LLaMA2-Accessory; it is written as mixtral_sparse_ens5 and read back by its tensors.

_CLIP_CONVNEXT_XXL = ConvNeXtConfig()
_DINOV2_VITG14 = DINOv2Config()
_LLAMA2_13B = LLMConfig("llama", 5120, 40, 40, 40, 13824, 32000)
_MIXTRAL_8X7B = LLMConfig("mixtral", 4096, 32, 32, 8, 14336, 32000, rope_theta=1e6, n_experts=8)

# The four-expert views. The reference's `image_size` is the canvas: llama_ens 224 (one view),
# llama_ens5 448 (global + 2x2 tiles of 224), mixtral_sparse_ens 512 (one view), mixtral_sparse_ens5
# 1024 (global + 2x2 tiles of 512, as sphinx-1k). CLIP, the Q-Former and DINOv2 always see 224 px
# views; llama_ens(5)'s ConvNeXt sees its 224 px view as 256 px (8x8 tokens, each repeated 2x2).
_CONVNEXT_224_AS_256 = dataclasses.replace(_CLIP_CONVNEXT_XXL, image_size=224, input_size=256, token_upsample=2)

# Small encoders for tests: a 64 px ConvNeXt tile gives 2x2 patches, matching a 28 px DINOv2 view.
# pos_grid 3 != 2 exercises position-embedding interpolation, as 37 -> 16 does at full size.
_TEST_CONVNEXT = ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), image_size=64)
_TEST_DINOV2 = DINOv2Config(embed_dim=24, depth=2, n_heads=2, pos_grid=3, image_size=28)
# ... and for the four-expert test sizes: 28 px views read as 32 px (1x1 map, each token repeated
# 2x2), as 224 -> 256 px at full size; widths that differ from the others' (CLIP 40, Q-Former 24 on
# a 32-wide vision model), three Q-Former layers so that both kinds of layer occur.
_TEST_CONVNEXT_28_AS_32 = dataclasses.replace(_TEST_CONVNEXT, image_size=28, input_size=32, token_upsample=2)
_TEST_CLIP = CLIPViTConfig(width=40, layers=2, heads=2, image_size=28, output_dim=16)
_TEST_QFORMER = QFormerConfig(vision_dim=32, vision_layers=2, vision_heads=2, vision_mlp=64, image_size=28,
                              qformer_dim=24, qformer_layers=3, qformer_heads=2, qformer_mlp=48, n_queries=4)
_TEST_LLAMA = LLMConfig("llama", 32, 2, 4, 2, llama_ffn_dim(32, 16), 256, max_seq_len=512)
_TEST_MIXTRAL = LLMConfig("mixtral", 32, 2, 4, 2, 48, 256, rope_theta=1e6, max_seq_len=512, n_experts=4)


def _full(name: str, paper: str, llm: LLMConfig, llama_type: str, layout: str = "sphinx-x") -> SphinxConfig:
    return SphinxConfig(name, llm, _CLIP_CONVNEXT_XXL, _DINOV2_VITG14, layout, 2, paper, llama_type)


def _four(name: str, paper: str, llm: LLMConfig, llama_type: str, grid: int, convnext: ConvNeXtConfig,
          small: bool = False) -> SphinxConfig:
    """A four-expert model: the sphinx-1k layout (pad to a square, resize to the canvas) on `grid`."""
    dinov2, clip, qformer = (_TEST_DINOV2, _TEST_CLIP, _TEST_QFORMER) if small else (
        _DINOV2_VITG14, CLIPViTConfig(), QFormerConfig())
    return SphinxConfig(name, llm, convnext, dinov2, "sphinx-1k", grid, paper, llama_type, clip, qformer)


_LIGHT_TYPES = {"llama": "llama_ens5_light", "internlm2": "internlm_ems5_light", "mixtral": "mixtral_sparse_ens5"}


def _test(name: str, llm: LLMConfig, layout: str = "sphinx-x") -> SphinxConfig:
    paper = f"test size of the {llm.family} family"
    return SphinxConfig(name, llm, _TEST_CONVNEXT, _TEST_DINOV2, layout, 2, paper, _LIGHT_TYPES[llm.family])


# SPHINX-Nano: ours, trained on CPU on synthetic VQA sets (`make nano`); small encoders of the same two
# kinds, 192 px views (6 x 6 tokens each) on a 2x2 grid, a 1024-piece SentencePiece vocabulary. Nano 1
# and 2 were trained on 128 px views (4 x 4 tokens; DINOv2's position table is still that 4 x 4 grid,
# interpolated), the last stage on these (recipes/nano2-v192.toml).
_NANO = SphinxConfig(
    "nano",
    LLMConfig("llama", 256, 4, 8, 4, llama_ffn_dim(256), 1024, max_seq_len=512),
    ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), image_size=192),
    DINOv2Config(embed_dim=128, depth=3, n_heads=4, ffn="mlp", pos_grid=4, image_size=84),
    "sphinx-x",
    2,
    "SPHINX-Nano (sphinx-edge)",
    "llama_ens5_light",
)

SIZES: dict[str, SphinxConfig] = {
    c.name: c
    for c in [
        _NANO,
        _full(
            "tiny",
            "SPHINX-Tiny",
            LLMConfig("llama", 2048, 22, 32, 4, llama_ffn_dim(2048), 32000),
            "llama_ens5_light",
        ),
        _full(
            "intern2",
            "SPHINX-Intern2",
            LLMConfig("internlm2", 4096, 32, 32, 8, 14336, 92544, rope_theta=1e6),
            "internlm_ems5_light",
        ),
        _four("sphinx", "SPHINX", _LLAMA2_13B, "llama_ens", 1, _CONVNEXT_224_AS_256),
        _four("sphinx-1k", "SPHINX-1k / SPHINX-v2-1k", _LLAMA2_13B, "llama_ens5", 2, _CONVNEXT_224_AS_256),
        _four("moe-512", "SPHINX-MoE", _MIXTRAL_8X7B, "mixtral_sparse_ens", 1, _CLIP_CONVNEXT_XXL),
        _four("moe", "SPHINX-MoE-1k", _MIXTRAL_8X7B, "mixtral_sparse_ens5", 2, _CLIP_CONVNEXT_XXL),
        _full("plus", "SPHINX-Plus (SPHINX-X, LLaMA2-13B, two experts)", _LLAMA2_13B, "llama_ens5_light"),
        _full("moe-light", "SPHINX-X MoE (Mixtral-8x7B, two experts)", _MIXTRAL_8X7B, "mixtral_sparse_ens5"),
        _test("test-tiny", _TEST_LLAMA),
        _test(
            "test-intern2",
            LLMConfig("internlm2", 32, 2, 4, 2, 64, 256, rope_theta=1e6, max_seq_len=512),
        ),
        _test("test-plus", LLMConfig("llama", 32, 2, 4, 4, 64, 256, max_seq_len=512)),
        _test("test-moe", _TEST_MIXTRAL),
        _test("test-1k", LLMConfig("llama", 32, 2, 4, 2, 64, 256, max_seq_len=512), layout="sphinx-1k"),
        # The four released four-expert kinds at test scale (28 px views; ConvNeXt tiles 28 or 64 px).
        _four("test-ens", "test size of llama_ens", _TEST_LLAMA, "llama_ens", 1, _TEST_CONVNEXT_28_AS_32, True),
        _four("test-ens5", "test size of llama_ens5", _TEST_LLAMA, "llama_ens5", 2, _TEST_CONVNEXT_28_AS_32, True),
        _four("test-sparse-ens", "test size of mixtral_sparse_ens", _TEST_MIXTRAL, "mixtral_sparse_ens", 1,
              _TEST_CONVNEXT, True),
        _four("test-sparse-ens5", "test size of mixtral_sparse_ens5", _TEST_MIXTRAL, "mixtral_sparse_ens5", 2,
              _TEST_CONVNEXT, True),
    ]
}

# The released model of each llama_type LLaMA2-Accessory names: what a checkpoint's shapes cannot
# show (view geometry, heads, LLM arguments config.json leaves out) comes from it (checkpoints/infer.py).
RELEASED = {
    "llama_ens5_light": "tiny",
    "internlm_ems5_light": "intern2",
    "llama_ens": "sphinx",
    "llama_ens5": "sphinx-1k",
    "mixtral_sparse_ens": "moe-512",
    "mixtral_sparse_ens5": "moe",
}


def released_config(llama_type: str) -> SphinxConfig | None:
    """The registered released model of a LLaMA2-Accessory llama_type; None for a type we do not read."""
    return SIZES[RELEASED[llama_type]] if llama_type in RELEASED else None


def get_config(size: str) -> SphinxConfig:
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}") from None


# --- Parameter counts -------------------------------------------------------------------------
# Exact closed forms, so that `sphinx-edge info` answers without importing torch (1-2 s here).
# tests/test_config.py checks each against the modules built on the meta device.


def llm_parameters(c: LLMConfig) -> int:
    attn = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
    ffn = 3 * c.dim * c.ffn_dim * max(c.n_experts, 1) + c.dim * c.n_experts  # + router
    return 2 * c.vocab_size * c.dim + c.dim + c.n_layers * (attn + ffn + 2 * c.dim)


def convnext_parameters(c: ConvNeXtConfig) -> int:
    total = 3 * 16 * c.dims[0] + c.dims[0] + 2 * c.dims[0]  # stem conv + LayerNorm2d
    for i, (depth, d) in enumerate(zip(c.depths, c.dims)):
        if i:
            prev = c.dims[i - 1]
            total += 2 * prev + prev * d * 4 + d  # LayerNorm2d + 2x2 conv
        hidden = c.mlp_ratio * d
        total += depth * ((49 + 1) * d + 2 * d + (d + 1) * hidden + (hidden + 1) * d + d)
    return total + 2 * c.dims[-1]  # head.norm


def dinov2_parameters(c: DINOv2Config) -> int:
    d, h = c.embed_dim, c.ffn_hidden
    embed = d * 3 * c.patch_size**2 + d + d * (2 + 1 + c.pos_grid**2)  # patch conv, cls, mask, pos
    mlp = (d + 1) * 2 * h + (h + 1) * d if c.ffn == "swiglu" else (d + 1) * h + (h + 1) * d
    block = 2 * d + (d + 1) * 3 * d + (d + 1) * d + d + 2 * d + mlp + d
    return embed + c.depth * block + 2 * d


def parameter_counts(c: SphinxConfig) -> dict[str, int]:
    """Parameters per part: llm, clip (four-expert models only), convnext, dinov2, qformer (four-expert
    only), projector (visual_proj and qformer_proj, each Linear + LayerNorm, and the learnt embeddings:
    start_img, end_img and, in sphinx-x, skip), total."""
    dim = c.llm.dim
    counts = {"llm": llm_parameters(c.llm)}
    if c.clip is not None:
        counts["clip"] = clip_vit_parameters(c.clip)
    counts["convnext"] = convnext_parameters(c.convnext)
    counts["dinov2"] = dinov2_parameters(c.dinov2)
    if c.qformer is not None:
        counts["qformer"] = qformer_parameters(c.qformer)
    projector = (c.vision_dim + 1) * dim + 2 * dim
    if c.qformer is not None:
        projector += (c.qformer.qformer_dim + 1) * dim + 2 * dim
    counts["projector"] = projector + (3 if c.layout == "sphinx-x" else 2) * dim
    counts["total"] = sum(counts.values())
    return counts


def clip_vit_parameters(c: CLIPViTConfig) -> int:
    d, h = c.width, c.mlp_hidden
    embed = 3 * c.patch_size**2 * d + d + (1 + c.n_patches) * d  # conv1 (no bias), class, positions
    block = 2 * d + (d + 1) * 3 * d + (d + 1) * d + 2 * d + (d + 1) * h + (h + 1) * d
    return embed + 2 * d + c.layers * block + 2 * d + d * c.output_dim  # ln_pre, blocks, ln_post, proj


def qformer_parameters(c: QFormerConfig) -> int:
    v, h = c.vision_dim, c.vision_mlp
    vision = 3 * c.patch_size**2 * v + v + v + (1 + c.n_patches) * v  # patch conv + bias, class, positions
    vision += c.vision_layers * (2 * v + (v + 1) * 3 * v + (v + 1) * v + 2 * v + (v + 1) * h + (h + 1) * v)
    vision += 2 * v  # post_layernorm
    q, m = c.qformer_dim, c.qformer_mlp
    self_attn = 3 * (q + 1) * q + (q + 1) * q + 2 * q
    cross_attn = (q + 1) * q + 2 * (v + 1) * q + (q + 1) * q + 2 * q
    ffn = (q + 1) * m + (m + 1) * q + 2 * q
    n_cross = len(range(0, c.qformer_layers, c.cross_attention_every))
    qformer = 2 * q + c.qformer_layers * (self_attn + ffn) + n_cross * cross_attn
    return vision + c.n_queries * q + qformer
