"""The training recipe: loss goes down, FSDP over two gloo processes, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sphinx_edge.train.recipe import TrainConfig, lr_factor, parse_overrides, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def write_dataset(root: Path, n: int = 12) -> Path:
    """A tiny colour-naming task in LLaVA format, images of several aspect ratios."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    sizes = [(64, 64), (96, 48), (40, 120)]
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % 3]
        w, h = sizes[i % len(sizes)]
        Image.new("RGB", (w, h), rgb).save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": name}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def write_recipe(tmp_path: Path, tokenizer_file: str, **extra) -> Path:
    data = write_dataset(tmp_path / "data")
    body = {
        "size": "test-tiny", "out_dir": str(tmp_path / "run"), "tokenizer": tokenizer_file, "steps": 8,
        "batch_size": 2, "max_len": 256, "lr": 3e-3, "warmup_steps": 2, "dtype": "fp32", "log_every": 1,
        "save_every": 3, "seed": 1, **extra,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    lines += ["[hardware]", 'gpus = "none (CPU test)"', "[[data]]", f"json = {json.dumps(str(data))}", "weight = 1.0"]
    (tmp_path / "recipe.toml").write_text("\n".join(lines) + "\n")
    return tmp_path / "recipe.toml"


def metrics(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_single_process_training_lowers_the_loss_and_exports(tmp_path, tokenizer_file, recwarn):
    losses = train(TrainConfig.load(write_recipe(tmp_path, tokenizer_file, steps=12, grad_accum=2, num_workers=0)))
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["model_flops_per_token"] > 0 and "mfu" not in records[0]  # no known peak on a CPU
    from sphinx_edge.checkpoints import load_model

    model = load_model(tmp_path / "run" / "model")  # the final weights, in our format
    assert model.config.name == "test-tiny"
    assert (tmp_path / "run" / "model" / "tokenizer.model").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_0000009", "step_0000012"]  # keeps the last two
    assert not [w for w in recwarn if "torch.distributed is disabled" in str(w.message)]  # quiet saves


def test_a_recipe_grows_its_init_in_depth(tmp_path, tokenizer_file):
    """llm_layers: the init's LLM grown (train/deepen.py), trained, saved and exported at the new depth;
    view_size likewise for its views."""
    from sphinx_edge.checkpoints import load_model
    from sphinx_edge.checkpoints.native import save_native
    from sphinx_edge.config import get_config
    from sphinx_edge.model.sphinx import build_model
    from sphinx_edge.train.recipe import export_latest

    save_native(build_model(get_config("test-tiny"), seed=5), tmp_path / "init", tokenizer=tokenizer_file)
    cfg = TrainConfig.load(write_recipe(tmp_path, tokenizer_file, steps=3, num_workers=0,
                                        init=str(tmp_path / "init"), llm_layers=4))
    train(cfg)
    assert load_model(tmp_path / "run" / "model").config.llm.n_layers == 4
    assert load_model(export_latest(cfg, tmp_path / "latest")).config.llm.n_layers == 4
    with pytest.raises(ValueError, match="multiple"):
        train(TrainConfig.load(tmp_path / "recipe.toml", llm_layers=3, out_dir=str(tmp_path / "bad")))

    finer = TrainConfig.load(tmp_path / "recipe.toml", view_size=96, out_dir=str(tmp_path / "finer"))
    train(finer)  # view_size: the init's views resized (train/resize_views.py), tiled and trained as such
    assert load_model(tmp_path / "finer" / "model").config.convnext.image_size == 96
    assert load_model(export_latest(finer, tmp_path / "finer-latest")).config.dinov2.image_size == 42


def torchrun(recipe: Path, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sphinx_edge.train.recipe", str(recipe), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_process_fsdp_resume_matches_uninterrupted_run(tmp_path, tokenizer_file):
    """Also: batches loaded by worker processes are the ones the training process would build."""
    recipe = write_recipe(tmp_path, tokenizer_file, steps=6, activation_checkpointing=True)
    torchrun(recipe, f"out_dir={tmp_path / 'straight'}", "num_workers=2")
    straight = metrics(tmp_path / "straight")
    assert len(straight) == 6 and straight[-1] < straight[0]
    first = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["model_flops_per_token"] > 0  # frozen encoders found under FSDP's wrapping

    torchrun(recipe, f"out_dir={tmp_path / 'resumed'}", "stop_after=3", "num_workers=0")
    assert len(metrics(tmp_path / "resumed")) == 3
    assert not (tmp_path / "resumed" / "model").exists()  # not finished: no final export
    torchrun(recipe, f"out_dir={tmp_path / 'resumed'}", "num_workers=1")
    resumed = metrics(tmp_path / "resumed")
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)
    assert (tmp_path / "resumed" / "model" / "model.safetensors").exists()


def test_schedule_and_overrides():
    cfg = TrainConfig(size="test-tiny", out_dir="x", data=[], tokenizer="t", steps=100, warmup_steps=10,
                      min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert parse_overrides(["steps=5", "dtype=bf16", "betas=[0.9,0.99]", "init=null"]) == {
        "steps": 5, "dtype": "bf16", "betas": [0.9, 0.99], "init": None}



@pytest.mark.parametrize("freeze", [False, True])
def test_optimizer_groups_give_the_experts_their_own_learning_rate(freeze):
    from sphinx_edge.train.recipe import make_optimizer, prepare_model

    cfg = TrainConfig(size="test-tiny", out_dir="x", data=[], tokenizer="t", lr=2e-3, encoder_lr_ratio=0.25,
                      weight_decay=0.1, freeze_encoders=freeze)
    model = prepare_model(cfg, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(trainable)  # every trainable parameter exactly once, nothing frozen
    for name, p in trainable.items():
        lr, decay = lr_of[id(p)]
        assert lr == pytest.approx(5e-4 if name.startswith(("convnext.", "dinov2.")) else 2e-3), name
        assert decay == (0.1 if p.ndim >= 2 and "embed" not in name else 0.0), name
    assert any(n.startswith("convnext.") for n in trainable) != freeze

def test_unknown_recipe_keys_are_refused(tmp_path, tokenizer_file):
    with pytest.raises(ValueError, match="unknown recipe keys \\['stepz'\\]"):
        TrainConfig.load(write_recipe(tmp_path, tokenizer_file), stepz=3)


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[2] / "recipes").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(recipe):
    from sphinx_edge.config import get_config

    cfg = TrainConfig.load(recipe)
    get_config(cfg.size)  # a known size
    assert cfg.data and cfg.steps > 0 and cfg.batch_size > 0
    if recipe.stem == "nano":  # starts from the experts `sphinx-edge warmup-encoders` writes, and trains them on
        assert cfg.init and cfg.init.endswith("runs/nano-encoders") and not cfg.freeze_encoders
        assert 0 < cfg.encoder_lr_ratio < 1 and len(cfg.data) == 2
    if recipe.stem == "nano2-v192":  # make nano's last stage: Nano 2 onto the registered Nano's views
        assert cfg.init.endswith("runs/nano2/model") and cfg.view_size == get_config("nano").convnext.image_size


def test_loss_per_conversation_weighs_each_conversation_once(tmp_path, tokenizer):
    """The batch's loss per conversation is the mean of each conversation's own mean (each computed
    alone, a batch of one); per token, the conversations weigh by their supervised tokens."""
    from sphinx_edge.config import get_config
    from sphinx_edge.model.sphinx import build_model
    from sphinx_edge.train.data import encode_example
    from sphinx_edge.train.recipe import batch_loss

    config = get_config("test-tiny")
    model = build_model(config, seed=0).eval()
    images = write_dataset(tmp_path, n=2).parent / "images"
    few = [("What colour is the square?", "red")]
    many = few + [("How many circles are there?", "three"), ("What is written in the image?", "The number is 42.")]
    examples = [encode_example(pairs, str(images / f"{i}.png"), tokenizer, config, max_len=256)
                for i, pairs in enumerate([few, many])]
    with torch.no_grad():
        alone = [batch_loss(model, [e], torch.device("cpu"), frozen=True)[0].item() for e in examples]
        per_conversation = batch_loss(model, examples, torch.device("cpu"), True, loss_per="conversation")[0].item()
        per_token = batch_loss(model, examples, torch.device("cpu"), True, loss_per="token")[0].item()
    tokens = [int((e.targets >= 0).sum()) for e in examples]
    assert tokens[1] > 2 * tokens[0]
    assert per_conversation == pytest.approx(sum(alone) / 2, rel=1e-5)
    assert per_token == pytest.approx((alone[0] * tokens[0] + alone[1] * tokens[1]) / sum(tokens), rel=1e-5)
    assert abs(per_conversation - per_token) > 1e-3  # the two weightings do differ on this batch


def test_an_unknown_loss_per_is_refused(tmp_path, tokenizer_file):
    with pytest.raises(ValueError, match="loss_per must be one of \\('token', 'conversation'\\), got 'image'"):
        TrainConfig.load(write_recipe(tmp_path, tokenizer_file), loss_per="image")


def test_a_data_worker_that_dies_is_reported_as_such_and_the_run_resumes(tmp_path, tokenizer_file, monkeypatch):
    import time

    from sphinx_edge.errors import UserError
    from sphinx_edge.train.data import Mixture

    batch = Mixture.batch
    latest = tmp_path / "run" / "checkpoints" / "latest"

    def saved_step() -> str | None:
        return latest.read_text().strip() if latest.exists() else None

    def dies_at_the_fifth(self, index):  # the worker is forked, so it runs this too
        if index == 4 and torch.utils.data.get_worker_info() is not None:
            # Die between batches, once step 3's checkpoint is saved: what the run resumes from is then
            # certain, and no batch is cut short in the pipe (a half-written one would hang torch's reader).
            deadline = time.monotonic() + 120  # a regression fails the test rather than hanging it
            while saved_step() != "step_0000003" and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(3)
        return batch(self, index)

    monkeypatch.setattr(Mixture, "batch", dies_at_the_fifth)
    cfg = TrainConfig.load(write_recipe(tmp_path, tokenizer_file, steps=6, num_workers=1))
    with pytest.raises(UserError, match=r"DataLoader worker .*exited unexpectedly.*out of memory\?\); the same "
                                        r"command resumes from the last checkpoint"):
        train(cfg)
    monkeypatch.setattr(Mixture, "batch", batch)
    assert saved_step() == "step_0000003"
    assert len(train(cfg)) == 3  # steps 4-6
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
