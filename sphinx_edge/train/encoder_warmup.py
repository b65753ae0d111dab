"""Supervised warm-up of a model's two visual experts on question answering (SPHINX-Nano).

Real SPHINX starts from pretrained CLIP-ConvNeXt and DINOv2 and keeps them frozen. Nano's experts
have no pretrained weights, and learning vision from scratch through the LLM's loss alone is slow
(benchmarks/RESULTS.md: 48.6 % after 4000 steps; a classifier on the experts learns from about 3x
as many answers per second as the whole model does). This stands in for their pretraining: both
experts encode an image's global view (or all its views, as the LLM gets them: `views="all"`), and a
small question-conditioned classifier on top of their concatenated tokens predicts each short answer, a word per answer slot or one digit per slot for
numbers (so "407" is "4", "0", "7", <end>). The classifier is thrown away afterwards; the warmed-up
experts go into a fresh model directory (random LLM, projector and special embeddings, as
`build_model` draws them) that the one-stage recipe starts from with `init = ...` and trains on
with the LLM (recipes/nano.toml).

Any LLaVA JSON with short answers works; answers longer than `SLOTS - 1` pieces are skipped.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sphinx_edge.config import SphinxConfig, get_config
from sphinx_edge.layout import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, plan_tiles, preprocess
from sphinx_edge.model.sphinx import SphinxModel, build_model
from sphinx_edge.train.data import DataError, read_conversations
from sphinx_edge.train.recipe import one_blas_thread, warmup_cosine
from sphinx_edge.train.resize_views import resize_views, resized_config
from sphinx_edge.train.synthetic import canonical_question

SLOTS = 4  # answer pieces per question, <end> included: numbers up to 3 digits
SAMPLE_PER = ("question", "image")
END = "<end>"


def answer_pieces(answer: str) -> list[str]:
    """A number is read digit by digit; any other answer is one piece."""
    answer = " ".join(answer.lower().split())
    return list(answer) if answer.isdigit() else [answer]


class AnswerHead(nn.Module):
    """Question-conditioned classifier over the experts' tokens: per answer slot, attention from a
    query learned for (question, slot) over the tokens, plus the tokens' mean (for counts).

    The tokens are read as an unordered set, as the LLM's attention reads them, so each token's
    features must carry what is there and where it is, bound together: the LLM has no other way to
    learn that the red circle is on the left. Measured against the v2 head (the tokens' max plus
    all tokens flattened, which knows each token's place from its index; benchmarks/RESULTS.md,
    session 8): position 90 % against 69 % in an 800-step probe, and 91.0 % against 79.4 % held-out
    (colour 93.9 %, position 99 %) for the full warm-up."""

    def __init__(self, vision_dim: int, n_questions: int, n_pieces: int, width: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(vision_dim)
        self.keys = nn.Linear(vision_dim, width)
        self.values = nn.Linear(vision_dim, width)
        self.mean = nn.Linear(vision_dim, width)
        self.queries = nn.Embedding(n_questions, SLOTS * width)
        self.question = nn.Embedding(n_questions, width)
        self.slot = nn.Parameter(torch.zeros(SLOTS, width))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, n_pieces))

    def forward(self, features: torch.Tensor, questions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, tokens, vision_dim], [B] -> [B, SLOTS, n_pieces] logits. `mask` [B, tokens] (True: a
        token) leaves out the padding of images with fewer views than others."""
        x = self.norm(features)
        b, t, _ = x.shape
        k = self.keys(x).view(b, t, self.heads, -1).transpose(1, 2)  # [B, heads, tokens, d]
        v = self.values(x).view(b, t, self.heads, -1).transpose(1, 2)
        q = self.queries(questions).view(b, SLOTS, self.heads, -1).transpose(1, 2)  # [B, heads, SLOTS, d]
        attend = None if mask is None else mask[:, None, None, :]
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(b, SLOTS, -1)
        if mask is None:
            mean = x.mean(dim=1)
        else:
            mean = (x * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        z = read + self.question(questions)[:, None] + self.mean(mean)[:, None] + self.slot
        return self.mlp(z)


# --- Data: global views cached as uint8 ---------------------------------------------------------


# Bicubic resampling overshoots [0, 1] at sharp edges (by up to ~7 %), so the uint8 code spans a
# little more than that: 1.2 / 255 per step, within 0.01 of the float views once normalised.
PIXEL_RANGE = (-0.1, 1.1)


def _to_uint8(view: np.ndarray, mean, std) -> np.ndarray:
    lo, hi = PIXEL_RANGE
    x = view * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.clip(np.rint((x - lo) * (255 / (hi - lo))), 0, 255).astype(np.uint8)


VIEWS = ("global", "all")  # what the experts see in the warm-up: the global view, or every view the LLM gets


def _views(job: tuple[str, SphinxConfig, str]) -> tuple[np.ndarray, np.ndarray]:
    """The image's global view, or all its encoded views (global, then the tiles that are not pure padding),
    cut by the layout's own preprocess so they match what the model sees later exactly."""
    image, config, views = job
    try:
        _, cv, dv = preprocess(image, layout=config.layout, grid=config.grid,
                               tile_size=config.convnext.image_size, dino_size=config.dinov2.image_size)
    except ImageLoadError as e:
        raise DataError(str(e)) from e
    if views == "global":
        cv, dv = cv[:1], dv[:1]
    return _to_uint8(cv, CLIP_MEAN, CLIP_STD), _to_uint8(dv, IMAGENET_MEAN, IMAGENET_STD)


def _view_count(image: str, config: SphinxConfig) -> int:
    """How many views `_views(..., "all")` gives, from the image's size alone."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            size = im.size
    except OSError as e:
        raise DataError(f"cannot read image {image}: {e}") from e
    plan = plan_tiles(*size, layout=config.layout, grid=config.grid, tile_size=config.convnext.image_size,
                      dino_size=config.dinov2.image_size)
    return 1 + sum(plan.encoded)


class WarmupData:
    """Every (image, question, answer pieces) of LLaVA JSON files, with the images' views in memory as
    uint8: the global views only (Nano's 60,000 take 3.5 GB), or every encoded view (`views="all"`:
    about 3.7 per synthetic image, so about 13 GB for 60,000)."""

    def __init__(self, json_files: Iterable[str | os.PathLike], config: SphinxConfig, *, limit: int | None = None,
                 workers: int = 2, progress=None, views: str = "global") -> None:
        if views not in VIEWS:
            raise ValueError(f"views must be one of {', '.join(VIEWS)}, not {views!r}")
        records = [r for f in json_files for r in read_conversations(f) if r[0] is not None][:limit]
        if not records:
            raise DataError("no records with an image")
        q_index: dict[str, int] = {}
        p_index = {END: 0}
        rows = []  # (image index, question index, [piece ids])
        for i, (_, pairs) in enumerate(records):
            for question, answer in pairs:
                pieces = answer_pieces(answer)
                if len(pieces) >= SLOTS:
                    continue
                qi = q_index.setdefault(canonical_question(question), len(q_index))
                ids = [p_index.setdefault(p, len(p_index)) for p in pieces] + [0] * (SLOTS - len(pieces))
                rows.append((i, qi, ids))
        self.questions: list[str] = list(q_index)
        self.pieces: list[str] = list(p_index)  # END first
        self.image_index = torch.tensor([r[0] for r in rows])
        self.question_ids = torch.tensor([r[1] for r in rows])
        self.targets = torch.tensor([r[2] for r in rows])
        c = config
        self.n_images = len(records)
        counts = [1 if views == "global" else _view_count(image, config) for image, _ in records]
        self.view_count = torch.tensor(counts)
        self.first_view = torch.cumsum(self.view_count, 0) - self.view_count
        total = int(self.view_count.sum())
        self.convnext = torch.empty(total, 3, c.convnext.image_size, c.convnext.image_size, dtype=torch.uint8)
        self.dinov2 = torch.empty(total, 3, c.dinov2.image_size, c.dinov2.image_size, dtype=torch.uint8)
        jobs = [(image, config, views) for image, _ in records]
        with get_context("fork").Pool(workers, initializer=one_blas_thread, initargs=(0,)) as pool:
            for i, (cv, dv) in enumerate(pool.imap(_views, jobs, chunksize=64)):
                start, n = int(self.first_view[i]), counts[i]
                assert len(cv) == n, f"{records[i][0]}: {len(cv)} views, {n} planned"
                self.convnext[start:start + n], self.dinov2[start:start + n] = torch.from_numpy(cv), torch.from_numpy(dv)
                if progress is not None:
                    progress(i + 1, len(jobs))
            # Workers leave on their own: the context's terminate() SIGTERMs them, and one waiting on the
            # task queue's lock never left once (a CI run hung in test_cli for 20 minutes, session 18).
            pool.close()
            pool.join()

    def __len__(self) -> int:
        return len(self.targets)

    def row_weights(self, per: str) -> torch.Tensor:
        """Sampling weight of each row: equal (`per="question"`), or 1 / the questions asked of its image
        (`per="image"`: every image, so every domain of a balanced set, gets the same share, however many
        questions it asks; a table asks 8, a shape 3)."""
        if per not in SAMPLE_PER:
            raise ValueError(f"per must be one of {', '.join(SAMPLE_PER)}, not {per!r}")
        if per == "question":
            return torch.ones(len(self))
        asked = torch.bincount(self.image_index, minlength=self.n_images)
        return 1.0 / asked[self.image_index].float()

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ConvNeXt views, DINOv2 views, views per row, question ids, targets): the rows' images' views
        one after another (see `read_views`)."""
        images = self.image_index[rows]
        counts = self.view_count[images]
        index = torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in zip(self.first_view[images], counts)])
        return (_normalize(self.convnext[index], CLIP_MEAN, CLIP_STD),
                _normalize(self.dinov2[index], IMAGENET_MEAN, IMAGENET_STD),
                counts, self.question_ids[rows], self.targets[rows])


