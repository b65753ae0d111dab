"""Self-verification of an export against the PyTorch model it came from.

* fp32 graphs: the prefill's last-token logits within 1e-3 of torch on a sample image + prompt,
  and the same greedy tokens for 32 steps.
* quantized graphs: top-1 agreement with the fp32 torch model, teacher-forced along the torch
  model's own greedy continuation (so one early disagreement does not derail the rest), and
  the largest logit difference.
* every export: the cosine between its image embeddings (the image part of the sequence) and
  torch's, which isolates the vision encoder's quantization.
* SPHINX-Nano: exact-match accuracy on held-out synthetic questions, torch and export side by side.

The torch side runs first and is kept as plain arrays (`Reference`, the torch accuracy), so the
exporter can drop the model before it loads the export's graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sphinx_edge.export.memory import release_memory
from sphinx_edge.generate import build_inputs, generate, image_views
from sphinx_edge.layout import image_segments
from sphinx_edge.model.sphinx import SphinxModel
from sphinx_edge.prompt import format_prompt
from sphinx_edge.runtime.pipeline import Pipeline
from sphinx_edge.tokenizer import Tokenizer

LOGIT_TOLERANCE = 1e-3
GREEDY_STEPS = 32
SAMPLE_PROMPT = "What is shown in the image? Describe the shapes and their colours."


@torch.inference_mode()
def _torch_greedy(model: SphinxModel, tokenizer: Tokenizer, prompt: str,
                  image: Path) -> tuple[np.ndarray, list[int], np.ndarray]:
    """The prefill's last logits, the greedy continuation (stop strings and EOS ignored) and the
    image part of the sequence."""
    return _greedy(model.llm, *build_inputs(model, tokenizer, prompt, image))


@torch.inference_mode()
def _greedy(llm, embeds: torch.Tensor, n_image: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    image_embeds = embeds[0, 1:1 + n_image].float().numpy().copy()  # after BOS
    llm.setup_caches(max_seq_len=embeds.shape[1] + GREEDY_STEPS)
    try:
        logits = llm(embeds, torch.arange(embeds.shape[1]), last_logits_only=True)[0, -1]
        first, tokens = logits.float().numpy().copy(), []
        for step in range(GREEDY_STEPS):
            tokens.append(int(logits.argmax()))
            logits = llm(llm.tok_embeddings(torch.tensor([[tokens[-1]]])), torch.tensor([embeds.shape[1] + step]))[0, -1]
    finally:
        llm.clear_caches()
    return first, tokens, image_embeds


@torch.inference_mode()
def _streamed_views(load: Callable[..., SphinxModel], image: Path):
    """The image's encoded views with one part of the model in memory at a time: each visual expert on
    its own, then the projectors; the same operations in the same order as `build_inputs` on the
    whole model, for a model too large to hold in fp32 (SPHINX-Tiny: 12.4 GB). Returns (views [N,
    tokens_per_view, dim], tile plan)."""
    skeleton = load(only=())  # the parts and their order, no weights
    plan, convnext_views, dinov2_views = image_views(skeleton.config, image)
    convnext_views, dinov2_views = torch.from_numpy(convnext_views), torch.from_numpy(dinov2_views)
    features, queries = [], None
    for name, pixels in skeleton.expert_views(convnext_views, dinov2_views):
        features.append(getattr(load(only=(name,)), name)(pixels))
        release_memory()
    if skeleton.qformer is not None:
        queries = load(only=("qformer",)).query_features(dinov2_views)
        release_memory()
    heads = load(only=("visual_proj", "qformer_proj", "start_img", "end_img"))
    return heads.project_views(torch.cat(features, dim=-1), queries), plan


def _export_teacher_forced(pipeline: Pipeline, prompt: str, image: Path,
                           tokens: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """The export's logits at each step when fed `tokens` (the torch model's continuation), and
    its image part of the sequence."""
    backend = pipeline.backend
    image_embeds, _ = pipeline.encode_image(image)
    out = [pipeline.prefill(pipeline.tokenizer.encode(prompt, bos=True), image_embeds)]
    for t in tokens[:-1]:
        out.append(backend.forward(backend.embed(np.array([t]))))
    return out, image_embeds


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass
class Reference:
    """What the PyTorch fp32 model gives on the sample: computed once, so that the model can be
    dropped before the export's graphs are loaded (a large model and its export do not both fit)."""
    prompt: str
    image: Path
    logits: np.ndarray  # the prefill's last-token logits
    tokens: list[int]  # its greedy continuation
    image_embeds: np.ndarray


def torch_reference(model: SphinxModel, tokenizer: Tokenizer, image: Path) -> Reference:
    prompt = format_prompt([(SAMPLE_PROMPT, None)])
    return Reference(prompt, image, *_torch_greedy(model, tokenizer, prompt, image))


def streamed_reference(load: Callable[..., SphinxModel], tokenizer: Tokenizer, image: Path) -> Reference:
    """`torch_reference` of the model that `load(only=parts)` makes part by part (`ModelSource.load`):
    memory holds the largest part (an expert, or the LLM), never the whole fp32 model."""
    prompt = format_prompt([(SAMPLE_PROMPT, None)])
    views, plan = _streamed_views(load, image)
    release_memory()
    model = load(only=("llm", "skip"))
    with torch.inference_mode():
        embeds = model.embed_sequence(torch.tensor(tokenizer.encode(prompt, bos=True)), views, image_segments(plan))
    return Reference(prompt, image, *_greedy(model.llm, embeds, plan.n_image_tokens(model.config.tokens_per_view)))


def verify_export(reference: Reference, export_dir: Path, backend: str, quant: str) -> dict:
    """Figures for one backend of an export (the manifest's `verification.<backend>`)."""
    pipeline = Pipeline(export_dir, backend)
    got, got_image = _export_teacher_forced(pipeline, reference.prompt, reference.image, reference.tokens)
    agree = [int(np.argmax(g)) == t for g, t in zip(got, reference.tokens)]
    first_diff = float(np.abs(got[0] - reference.logits).max())
    figures = {
        "image": reference.image.name,
        "prefill_max_abs_logit_diff": first_diff,
        "top1_agreement": sum(agree) / len(agree),
        "steps": len(agree),
        "image_embeds_cosine": cosine(got_image, reference.image_embeds),  # the vision side alone (int8 vs fp32)
    }
    if quant == "fp32":
        figures["greedy_identical"] = all(agree)
        figures["passed"] = bool(first_diff <= LOGIT_TOLERANCE and all(agree))
    return figures


def held_out_questions(n: int, out_dir: Path) -> Path:
    """The first `n` questions of the `data synth` test split (seed 1), written to `out_dir`."""
    from sphinx_edge.train.synthetic import generate as synthesize

    return synthesize(out_dir, n, seed=1, split="test")


def torch_accuracy(model: SphinxModel, tokenizer: Tokenizer, data: Path,
                   progress: Callable[[int, int], None] | None = None) -> float:
    """Exact match of the torch fp32 model on held-out synthetic questions."""
    from sphinx_edge.train.synthetic import evaluate

    return evaluate(lambda img, q: generate(model, tokenizer, q, img, max_new_tokens=16).text, data,
                    progress=progress)["accuracy"]


def export_accuracy(export_dir: Path, backend: str, data: Path,
                    progress: Callable[[int, int], None] | None = None) -> float:
    """Exact match of one backend of an export on the same questions."""
    from sphinx_edge.train.synthetic import evaluate

    pipeline = Pipeline(export_dir, backend)
    return evaluate(lambda img, q: pipeline.answer(q, img, max_new_tokens=16).text, data, progress=progress)["accuracy"]
