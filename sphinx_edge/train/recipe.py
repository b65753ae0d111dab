"""SPHINX-X one-stage training: launch with torchrun (1 GPU, N GPUs, N nodes) or plainly on a CPU.

    torchrun --nproc_per_node 8 -m sphinx_edge.train.recipe recipes/tiny.toml
    python -m sphinx_edge.train.recipe recipes/nano.toml            # one process, CPU or GPU

FSDP2 (`fully_shard`) shards every LLM block, each encoder and the rest; activation checkpointing
per LLM block; bf16 autocast over fp32 master weights; AdamW (0.9, 0.95); warm-up + cosine;
gradient clipping and accumulation. Checkpoints (torch.distributed.checkpoint, written to a
temporary directory and renamed) hold the model, optimizer, scheduler and step; the data order is a
pure function of the step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sphinx_edge.config import SphinxConfig, get_config
from sphinx_edge.errors import UserError
from sphinx_edge.io import write_text_atomic
from sphinx_edge.model.sphinx import SphinxModel, build_model, model_of_state
from sphinx_edge.train.data import IGNORE, ConversationDataset, Example, Mixture
from sphinx_edge.train.deepen import deepen, deepened_config
from sphinx_edge.train.flops import model_flops_per_token, peak_flops
from sphinx_edge.train.resize_views import resize_views, resized_config


# "token": every supervised token of the batch weighs the same (SPHINX's reference); "conversation":
# each conversation's tokens are averaged first, so an image asking nine questions (a table) weighs
# as much as one asking three (a colour), and a balanced set of images trains each domain equally.
LOSS_PER = ("token", "conversation")


@dataclass
class DataSource:
    json: str
    weight: float = 1.0


@dataclass
class TrainConfig:
    size: str
    out_dir: str
    data: list[DataSource]
    tokenizer: str
    init: str | None = None  # checkpoint directory to start from; random weights if None
    llm_layers: int | None = None  # grow the LLM to this many blocks, a multiple of its own (train/deepen.py)
    view_size: int | None = None  # views of this many pixels, a multiple of 32 (train/resize_views.py)
    steps: int = 1000
    batch_size: int = 8  # per rank, per micro-batch
    grad_accum: int = 1
    max_len: int = 2048
    lr: float = 2e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "bf16"  # autocast dtype: bf16 or fp32 (no autocast)
    activation_checkpointing: bool = True
    freeze_encoders: bool = True  # SPHINX freezes both visual experts
    encoder_lr_ratio: float = 1.0  # trained experts (freeze_encoders = false) learn at this fraction of lr
    loss_per: str = "token"  # one of LOSS_PER: what the batch's loss averages over (batch_loss)
    vqa_suffix: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 4  # processes that load and tile images ahead of the step (0: in the training process)
    stop_after: int | None = None  # end this run at that step (time-boxed jobs); resume later

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        raw = tomllib.loads(Path(path).read_text())
        raw.pop("hardware", None)  # human-readable requirements; not used by the code
        raw.update({k: v for k, v in overrides.items() if v is not None})
        base = Path(path).parent
        raw["data"] = [DataSource(**{**d, "json": str((base / d["json"]).resolve())}) for d in raw["data"]]
        for key in ("tokenizer", "init"):
            if raw.get(key):
                raw[key] = str((base / raw[key]).resolve())
        raw["out_dir"] = str(Path(raw["out_dir"]) if Path(raw["out_dir"]).is_absolute() else base / raw["out_dir"])
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {unknown}")
        return cls(**raw)

    def __post_init__(self) -> None:
        if self.loss_per not in LOSS_PER:
            raise ValueError(f"loss_per must be one of {LOSS_PER}, got {self.loss_per!r}")


# --- Distributed set-up ------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


class Trainee(nn.Module):
    """The model under training: one forward computes the loss of a batch.

    FSDP2 gathers a module's parameters around its forward only, so the whole step (encoders,
    projector, sequence assembly, LLM) runs inside this root module's forward.
    """

    def __init__(self, model: SphinxModel, frozen_encoders: bool, loss_per: str = "token") -> None:
        super().__init__()
        self.model, self.frozen_encoders, self.loss_per = model, frozen_encoders, loss_per

    def forward(self, examples: list[Example]) -> tuple[torch.Tensor, int]:
        return batch_loss(self.model, examples, self.model.start_img.device, self.frozen_encoders, self.loss_per)


def shard_model(trainee: Trainee) -> None:
    """FSDP2: one shard group per LLM block, per encoder, then the root (projector, special tokens).

    Any torchrun launch shards, one GPU included (the same code path as a cluster's); a plain
    `python -m` run does not."""
    if not dist.is_initialized():
        return
    from torch.distributed.fsdp import fully_shard

    for block in trainee.model.llm.layers:
        fully_shard(block)
    for expert in trainee.model.experts:
        fully_shard(expert)
    fully_shard(trainee)


# --- Model, optimizer, schedule ----------------------------------------------------------------


def prepare_model(cfg: TrainConfig, device: torch.device) -> SphinxModel:
    if cfg.init:
        from sphinx_edge.checkpoints import load_model

        model = load_model(cfg.init, cfg.size)
        if cfg.llm_layers:
            model = deepen(model, cfg.llm_layers)
        if cfg.view_size:
            model = resize_views(model, cfg.view_size)
    else:
        model = build_model(model_config(cfg), seed=cfg.seed)
    model.to(device).train()
    if cfg.freeze_encoders:
        for encoder in model.experts:
            encoder.requires_grad_(False).eval()
    model.llm.gradient_checkpointing = cfg.activation_checkpointing
    return model


def model_config(cfg: TrainConfig) -> SphinxConfig:
    """The configuration of the model a recipe trains: its init's (or its size's), grown to llm_layers,
    its views resized to view_size."""
    if cfg.init:
        from sphinx_edge.checkpoints import checkpoint_config

        config = checkpoint_config(cfg.init, cfg.size)
    else:
        config = get_config(cfg.size)
    if cfg.llm_layers:
        config = deepened_config(config, cfg.llm_layers)
    return resized_config(config, cfg.view_size) if cfg.view_size else config


def make_optimizer(model: SphinxModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; the experts, when trained, at encoder_lr_ratio x lr (the
    schedule scales every group alike)."""
    experts = {id(p) for encoder in model.experts for p in encoder.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and "embed" not in name
            groups.setdefault((decay, id(p) in experts), []).append(p)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
          "lr": cfg.lr * (cfg.encoder_lr_ratio if expert else 1.0)}
         for (decay, expert), params in sorted(groups.items())],
        lr=cfg.lr, betas=cfg.betas)