def read_views(model: SphinxModel, convnext: torch.Tensor, dinov2: torch.Tensor,
               counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' tokens of each row's views as one set: [B, max views x tokens, vision_dim], and the
    mask of real tokens [B, ...] (None when every row has one view)."""
    features = model.visual_features(convnext, dinov2)  # [sum(counts), tokens, dim]
    if bool((counts == 1).all()):
        return features, None
    per_row = [f.flatten(0, 1) for f in features.split(counts.tolist())]
    padded = torch.nn.utils.rnn.pad_sequence(per_row, batch_first=True)
    lengths = torch.tensor([len(f) for f in per_row])
    return padded, torch.arange(padded.shape[1])[None, :] < lengths[:, None]


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 views (_to_uint8) -> the float views the model takes."""
    lo, hi = PIXEL_RANGE
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() * ((hi - lo) / 255) + lo - mean) / std


# --- Training --------------------------------------------------------------------------------


def _row_batches(data: WarmupData, batch_size: int, per: str, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of row indices: epochs of the rows in random order (per question), or rows drawn
    with `data.row_weights(per)` (per image)."""
    weights = data.row_weights(per)  # refuses an unknown `per` before the first step
    if per == "image":
        while True:
            yield torch.multinomial(weights, batch_size, replacement=True, generator=gen)
    order, pos = torch.randperm(len(data), generator=gen), 0
    while True:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def train_experts(model: SphinxModel, head: nn.Module, batches: Iterator, step_loss: Callable, *, steps: int,
                  lr: float, warmup_steps: int, weight_decay: float = 0.05, log: Callable[[str], None] = print,
                  log_every: int = 50, measure: str = "accuracy") -> list[dict]:
    """The warm-ups' loop: AdamW over model.convnext, model.dinov2 and `head`, warm-up + cosine schedule;
    `step_loss(batch)` -> (loss, accuracy on the batch) for each of `steps` batches. Returns the log rows
    ({"step", "loss", "accuracy"}, means since the last row); the experts are left in eval mode."""
    encoders = nn.ModuleList([model.convnext, model.dinov2]).train()
    params = [*encoders.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, warmup_steps, min_ratio=0.05))
    rows, t0, window = [], time.perf_counter(), []
    for step, batch in zip(range(steps), batches):
        loss, accuracy = step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        window.append((loss.item(), float(accuracy)))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            loss_m, acc_m = np.mean(window, axis=0)
            rows.append({"step": step + 1, "loss": float(loss_m), "accuracy": float(acc_m)})
            elapsed = time.perf_counter() - t0
            log(f"step {step + 1}/{steps}  loss {loss_m:.3f}  {measure} {acc_m:.1%}  "
                f"{elapsed / (step + 1):.2f} s/step  eta {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min")
            window = []
    encoders.eval()
    return rows


def warmup_encoders(model: SphinxModel, data: WarmupData, *, steps: int, batch_size: int = 128, lr: float = 1e-3,
                    warmup_steps: int = 50, weight_decay: float = 0.05, seed: int = 0, log=print,
                    log_every: int = 50, sample_per: str = "question") -> tuple[AnswerHead, list[dict]]:
    """Trains model.convnext and model.dinov2 (in place) with a new AnswerHead; returns the head and the
    log rows ({"step", "loss", "accuracy"}: accuracy = every slot of the answer right, on the batch).
    `sample_per`: see `WarmupData.row_weights`."""
    torch.manual_seed(seed)
    head = AnswerHead(model.config.vision_dim, len(data.questions), len(data.pieces))

    def step_loss(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        cv, dv, counts, questions, targets = data.batch(rows)
        features, mask = read_views(model, cv, dv, counts)
        logits = head(features, questions, mask)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, (logits.argmax(-1) == targets).all(-1).float().mean().item()

    batches = _row_batches(data, batch_size, sample_per, torch.Generator().manual_seed(seed))
    rows = train_experts(model, head, batches, step_loss, steps=steps, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, log=log, log_every=log_every, measure="answer accuracy")
    return head.eval(), rows


@torch.no_grad()
def head_accuracy(model: SphinxModel, head: AnswerHead, train: WarmupData, data: WarmupData,
                  domains: list[str] | None = None, batch_size: int = 256) -> dict:
    """Exact match of the warm-up classifier on each image's FIRST question (as `sphinx-edge eval`
    scores the full model), overall and per domain. `train` gives the question and answer vocabularies."""
    first = torch.ones(len(data), dtype=torch.bool)
    first[1:] = data.image_index[1:] != data.image_index[:-1]
    rows = first.nonzero()[:, 0]
    q_index = {q: i for i, q in enumerate(train.questions)}
    p_index = {p: i for i, p in enumerate(train.pieces)}
    remap_q = torch.tensor([q_index.get(q, -1) for q in data.questions])
    remap_p = torch.tensor([p_index.get(p, -1) for p in data.pieces])
    hits = []
    for chunk in rows.split(batch_size):
        cv, dv, counts, questions, targets = data.batch(chunk)
        known = remap_q[questions] >= 0
        features, mask = read_views(model, cv, dv, counts)
        logits = head(features, remap_q[questions].clamp(min=0), mask)
        hits.append((logits.argmax(-1) == remap_p[targets]).all(-1) & known)
    hits = torch.cat(hits)
    result = {"accuracy": hits.float().mean().item(), "n": len(hits)}
    if domains is not None:
        per = defaultdict(list)
        for image, hit in zip(data.image_index[rows].tolist(), hits.tolist()):
            per[domains[image]].append(hit)
        result["per_domain"] = {d: sum(h) / len(h) for d, h in per.items()}
    return result


def main(json_files: list[str], out: str, *, size: str = "nano", steps: int = 2500, batch_size: int = 128,
         lr: float = 1e-3, limit: int | None = None, seed: int = 0, tokenizer: str | None = None,
         workers: int = 2, eval_json: str | None = None, views: str = "global", init: str | None = None,
         sample_per: str = "question", view_size: int | None = None) -> Path:
    """Warm up `size`'s experts on `json_files` and save a model directory at `out` (the experts
    trained, everything else as `build_model(seed=seed)` draws it, or as the model directory `init`
    holds: its experts train on, under a new classifier and a new learning-rate schedule). `view_size`
    (px) replaces the size's (or init's) views: Nano 1 was trained on 128 px views, Nano on 192."""
    from rich.progress import Progress

    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.checkpoints.native import save_native

    start = load_model(init, size) if init is not None else None
    config = start.config if start is not None else get_config(size)
    if view_size is not None:
        config = resized_config(config, view_size)
    with Progress() as bar:
        task = bar.add_task(f"{views} views", total=None)
        data = WarmupData(json_files, config, limit=limit, workers=workers, views=views,
                          progress=lambda i, n: bar.update(task, completed=i, total=n))
    print(f"{len(data)} questions about {data.n_images} images ({len(data.convnext)} views); "
          f"{len(data.questions)} distinct questions, {len(data.pieces)} answer pieces", flush=True)
    if start is None:
        model = build_model(config, seed=seed)
    else:
        model = resize_views(start, config.convnext.image_size)
    head, _ = warmup_encoders(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              log=lambda s: print(s, flush=True), sample_per=sample_per)
    if eval_json is not None:
        held_out = WarmupData([eval_json], config, workers=workers, views=views)
        domains = [r.get("domain", "unknown") for r in json.loads(Path(eval_json).read_text()) if r.get("image")]
        result = head_accuracy(model, head, data, held_out, domains)
        per = "  ".join(f"{d} {a:.1%}" for d, a in sorted(result["per_domain"].items()))
        print(f"experts + warm-up classifier on {eval_json}: {result['accuracy']:.1%} of {result['n']} ({per})",
              flush=True)
    path = save_native(model, out, tokenizer=tokenizer)
    print(f"saved {path}", flush=True)
    return path
