"""The whole SPHINX-X model: Mixture of Visual experts + projector + special embeddings + LLM.

A view is encoded by every expert of the config: CLIP-ConvNeXt on a tile_size view, DINOv2 on a
dino_size view and, in the four-expert models (llama_ens*, mixtral_sparse_ens*), OpenAI CLIP ViT-L/14
and BLIP-2's Q-Former on the DINOv2 view. The experts' tokens are concatenated along channels in the
reference's order (CLIP, ConvNeXt, DINOv2), projected by `visual_proj` (Linear -> LayerNorm); the
Q-Former's query tokens are projected by `qformer_proj` and come first. Each view is wrapped by the
learnable `start_img` / `end_img` embeddings:

    two experts:  [start_img, pooled + patch tokens, end_img]                  (259 at full size)
    four experts: [start_img, 32 Q-Former tokens, pooled + patch tokens, end_img]  (291)

In the sphinx-x layout a fully padded tile is not encoded; one learnable `skip` embedding stands in
its place. The image tokens follow BOS; text follows them (docs/ARCHITECTURE.md, sections 1 and 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from sphinx_edge.processes import release_free_memory

from sphinx_edge.config import SphinxConfig
from sphinx_edge.layout import clip_to_imagenet
from sphinx_edge.model.clip_vit import CLIPViT
from sphinx_edge.model.convnext import ConvNeXt
from sphinx_edge.model.dinov2 import DINOv2
from sphinx_edge.model.llm import Transformer
from sphinx_edge.model.qformer import QFormer


def projector(in_dim: int, dim: int) -> nn.Sequential:
    """Linear -> LayerNorm, as the reference's visual_proj and qformer_proj."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))


def clip_pixels(dinov2_views: torch.Tensor) -> torch.Tensor:
    """The DINOv2 views (ImageNet statistics) back in CLIP statistics, as CLIP and the Q-Former read
    them: the inverse of layout.make_views' re-normalisation, computed in fp32."""
    gain, shift = (torch.from_numpy(a).to(dinov2_views.device) for a in clip_to_imagenet())
    return ((dinov2_views.float() - shift) / gain).to(dinov2_views.dtype)


