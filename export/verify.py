"""Self-verification of an export against the PyTorch model it came from.

* fp32 graphs: the prefill's last-token logits within 1e-3 of torch on a sample image + prompt,
  and the same greedy tokens for 32 steps.
* quantized graphs: top-1 agreement with the fp32 torch model, teacher-forced along the torch
  model's own greedy continuation (so one early disagreement does not derail the rest), and
  the largest logit difference.
* every export: the cosine between its image embeddings (the image part of the sequence) and
  torch's, which isolates the vision encoder's quantization.
* SPHINX-Nano: exact-match accuracy on held-out synthetic questions, torch and export side by side.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sphinx_edge.generate import build_inputs, generate
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
    embeds, n_image = build_inputs(model, tokenizer, prompt, image)
    image_embeds = embeds[0, 1:1 + n_image].float().numpy().copy()  # after BOS
    llm = model.llm
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


def verify_export(model: SphinxModel, tokenizer: Tokenizer, export_dir: Path, backend: str, quant: str,
                  image: Path) -> dict:
    """Figures for one backend of an export (the manifest's `verification.<backend>`)."""
    prompt = format_prompt([(SAMPLE_PROMPT, None)])
    ref_logits, ref_tokens, ref_image = _torch_greedy(model, tokenizer, prompt, image)
    pipeline = Pipeline(export_dir, backend)
    got, got_image = _export_teacher_forced(pipeline, prompt, image, ref_tokens)
    agree = [int(np.argmax(g)) == t for g, t in zip(got, ref_tokens)]
    first_diff = float(np.abs(got[0] - ref_logits).max())
    figures = {
        "image": image.name,
        "prefill_max_abs_logit_diff": first_diff,
        "top1_agreement": sum(agree) / len(agree),
        "steps": len(agree),
        "image_embeds_cosine": cosine(got_image, ref_image),  # the vision side alone (int8 vs fp32)
    }
    if quant == "fp32":
        figures["greedy_identical"] = all(agree)
        figures["passed"] = bool(first_diff <= LOGIT_TOLERANCE and all(agree))
    return figures


def nano_accuracy(model: SphinxModel, tokenizer: Tokenizer, export_dir: Path, backends: list[str],
                  n: int = 100, progress: Callable[[int, int], None] | None = None) -> dict:
    """Exact match on `n` held-out synthetic questions (the `data synth` test split, seed 1):
    the torch fp32 model and each backend of the export, on the same questions."""
    from sphinx_edge.train.synthetic import evaluate, generate as synthesize

    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize(Path(tmp), n, seed=1, split="test")
        scores = {"n": n}
        scores["torch_fp32"] = evaluate(
            lambda img, q: generate(model, tokenizer, q, img, max_new_tokens=16).text, data, progress=progress)["accuracy"]
        for name in backends:
            pipeline = Pipeline(export_dir, name)
            scores[name] = evaluate(lambda img, q: pipeline.answer(q, img, max_new_tokens=16).text, data,
                                    progress=progress)["accuracy"]
    return scores