def warmup_cosine(step: int, steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to min_ratio of the peak: the factor on the peak lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


# --- Data loading -------------------------------------------------------------------------------


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of a run is the mixture's batch `first + k`: a pure function, so workers may build them."""

    def __init__(self, mixture: Mixture, first: int, count: int) -> None:
        self.mixture, self.first, self.count = mixture, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> list[Example]:
        return self.mixture.batch(self.first + k)


def _as_is(batch: list[Example]) -> list[Example]:
    return batch


def one_blas_thread(worker_id: int) -> None:
    """Each worker is one core's worth of tiling: numpy's BLAS would otherwise start a thread per
    core in every worker (16 workers x 16 threads on a GPU host) and they would fight."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def micro_batches(mixture: Mixture, first: int, count: int, workers: int) -> Iterator[list[Example]]:
    """Micro-batches first, first + 1, ... in order; `workers` processes decode and tile images ahead."""
    if workers == 0:
        return (mixture.batch(first + k) for k in range(count))
    loader = torch.utils.data.DataLoader(_MicroBatches(mixture, first, count), batch_size=None, collate_fn=_as_is,
                                         num_workers=workers, prefetch_factor=4, worker_init_fn=one_blas_thread)
    return iter(loader)


@contextmanager
def _worker_deaths_explained() -> Iterator[None]:
    # A worker killed from outside (the kernel's OOM killer, a stray kill) surfaces as torch's
    # RuntimeError, from the next batch or from its SIGCHLD handler wherever the main thread is; the CLI
    # would report it as a bug, but it is the user's to act on, and nothing is lost.
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        raise UserError(f"{e} (out of memory?); the same command resumes from the last checkpoint") from None


# --- One step ------------------------------------------------------------------------------------


def batch_loss(model: SphinxModel, examples: list[Example], device: torch.device, frozen: bool,
               loss_per: str = "token") -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the supervised tokens of a padded batch (`loss_per="conversation"`: the
    mean of each conversation's mean), and the tokens processed (padding included)."""
    views = [(e.convnext_views, e.dinov2_views) for e in examples if e.convnext_views is not None]
    view_embeds = None
    if views:
        cv = torch.from_numpy(np.concatenate([v[0] for v in views])).to(device)
        dv = torch.from_numpy(np.concatenate([v[1] for v in views])).to(device)
        with torch.set_grad_enabled(not frozen and torch.is_grad_enabled()):
            features, queries = model.visual_features(cv, dv), model.query_features(dv)
        view_embeds = model.project_views(features, queries)
    seqs, offset = [], 0
    for e in examples:
        n = e.convnext_views.shape[0] if e.convnext_views is not None else 0
        ids = torch.from_numpy(e.text_ids).to(device)
        seqs.append(model.embed_sequence(ids, view_embeds[offset:offset + n] if n else None, e.segments)[0])
        offset += n
    length = max(s.shape[0] for s in seqs)
    embeds = torch.stack([F.pad(s, (0, 0, 0, length - s.shape[0])) for s in seqs])  # right padding
    targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        targets[i, : len(e.targets)] = torch.from_numpy(e.targets)
    logits = model.llm(embeds)
    targets = targets.to(device)
    supervised = (targets != IGNORE).sum(dim=1)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="none").view(targets.shape).sum(dim=1)
    if loss_per == "conversation":
        kept = supervised > 0
        loss = (loss[kept] / supervised[kept]).sum() / max(int(kept.sum()), 1)
    else:
        loss = loss.sum() / max(int(supervised.sum()), 1)
    return loss, int(embeds.shape[0] * embeds.shape[1])