class SphinxModel(nn.Module):
    def __init__(self, config: SphinxConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.llm.dim
        self.llm = Transformer(config.llm)
        # Parameter names are LLaMA2-Accessory's after its prefixes are mapped (checkpoints/accessory.py).
        self.clip = CLIPViT(config.clip) if config.clip is not None else None
        self.convnext = ConvNeXt(config.convnext)
        self.dinov2 = DINOv2(config.dinov2)
        self.qformer = QFormer(config.qformer) if config.qformer is not None else None
        self.visual_proj = projector(config.vision_dim, dim)
        self.qformer_proj = projector(config.qformer.qformer_dim, dim) if config.qformer is not None else None
        self.start_img = nn.Parameter(torch.empty(1, 1, dim))
        self.end_img = nn.Parameter(torch.empty(1, 1, dim))
        # The released sphinx-1k checkpoints have no skip embedding: every tile is encoded there.
        self.skip = nn.Parameter(torch.empty(1, 1, dim)) if config.layout == "sphinx-x" else None

    @property
    def experts(self) -> tuple[nn.Module, ...]:
        """The visual encoders this model has (frozen in SPHINX's training)."""
        return tuple(m for m in (self.clip, self.convnext, self.dinov2, self.qformer) if m is not None)

    def visual_features(self, convnext_views: torch.Tensor, dinov2_views: torch.Tensor) -> torch.Tensor:
        """[N, 3, tile, tile] and [N, 3, dino, dino] pixels -> [N, 1 + patches, vision_dim] (experts only):
        CLIP (four-expert models), ConvNeXt, DINOv2 along channels, in the reference's order."""
        views = self.expert_views(convnext_views, dinov2_views)
        return torch.cat([getattr(self, name)(pixels) for name, pixels in views], dim=-1)

    def expert_views(self, convnext_views: torch.Tensor,
                     dinov2_views: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Each expert (by attribute name) and the pixels it reads, in the order `visual_features`
        concatenates them; also for running the experts one at a time."""
        views = [("convnext", convnext_views), ("dinov2", dinov2_views)]
        if self.clip is not None:
            views.insert(0, ("clip", clip_pixels(dinov2_views)))
        return views

    def query_features(self, dinov2_views: torch.Tensor) -> torch.Tensor | None:
        """[N, 3, dino, dino] pixels -> the Q-Former's [N, n_queries, qformer_dim]; None without one."""
        return None if self.qformer is None else self.qformer(clip_pixels(dinov2_views))

    def project_views(self, features: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Expert features (and the Q-Former's queries) -> [N, tokens_per_view, dim]: [start_img,
        qformer_proj(queries), visual_proj(features), end_img]."""
        dtype = self.visual_proj[0].weight.dtype
        tokens = self.visual_proj(features.to(dtype))
        if self.qformer_proj is not None:
            if queries is None:
                raise ValueError("this model's views start with the Q-Former's tokens: pass query_features")
            tokens = torch.cat([self.qformer_proj(queries.to(dtype)), tokens], dim=1)
        n = tokens.shape[0]
        return torch.cat([self.start_img.expand(n, -1, -1), tokens, self.end_img.expand(n, -1, -1)], dim=1)

    def encode_views(self, convnext_views: torch.Tensor, dinov2_views: torch.Tensor) -> torch.Tensor:
        """[N, 3, tile, tile] and [N, 3, dino, dino] pixels -> [N, tokens_per_view, dim] embeddings."""
        features = self.visual_features(convnext_views, dinov2_views)
        return self.project_views(features, self.query_features(dinov2_views))

    def embed_sequence(
        self,
        token_ids: torch.Tensor,
        view_embeds: torch.Tensor | None = None,
        segments: Sequence[tuple[str, int]] = (),
    ) -> torch.Tensor:
        """[1, L, dim]: BOS, then the image segments (encoded views / skips), then the rest of `token_ids`.

        `token_ids` [T] starts with BOS; `segments` comes from `layout.image_segments(plan)`.
        """
        text = self.llm.tok_embeddings(token_ids)
        pieces = [text[:1]]
        for kind, index in segments:
            if kind == "view":
                pieces.append(view_embeds[index])
            elif kind == "skip":
                if self.skip is None:
                    raise ValueError(f"the {self.config.layout} layout has no skip embedding")
                pieces.append(self.skip[0])
            else:
                raise ValueError(f"unknown image segment {kind!r}")
        pieces.append(text[1:])
        return torch.cat([p.to(text.dtype) for p in pieces], dim=0)[None]

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor | None = None, **kw) -> torch.Tensor:
        return self.llm(inputs_embeds, input_pos, **kw)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class RandomFill:
    """The random initialisation, one parameter at a time: `fill(name, tensor)` sets the parameter
    called `name`. Called for every parameter in `named_parameters` order, it draws exactly what
    `init_weights` draws (one generator), so a model materialised module by module gets the same
    weights as one initialised whole. `skip(name, shape)` stands for a parameter that is not wanted
    this time: the generator moves on as if it had been drawn. The generator's state before each
    parameter is remembered, so a later pass over the same model (`materialize(..., only=...)`)
    jumps over what it skips instead of drawing it again.

    ConvNeXt convolutions and MLPs get He (fan-in) normal weights and layer scales of 1. timm's std
    0.02 and layer scale 1e-6 start it as a near-identity map, which would hide export bugs behind
    vanishing activations and learns slowly from scratch: with std 0.02 and layer scales of 0.1,
    a probe reading Nano's numbers scored 11 % held-out after 800 steps against 27 % with these
    (benchmarks/RESULTS.md, session 7). Everything else is normal(std)."""

    def __init__(self, std: float = 0.02, seed: int | None = None) -> None:
        self.std, self.seed = std, seed
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.states: dict[str, torch.Tensor] = {}  # parameter name -> generator state before it (seeded only)
        self._skipped: list[tuple[str, torch.Size]] = []  # not drawn yet

    def restart(self) -> RandomFill:
        """Back to the first parameter, for another pass over the same model (the states stay)."""
        if self.seed is not None:
            self.gen.manual_seed(self.seed)
        self._skipped.clear()
        return self

    def _normal(self, t: torch.Tensor, s: float) -> None:
        t.normal_(generator=self.gen).mul_(s)  # = randn(shape) * s, in place: no temporaries

    def skip(self, name: str, shape: torch.Size) -> None:
        self._skipped.append((name, shape))

    @torch.no_grad()
    def __call__(self, name: str, p: torch.Tensor) -> None:
        self._catch_up(name)
        if self.gen is not None:
            self.states.setdefault(name, self.gen.get_state())
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("convnext.") and leaf == "weight" and p.ndim >= 2:
            self._normal(p, math.sqrt(2.0 / p[0].numel()))  # p[0].numel() = fan-in (in / groups x kernel)
        elif name.startswith("convnext.") and leaf == "gamma":
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        elif leaf == "weight" and p.ndim == 1:  # LayerNorm / RMSNorm scales
            p.fill_(1.0)
        elif leaf == "gamma":
            p.fill_(0.1)
        elif leaf in ("start_img", "end_img", "skip"):
            p.copy_(torch.rand(p.shape, generator=self.gen))
        elif leaf == "in_proj_bias":  # CLIP's fused attention bias
            p.zero_()
        elif leaf in ("weight", "w1", "w2", "w3", "cls_token", "pos_embed", "mask_token", "in_proj_weight", "proj",
                      "class_embedding", "positional_embedding", "position_embedding", "query_tokens"):
            self._normal(p, self.std)
        else:
            raise AssertionError(f"init_weights has no rule for parameter {name}")

    def _catch_up(self, name: str) -> None:
        """Before `name` is drawn: the generator where it would be had the skipped parameters been drawn."""
        skipped, self._skipped = self._skipped, []
        if skipped and name in self.states:
            self.gen.set_state(self.states[name])
            return
        for other, shape in skipped:
            self(other, torch.empty(shape))  # drawn and dropped (and its state remembered)
        if skipped:  # glibc keeps the dropped draws' blocks in its heap: SPHINX-Tiny's LLM left ~2 GB there
            release_free_memory()


def init_weights(model: SphinxModel, std: float = 0.02, seed: int | None = None) -> SphinxModel:
    """Random initialisation for training from scratch and latency work (`RandomFill`)."""
    fill = RandomFill(std, seed)
    for name, p in model.named_parameters():
        fill(name, p)
    return model


TRIM_EVERY = 256 << 20


def in_parts(name: str, parts: Sequence[str]) -> bool:
    """Whether the parameter or module `name` is one of `parts` or inside one ("llm" holds "llm.norm")."""
    return any(name == part or name.startswith(part + ".") for part in parts)


class WeightStore(Protocol):
    """Where `materialize` puts parameters instead of fresh memory (export.memory.ScratchWeights)."""

    def new(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor: ...

    def written(self) -> None: ...  # a parameter is filled: its pages may leave the resident set


@torch.no_grad()
def materialize(model: nn.Module, fill: Callable[[str, torch.Tensor], None],
                on_module: Callable[[str, nn.Module], None] | None = None,
                only: Sequence[str] | None = None, store: WeightStore | None = None) -> nn.Module:
    """Gives a model built on the meta device real weights, one module at a time: each parameter is
    allocated and set by `fill(name, tensor)` (in `named_parameters` order), and once a module's own
    parameters are in place `on_module(name, module)` may transform it, e.g. quantize a Linear. With
    a quantizing `on_module` the fp32 model never exists whole: memory stays near the transformed
    model plus one module. `only`: the parts to make (e.g. ("dinov2", "llm.tok_embeddings")); the
    others stay on the meta device (`fill.skip(name, shape)` is told about each of their parameters).
    `store`: where the parameters live (default: fresh memory)."""
    made = 0
    for module_name, module in model.named_modules():
        for leaf, p in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if only is not None and not in_parts(name, only):
                fill.skip(name, p.shape)
                continue
            value = store.new(p.shape, p.dtype) if store else torch.empty(p.shape, dtype=p.dtype)
            fill(name, value)
            if store:
                store.written()
            setattr(module, leaf, nn.Parameter(value, requires_grad=p.requires_grad))
            made += value.numel() * value.element_size()
            if made >= TRIM_EVERY:  # the fills' temporaries stay in glibc's heap otherwise
                release_free_memory()
                made = 0
        if on_module is not None and (only is None or in_parts(module_name, only)):
            on_module(module_name, module)
    return model


def each_module(model: nn.Module, on_module: Callable[[str, nn.Module], None] | None) -> nn.Module:
    """`on_module(name, module)` for every module of a model that is already whole (`materialize`'s
    hook, for weights loaded at once)."""
    for name, module in list(model.named_modules()) if on_module else []:
        on_module(name, module)
    return model


def build_model(
    config: SphinxConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> SphinxModel:
    """A randomly initialised model (use `device="meta"` to inspect shapes without memory)."""
    with torch.device(device):
        model = SphinxModel(config)
    if str(device) != "meta":
        init_weights(model, seed=seed)
    return model.to(dtype)


def model_of_state(config: SphinxConfig, state: dict[str, torch.Tensor]) -> SphinxModel:
    """A model of `config` that takes over `state`'s tensors (no copy; a model has no buffers until its
    KV cache is set up), e.g. the same weights read another way: deeper, on other views, unwrapped."""
    with torch.device("meta"):
        model = SphinxModel(config)
    model.load_state_dict(state, assign=True)
    return model