# --- Checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(model, optimizer, scheduler, step: int, cfg: TrainConfig, rank: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(cfg.out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if rank == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "config": dataclasses.asdict(cfg)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", final.name)
        for old in sorted(root.glob("step_???????"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(model, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Restores the latest complete checkpoint, if any; returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = Path(cfg.out_dir) / "checkpoints"
    if not (root / "latest").exists():
        return 0
    path = root / (root / "latest").read_text().strip()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    return int(trainer["step"])


def export_latest(cfg: TrainConfig, out: str | os.PathLike) -> Path:
    """The latest training checkpoint of a recipe, as a sphinx-edge model directory (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from sphinx_edge.checkpoints.native import save_native

    root = Path(cfg.out_dir) / "checkpoints"
    if not (root / "latest").exists():
        raise FileNotFoundError(f"{root} holds no checkpoint yet")
    path = root / (root / "latest").read_text().strip()
    trainee = Trainee(build_model(model_config(cfg), seed=cfg.seed), cfg.freeze_encoders)
    state = {"model": get_model_state_dict(trainee)}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(trainee, state["model"])
    return save_native(trainee.model, out, tokenizer=cfg.tokenizer)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _one_process_quiet() -> Iterator[None]:
    """torch.distributed.checkpoint warns at every save and load that it runs without a process group;
    on one CPU that is the plan, not news."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --- The loop ------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> list[float]:
    """Runs (or resumes) training; returns the loss of each step run."""
    with _worker_deaths_explained():
        return _train(cfg)


def _train(cfg: TrainConfig) -> list[float]:
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    from sphinx_edge.tokenizer import Tokenizer

    tokenizer = Tokenizer(cfg.tokenizer)
    model = prepare_model(cfg, device)
    if tokenizer.vocab_size > model.config.llm.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but size {cfg.size!r} embeds only "
                         f"{model.config.llm.vocab_size}")
    datasets = [ConversationDataset(d.json, tokenizer, model.config, max_len=cfg.max_len, vqa_suffix=cfg.vqa_suffix)
                for d in cfg.data]
    mixture = Mixture(datasets, [d.weight for d in cfg.data], cfg.batch_size, cfg.seed, rank, world)
    trainee = Trainee(model, cfg.freeze_encoders, cfg.loss_per)
    shard_model(trainee)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start = load_checkpoint(trainee, optimizer, scheduler, cfg)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start:
            print(f"resuming from step {start}", flush=True)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    losses, t_start = [], time.perf_counter()
    end = min(cfg.steps, cfg.stop_after or cfg.steps)
    batches = micro_batches(mixture, start * cfg.grad_accum, (end - start) * cfg.grad_accum, cfg.num_workers)
    flops_per_token, peak = None, peak_flops(device, cfg.dtype)
    for step in range(start, end):
        t0 = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            examples = next(batches)
            if flops_per_token is None:  # counted once, on the first micro-batch, by a no-grad forward
                flops_per_token = count_flops(trainee, examples, cfg, autocast, rank)
            with autocast:
                loss, n = trainee(examples)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            step_tokens += n
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if dist.is_initialized():  # report the mean over ranks
            t = torch.tensor([step_loss], device=device)
            dist.all_reduce(t)
            step_loss = t.item() / world
        losses.append(step_loss)
        dt = time.perf_counter() - t0
        if rank == 0:
            rec = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "tokens_per_s": step_tokens * world / dt, "tokens_per_s_per_device": step_tokens / dt, "step_s": dt,
                   "model_flops_per_token": flops_per_token,
                   "model_tflops_per_s_per_device": flops_per_token * step_tokens / dt / 1e12}
            if peak and flops_per_token:
                rec["mfu"] = flops_per_token * step_tokens / dt / peak
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if (step + 1) % cfg.log_every == 0 or step + 1 == end:
                elapsed = time.perf_counter() - t_start
                eta = elapsed / (step + 1 - start) * (cfg.steps - step - 1)
                print(f"step {step + 1}/{cfg.steps}  loss {step_loss:.4f}  lr {rec['lr']:.2e}  "
                      f"{rec['tokens_per_s']:.0f} tok/s" + (f"  MFU {rec['mfu']:.1%}" if "mfu" in rec else "") +
                      f"  eta {eta / 60:.1f} min", flush=True)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save_checkpoint(trainee, optimizer, scheduler, step + 1, cfg, rank)
    if metrics:
        metrics.close()
    if end == cfg.steps:
        export_final(trainee, cfg, rank)
    if dist.is_initialized():
        dist.destroy_process_group()
    return losses


def count_flops(trainee: Trainee, examples: list[Example], cfg: TrainConfig, autocast, rank: int) -> float:
    """Model FLOPs per sequence position (see flops.py); 0.0, with a warning, where they cannot be counted."""
    model = trainee.model
    frozen = model.experts if cfg.freeze_encoders else ()
    try:
        with autocast:
            return model_flops_per_token(trainee, examples, frozen)
    except Exception as e:  # MFU is a report, not a reason to stop training
        if rank == 0:
            print(f"warning: model FLOPs not counted, so no MFU: {e}", flush=True)
        return 0.0


def export_final(trainee: Trainee, cfg: TrainConfig, rank: int) -> None:
    """The trained weights in the sphinx-edge format (gathered to rank 0), at out_dir/model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from sphinx_edge.checkpoints.native import save_native

    state = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = model_of_state(trainee.model.config, {k.removeprefix("model."): v for k, v in state.items()})
        save_native(plain, Path(cfg.out_dir) / "model", tokenizer=cfg.tokenizer)
        print(f"saved {Path(cfg.out_dir) / 'model'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    train(TrainConfig.load(args[0], **parse_overrides(args[1:])))


def parse_overrides(items: list[str]) -> dict:
    """key=value pairs; values are JSON (numbers, true/false, lists) or else plain strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


if __name__ == "__main__":
    main()
