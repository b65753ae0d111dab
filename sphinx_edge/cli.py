"""`sphinx-edge`: the command line. Wiring only; heavy imports happen inside the commands.

Every command runs behind one error boundary (sphinx_edge.errors): an expected failure is one line
naming the file or argument, exit code 2; `sphinx-edge --debug COMMAND` shows the traceback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sphinx_edge import errors
from sphinx_edge.bundled import NANO_EXPORT, SAMPLES, bundled_weights, weight_sizes
from sphinx_edge.config import LAYOUTS, SIZES, get_config, parameter_counts
from sphinx_edge.export.options import Delegate, ExportError, ExportFormat, ExportOptions, Format, Quant, TableQuant

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def report_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


class Commands(typer.Typer):
    """A Typer whose every command runs behind the error boundary."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda fn: register(errors.guarded(fn, report_error))


# Options that several commands take, defined once.
CacheDir = Annotated[Optional[Path], typer.Option(
    help="Also keep encoded images here, across runs (a new question about a cached image skips the vision "
         "encoder); bounded by --cache-mb, least recently used go first.")]
CacheMb = Annotated[int, typer.Option(min=1, help="Size bound of --cache-dir in MiB.")]
Look = Literal["plain", "varied"]  # the synthetic data's looks (train/painters.py LOOKS)
MaxViews = Annotated[Optional[int], typer.Option(
    min=1, help="Encode at most N views per image, the global view included (1 = the global view alone; "
                "default: every view the layout needs). The tiles holding the least of the image go first; "
                "their place gets a skip token (sphinx-x). Fewer views than the image needs: a faster first answer, "
                "lower accuracy (benchmarks/RESULTS.md).")]
Pipelined = Annotated[bool, typer.Option(
    help="Encode the next view while the decoder prefills the last one. Pays where vision runs on another "
         "unit than the decoder (a GPU/NPU delegate); on CPU cores that both share it does not "
         "(benchmarks/RESULTS.md).")]


app = Commands(
    help="SPHINX-X multimodal LLMs on edge devices: inspect, load, convert and run models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = Commands(help="Training data: the synthetic VQA set and tokenizers.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(message: str) -> NoReturn:
    report_error(message)
    raise typer.Exit(errors.EXIT_USER_ERROR)


def _print_version(value: bool) -> None:
    if value:
        from sphinx_edge import __version__

        console.print(f"sphinx-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show the Python traceback instead of one line.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from sphinx_edge.processes import exit_on_signals

    errors.debug = debug or errors.DEBUG_FROM_ENV
    _quiet_libraries()
    exit_on_signals()  # SIGTERM / SIGHUP clean up (staging folders, stage processes) as Ctrl-C does


# Libraries that log on import what a user cannot act on: torchao, about its optional CUDA kernels
# ("Failed to load ..._C_cutlass_90a.abi3.so"); torch, about a deprecated registration torchao makes.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _quiet_libraries() -> None:
    import logging

    if not errors.debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def _billions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n:,}"


@app.command()
def info(
    size: Annotated[Optional[str], typer.Option(help=f"One size ({', '.join(SIZES)}); all sizes if omitted.")] = None,
) -> None:
    """Configuration and parameter counts of every size (computed, nothing is allocated)."""
    try:
        configs = [get_config(size)] if size else list(SIZES.values())
    except ValueError as e:
        fail(str(e))
    if size:
        _describe(configs[0])
    table = Table(title="SPHINX-X sizes (parameters)")
    parts = {"llm": "LLM", "clip": "CLIP", "convnext": "ConvNeXt", "dinov2": "DINOv2", "qformer": "Q-Former",
             "total": "total"}
    if not any(c.clip or c.qformer for c in configs):  # two-expert sizes only: no empty columns
        del parts["clip"], parts["qformer"]
    # One size: its backbone and layout are in the panel above, so the table keeps to the counts and
    # fits 80 columns even with four experts. Numbers never wrap; text columns shorten instead.
    text_columns = ("size",) if size else ("size", "LLM backbone", "layout")
    for col in (*text_columns[:2], *parts.values(), *text_columns[2:]):
        text = col in text_columns
        table.add_column(col, justify="left" if text else "right", no_wrap=not text or col == "size")
    for c in configs:
        n = parameter_counts(c)
        backbone = f"{c.llm.family} {c.llm.dim}x{c.llm.n_layers}" + (f" {c.llm.n_experts}E" if c.llm.n_experts else "")
        counts = [_billions(n[k]) if k in n else "-" for k in parts]
        table.add_row(*([c.name, *counts] if size else [c.name, backbone, *counts, c.layout]))
    console.print(table)


def _describe(c) -> None:
    llm, n = c.llm, parameter_counts(c)
    rows = {
        "model": c.paper_name,
        "LLM": f"{llm.family}: dim {llm.dim}, {llm.n_layers} layers, {llm.n_heads} heads ({llm.n_kv_heads} kv), "
        f"FFN {llm.ffn_dim}, vocab {llm.vocab_size}, rope theta {llm.rope_theta:g}, context {llm.max_seq_len}",
        "experts": f"{llm.n_experts}, top-{llm.n_experts_per_tok}" if llm.n_experts else "dense",
        "ConvNeXt": f"depths {c.convnext.depths}, dims {c.convnext.dims}, {c.convnext.image_size} px views"
        + (f" read as {c.convnext.input_size} px" if c.convnext.input_size else "")
        + (f", tokens repeated {c.convnext.token_upsample}x{c.convnext.token_upsample}"
           if c.convnext.token_upsample > 1 else ""),
        "DINOv2": f"dim {c.dinov2.embed_dim}, depth {c.dinov2.depth}, {c.dinov2.n_heads} heads, "
        f"patch {c.dinov2.patch_size}, FFN {c.dinov2.ffn} {c.dinov2.ffn_hidden}, {c.dinov2.image_size} px views",
    }
    if c.clip is not None:
        rows["CLIP"] = (f"ViT width {c.clip.width}, {c.clip.layers} layers, {c.clip.heads} heads, patch "
                        f"{c.clip.patch_size}, {'QuickGELU' if c.clip.quick_gelu else 'GELU'}, the DINOv2 views")
    if c.qformer is not None:
        q = c.qformer
        rows["Q-Former"] = (f"vision dim {q.vision_dim}, {q.vision_layers} layers; Q-Former dim {q.qformer_dim}, "
                            f"{q.qformer_layers} layers, {q.n_queries} queries, the DINOv2 views")
    rows["projector"] = (f"Linear({c.vision_dim}, {llm.dim}) + LayerNorm"
                         + (f", Q-Former Linear({c.qformer.qformer_dim}, {llm.dim}) + LayerNorm" if c.qformer else "")
                         + f", {_billions(n['projector'])} params with start/end"
                         + ("/skip" if c.layout == "sphinx-x" else ""))
    rows["image tokens"] = (f"{c.tokens_per_view} per view, {c.max_image_tokens} with every tile "
                            f"({c.layout}, grid {c.grid}, {c.views_per_image} view{'s' if c.views_per_image > 1 else ''})")
    table = Table(title=f"{c.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, v)
    console.print(table)


@app.command()
def tiles(
    images: Annotated[list[Path], typer.Argument(help="Image files to plan (any format pillow reads).")],
    size: Annotated[str, typer.Option(help="Size whose view sizes and layout to use.")] = "tiny",
    checkpoint: Annotated[Optional[Path], typer.Option(help="A model instead of --size: an export or checkpoint "
                                                       "directory (its view sizes and layout, e.g. a 1k model's).")] = None,
    layout: Annotated[Optional[str], typer.Option(help=f"Override the layout: {' or '.join(LAYOUTS)}.")] = None,
    max_views: MaxViews = None,
) -> None:
    """How each image is tiled: encoded views, skipped tiles and image tokens (torch-free for sizes and
    exports). The size comes from each file's header (nothing is decoded); a file that cannot be read
    gets a row saying why, and the exit code is 2 if any could not."""
    from sphinx_edge.layout import ImageLoadError, image_size, plan_tiles

    cfg = _config_of(checkpoint) if checkpoint else get_config(size)
    size = cfg.name
    layout = layout or cfg.layout
    if layout not in LAYOUTS:
        fail(f"--layout: unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    table = Table(title=f"tiling for {size} ({layout}, grid {cfg.grid})")
    for col in ("image", "size", "encoded tiles", "skipped", "views", "image tokens", "vs all tiles"):
        table.add_column(col)
    full = cfg.max_image_tokens
    unreadable = []
    for path in images:
        try:
            w, h = image_size(path)
        except ImageLoadError as e:
            unreadable.append(str(e))
            table.add_row(escape(path.name), "-", "[red]unreadable[/] (below)", "-", "-", "-", "-")
            continue
        plan = plan_tiles(w, h, layout=layout, grid=cfg.grid, tile_size=cfg.convnext.image_size,
                          dino_size=cfg.dinov2.image_size, max_views=max_views)
        marks = "".join("#" if e else "." for e in plan.encoded)
        n = plan.n_image_tokens(cfg.tokens_per_view)
        table.add_row(escape(path.name), f"{w}x{h}", marks, str(plan.n_skipped), str(plan.n_views), str(n),
                      f"{(n - full) / full:+.0%}")
    console.print(table)
    for message in unreadable:
        report_error(message)
    if unreadable:
        raise typer.Exit(errors.EXIT_USER_ERROR)


def _config_of(model_dir: Path):
    """The configuration of an export (its manifest) or of a checkpoint directory (read from its files)."""
    from sphinx_edge.config import SphinxConfig
    from sphinx_edge.runtime.manifest import MANIFEST, read_manifest

    if (model_dir / MANIFEST).is_file():
        return SphinxConfig.from_dict(read_manifest(model_dir)["model"]["config"])
    return _load(model_dir, None, dtype="bfloat16").config  # half the memory: only the configuration is used


def _load(checkpoint: Optional[Path], size: Optional[str], dtype: str = "float32"):
    from sphinx_edge.checkpoints import CheckpointError, load_model

    if checkpoint is None:
        fail("give --checkpoint DIR (a sphinx-edge or LLaMA2-Accessory directory)")
    try:
        return load_model(checkpoint, size, dtype=dtype)
    except CheckpointError as e:
        fail(str(e))


def _model_and_tokenizer(checkpoint: Optional[Path], size: Optional[str]):
    """The model of --checkpoint (or the bundled weights of --size) and its tokenizer."""
    from sphinx_edge.checkpoints import tokenizer_path
    from sphinx_edge.tokenizer import Tokenizer

    if checkpoint is None and size and bundled_weights(size):
        checkpoint = bundled_weights(size)
    elif checkpoint is None and size:
        fail(f"no weights ship for size {size!r} (bundled: {', '.join(weight_sizes()) or 'none'}); "
             "give --checkpoint DIR")
    model = _load(checkpoint, size)
    return model, Tokenizer(tokenizer_path(checkpoint) or fail(f"{checkpoint} has no tokenizer.model"))


@app.command()
def chat(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="[EXPORT_DIR] [QUESTION]",
        help="An export directory (run with the torch-free runtime; default: the bundled SPHINX-Nano int4 "
             "export) and/or the question; with no question, chat turn by turn (an empty line ends).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image to talk about.")] = None,
    size: Annotated[Optional[str], typer.Option(help="PyTorch path: size; with no --checkpoint, its bundled weights (nano).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="PyTorch path: model directory (sphinx-edge or LLaMA2-Accessory).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="The export's graphs to run: onnx (torch-free) or pte "
                                        "(ExecuTorch).")] = Format.ONNX,
    threads: Annotated[Optional[int], typer.Option(min=1, help="With EXPORT_DIR: CPU threads.")] = None,
    cache_dir: CacheDir = None,
    cache_mb: CacheMb = 512,
    max_views: MaxViews = None,
    pipelined: Pipelined = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: int = 0,
) -> None:
    """Ask about an image, streaming the answer: through exported graphs (EXPORT_DIR, else the bundled
    SPHINX-Nano export; the KV cache kept between turns), or with --size / --checkpoint through the
    PyTorch model (needs the \\[export] or \\[train] extra). With no
    QUESTION, questions are read line by line from the terminal or a pipe until an empty line or the
    end of input; when the conversation outgrows the context, its oldest turns are dropped."""
    export_dir, question = _export_and_question(args)
    if export_dir is None and checkpoint is None and size is None:
        export_dir = NANO_EXPORT  # torch-free: what a runtime-only install can run
    stream = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                  on_text=lambda t: console.print(t, end="", markup=False, highlight=False))

    def dropped_note(n: int, context: int) -> None:
        if n:
            console.print(f"[yellow]the conversation no longer fit the {context}-token context: dropped its "
                          f"{'oldest turn' if n == 1 else f'{n} oldest turns'} (the image stays)[/]")

    if export_dir is not None:
        from sphinx_edge.runtime.pipeline import Chat, Pipeline

        conversation = Chat(Pipeline(export_dir, fmt, threads=threads, cache_dir=cache_dir, cache_bytes=cache_mb * 2**20,
                                     max_views=max_views, pipelined=pipelined), image)

        def ask(q: str) -> None:
            start = time.perf_counter()
            out = conversation.ask(q, **stream)
            console.print()
            dropped_note(out.dropped_turns, conversation.pipeline.backend.max_seq_len)
            console.print(f"[dim]{out.prompt_len} tokens in context ({out.image_tokens} image), {out.prefilled} "
                          f"prefilled, {len(out.token_ids)} generated, stop: {out.stop_reason}, "
                          f"{time.perf_counter() - start:.2f} s[/]")
    else:
        from sphinx_edge.generate import TorchChat

        conversation = TorchChat(*_model_and_tokenizer(checkpoint, size), image)

        def ask(q: str) -> None:
            start = time.perf_counter()
            out, dropped = conversation.ask(q, **stream)
            console.print()
            dropped_note(dropped, conversation.model.config.llm.max_seq_len)
            console.print(f"[dim]{out.prompt_len} prompt tokens ({out.image_tokens} image), {len(out.token_ids)} "
                          f"generated, stop: {out.stop_reason}, {time.perf_counter() - start:.1f} s[/]")

    if question is not None:
        ask(question)
        return
    from sphinx_edge.prompt import ContextOverflowError

    for q in _questions():
        try:
            ask(q)
        except ContextOverflowError as e:  # too long for the context even alone: the chat goes on
            report_error(str(e))


def _export_and_question(args: Optional[list[str]]) -> tuple[Optional[Path], Optional[str]]:
    """`[EXPORT_DIR] [QUESTION]`: of two arguments the first is the export; a lone one is the export when
    it names a directory, else the question."""
    from sphinx_edge.prompt import check_text

    args = list(args or [])
    if len(args) > 2:
        fail(f"expected an export directory and one question, got {len(args)} arguments "
             f"({', '.join(map(repr, args))}): quote the question")
    export_dir = Path(args.pop(0)) if len(args) == 2 or (args and Path(args[0]).is_dir()) else None
    return export_dir, (check_text(args[0], "the question") if args else None)


def _questions():
    """Questions typed or piped in, one per line, until an empty line or the end of input. A line
    that is not valid UTF-8 is refused and the chat goes on."""
    import sys

    from sphinx_edge.prompt import check_text

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes: a message, not a crash
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            console.print("you> ", end="")
        line = sys.stdin.readline()
        if not line.strip():
            return
        try:
            yield check_text(line.rstrip("\r\n"), "that line")
        except ValueError as e:
            report_error(str(e))


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="A recipe file (recipes/*.toml).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings that override the recipe.")] = None,
    export: Annotated[Optional[Path], typer.Option(help="Do not train: write the latest checkpoint here as a model.")] = None,
) -> None:
    """Train with a recipe in this process. For several GPUs: torchrun -m sphinx_edge.train.recipe RECIPE."""
    from sphinx_edge.train.recipe import TrainConfig, export_latest, model_config, parse_overrides, train as run

    try:
        cfg = TrainConfig.load(recipe, **parse_overrides(overrides or []))
        model_config(cfg)  # its init readable, llm_layers and view_size possible, before any work
    except (OSError, ValueError, TypeError) as e:
        fail(f"{recipe}: {e}")
    if export is not None:
        try:
            console.print(f"wrote {export_latest(cfg, export)}")
        except FileNotFoundError as e:
            fail(str(e))
        return
    run(cfg)


def _check_warmup_start(tokenizer: Path | None, init: Path | None, size: str) -> None:
    """The warm-ups' --tokenizer and --init, checked before minutes of work: a file, and a readable
    checkpoint of --size."""
    if tokenizer is not None and not tokenizer.is_file():
        fail(f"tokenizer {tokenizer} does not exist")
    if init is not None:
        from sphinx_edge.checkpoints import CheckpointError, checkpoint_config

        try:
            checkpoint_config(init, size)
        except CheckpointError as e:
            fail(f"--init {init} is not a model directory of size {size}: {e}")


@app.command("warmup-encoders")
def warmup_encoders_cmd(
    data: Annotated[list[Path], typer.Argument(help="LLaVA conversation JSON files with short answers.")],
    out: Annotated[Path, typer.Option(help="Model directory to write (start the recipe from it with init=...).")],
    size: Annotated[str, typer.Option(help="Model size whose experts are warmed up.")] = "nano",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 2500,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and of the fresh LLM weights.")] = 0,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer to copy into the model directory.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Held-out JSON: print the warm-up classifier's exact match on it.")] = None,
    views: Annotated[Literal["global", "all"], typer.Option(
        help="What the experts see: the global view only, or every encoded view as the LLM gets them (global + "
             "tiles; about 3.7x the time and memory on synthetic data).")] = "global",
    init: Annotated[Optional[Path], typer.Option(help="Model directory whose experts to warm up further (a "
                                                 "previous warm-up's --out); default: fresh weights.")] = None,
    sample_per: Annotated[Literal["question", "image"], typer.Option(
        help="Draw batches per question (each question once an epoch) or per image (every image equally "
             "often, one of its questions: domains that ask many questions per image no longer dominate).")] = "question",
    view_size: Annotated[Optional[int], typer.Option(min=32, help="View side in pixels, a multiple of 32 (one token "
                                                     "per 32 px); default: --size's (or --init's). make nano warms "
                                                     "Nano 1 up on 128 px views.")] = None,
) -> None:
    """Supervised warm-up of the two visual experts on question answering, standing in for the
    pretrained CLIP / DINOv2 that real SPHINX starts from (models trained from scratch: Nano)."""
    from sphinx_edge.train.encoder_warmup import main as warmup

    for path in [*data, *([eval_data] if eval_data else [])]:
        if not path.is_file():
            fail(f"{path} does not exist")
    _check_warmup_start(tokenizer, init, size)
    try:
        warmup([str(p) for p in data], str(out), size=size, steps=steps, batch_size=batch_size, lr=lr,
               limit=limit, seed=seed, tokenizer=str(tokenizer) if tokenizer else None,
               eval_json=str(eval_data) if eval_data else None, views=views, init=str(init) if init else None,
               sample_per=sample_per, view_size=view_size)
    except ValueError as e:  # DataError (unreadable data or images), an unknown size or a bad --view-size
        fail(str(e))


@app.command("warmup-reading")
def warmup_reading_cmd(
    out: Annotated[Path, typer.Option(help="Model directory to write (start the recipe from it with init=...).")],
    init: Annotated[Optional[Path], typer.Option(help="Model directory whose experts learn to read (and whose "
                                                 "LLM and projector are kept); default: fresh weights.")] = None,
    size: Annotated[str, typer.Option(help="Model size whose experts are warmed up.")] = "nano",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1200,
    canvases: Annotated[int, typer.Option(min=1, help="Text canvases per step (each gives every view).")] = 24,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the canvases, the head and fresh weights.")] = 0,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer to copy into the model directory.")] = None,
) -> None:
    """Teach the two visual experts to read: on generated canvases of text, cut into the views the LLM
    gets, each token names the characters under it (sphinx_edge/train/reading_warmup.py)."""
    from sphinx_edge.train.reading_warmup import main as warmup

    _check_warmup_start(tokenizer, init, size)
    try:
        warmup(str(out), init=str(init) if init else None, size=size, steps=steps, canvases=canvases, lr=lr,
               seed=seed, tokenizer=str(tokenizer) if tokenizer else None)
    except ValueError as e:  # an unknown size
        fail(str(e))


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="Output directory (created; refused if it holds another export).")],
    size: Annotated[Optional[str], typer.Option(help=f"Model size: {', '.join(SIZES)}. With --checkpoint "
                                                "optional: the checkpoint says what it holds (given, a check).")] = None,
    quant: Annotated[Quant, typer.Option(help="The LLM's linears: fp16 for onnx only.")] = Quant.INT4,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="The graphs to write.")] = ExportFormat.ONNX,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Model directory; default: the bundled weights of --size.")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights of the real shape: for latency "
                                              "and memory work only (answers are noise).")] = False,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.model (default: the checkpoint's; with "
                                                      "--random-init a small stand-in is trained).")] = None,
    group_size: Annotated[int, typer.Option(min=1, help="int4 block (onnx) / group (pte) size: a power of two, "
                                            "at least 16.")] = 32,
    vision_quant: Annotated[Optional[Quant], typer.Option(help="Vision encoder: int8 at most (default: int8 when "
                                                          "--quant is int8/int4, else --quant). fp16 (onnx) is "
                                                          "for targets with fp16 arithmetic (GPU/NPU, Arm FP16, "
                                                          "Apple); x86 CPUs run it slower than fp32.")] = None,
    embedding_quant: Annotated[TableQuant, typer.Option(help="Token embedding table.")] = TableQuant.FP32,
    verify: Annotated[bool, typer.Option(help="Check the graphs against the PyTorch model after exporting.")] = True,
    eval_samples: Annotated[int, typer.Option("--eval", min=0, help="Also score N held-out synthetic questions "
                                              "(torch vs export; meaningful for nano).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export in --out.")] = False,
    max_seq_len: Annotated[Optional[int], typer.Option(min=1, help="The export's context in tokens (the .pte's "
                                                       "static KV cache has this many slots, its memory). "
                                                       "Default: the longest image "
                                                       "plus 512, as a power of two, at most the model's.")] = None,
    delegate: Annotated[Delegate, typer.Option(help="The pte's ExecuTorch delegate: xnnpack (CPU, any device) or "
                                              "coreml (the vision encoder on Apple's Core ML, compiled on the device; "
                                              "the decoder on XNNPACK). Core ML exports cannot be run or verified "
                                              "off Apple devices.")] = Delegate.XNNPACK,
) -> None:
    """Export a SPHINX model to ONNX and/or ExecuTorch graphs with a dynamic tile count, quantized.

    Writes the component graphs, tokenizer.model and manifest.json (config, file hashes, graph IO,
    tool versions, verification figures) into --out, atomically: an interrupted export leaves no
    finished-looking directory. Example: sphinx-edge export --size tiny --quant int4 --random-init --format both --out exports/tiny-int4
    """
    import tempfile

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if size is not None and size not in SIZES:
        fail(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    try:
        options = ExportOptions(quant=quant, formats=fmt.formats, vision_quant=vision_quant,
                                embedding_quant=embedding_quant, group_size=group_size, verify=verify,
                                eval_samples=eval_samples, delegate=delegate, max_seq_len=max_seq_len)
    except ExportError as e:
        fail(str(e))
    from sphinx_edge.export.exporter import export_model
    from sphinx_edge.export.source import choose_source, memory_warning
    from sphinx_edge.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        source, tok_file = choose_source(size, checkpoint, random_init, tokenizer, Path(tmp))
        config = source.config
        if warning := memory_warning(config):
            console.print(f"[yellow]warning:[/] {warning}")
        tok = Tokenizer(tok_file)
        if tok.vocab_size > config.llm.vocab_size:
            fail(f"the tokenizer has {tok.vocab_size} pieces but {config.name!r} embeds only {config.llm.vocab_size}")
        started = time.perf_counter()
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("starting", total=None)
            # A source, not a model: each stage loads the weights in a process of its own, so
            # that large sizes never hold two copies.
            manifest = export_model(source, tok, out, options, overwrite=overwrite,
                                    on_stage=lambda s: bar.update(task, description=s))
    _print_export_summary(out, manifest, time.perf_counter() - started)


def _print_export_summary(out: Path, manifest: dict, seconds: float) -> None:
    table = Table(title=f"{manifest['model']['name']} -> {out} ({manifest['quantization']['quant']}, {seconds:.0f} s)")
    table.add_column("file")
    table.add_column("MB", justify="right")
    for name, entry in manifest["files"].items():
        table.add_row(name, f"{entry['bytes'] / 1e6:.2f}")
    console.print(table)
    if stages := manifest.get("export_stages"):
        timing = Table(title="stages (peak: the export's processes together)")
        for col, side in (("stage", "left"), ("s", "right"), ("peak MiB", "right")):
            timing.add_column(col, justify=side)
        for st in stages:
            timing.add_row(st["name"], f"{st['seconds']:.1f}",
                           "-" if st["peak_rss_mib"] is None else f"{st['peak_rss_mib']:,.0f}")
        console.print(timing)
    ver = manifest.get("verification")
    if not ver:
        console.print("[dim]verification skipped (--no-verify)[/]")
        return
    checks = Table(title="verification against the PyTorch fp32 model")
    for col in ("graphs", "max |logit diff| (prefill)", "top-1 agreement", "image cosine", "result"):
        checks.add_column(col)
    for fmt in ("onnx", "pte"):
        if fmt in ver and "skipped" in ver[fmt]:
            checks.add_row(fmt, "-", "-", "-", "not run")
            console.print(f"[yellow]{fmt}:[/] {ver[fmt]['skipped']}")
        elif fmt in ver:
            v = ver[fmt]
            result = {True: "[green]pass[/]", False: "[red]FAIL[/]"}.get(v.get("passed"), "reported")
            checks.add_row(fmt, f"{v['prefill_max_abs_logit_diff']:.2e}", f"{v['top1_agreement']:.1%} of {v['steps']}",
                           f"{v['image_embeds_cosine']:.5f}" if "image_embeds_cosine" in v else "-", result)
    console.print(checks)
    if "accuracy" in ver:
        acc = ver["accuracy"]
        console.print("exact match on " + str(acc["n"]) + " held-out questions: " +
                      ", ".join(f"{k} {v:.1%}" for k, v in acc.items() if k != "n"))


@app.command()
def run(
    args: Annotated[list[str], typer.Argument(
        metavar="[EXPORT_DIR] QUESTION",
        help="A directory written by `sphinx-edge export` (default: the bundled SPHINX-Nano int4 ONNX export) "
             "and the question.")],
    image: Annotated[Optional[Path], typer.Option(help="Image to ask about.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="The export's graphs to run: onnx (torch-free) or pte "
                                        "(ExecuTorch).")] = Format.ONNX,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: the runtime's).")] = None,
    cache_dir: CacheDir = None,
    cache_mb: CacheMb = 512,
    max_views: MaxViews = None,
    pipelined: Pipelined = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
) -> None:
    """Answer one question with an exported model (no PyTorch for onnx graphs), with stage timings.
    Example, right after `pip install sphinx-edge`: sphinx-edge run --image photo.png "What is in the picture?"
    """
    from sphinx_edge.runtime.pipeline import Pipeline

    export_dir, question = _export_and_question(args)
    if question is None:
        fail("give the question (quote it): sphinx-edge run [EXPORT_DIR] QUESTION")
    pipeline = Pipeline(export_dir or NANO_EXPORT, fmt, threads=threads, cache_dir=cache_dir,
                        cache_bytes=cache_mb * 2**20, max_views=max_views, pipelined=pipelined)
    answer = pipeline.answer(question, image, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, on_text=lambda t: console.print(t, end="", markup=False, highlight=False))
    console.print()
    t = answer.timings
    parts = ["image from the cache"] if t.get("image_cached") else []
    parts += [f"{k} {t[k] * 1000:.0f} ms" for k in ("preprocess", "vision", "prefill", "ttft", "decode") if k in t]
    console.print(f"[dim]{answer.prompt_len} prompt tokens ({answer.image_tokens} image), {len(answer.token_ids)} "
                  f"generated, stop: {answer.stop_reason}; " + ", ".join(parts) + "[/]")


@app.command()
def request(
    export_dir: Annotated[Path, typer.Argument(help="A directory written by `sphinx-edge export` (its manifest and "
                                               "tokenizer are used; the graphs are not loaded).")],
    question: Annotated[str, typer.Argument(help="The question.")],
    out: Annotated[Path, typer.Option(help="The request file to write (replaced atomically).")],
    image: Annotated[Optional[Path], typer.Option(help="Image to ask about.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation budget (the runner's "
                                                "--max-new-tokens overrides it).")] = 128,
) -> None:
    """Write a request file for the C++ runner (runtime/cpp): the whole input sequence (token ids,
    the packed image views as float32), the stop rules and the tokenizer's pieces, so a device
    needs neither Python, an image library nor SentencePiece.

    Then: sphinx_runner EXPORT_DIR/program.pte REQUEST.bin (runtime/cpp/README.md: build, format, adb).
    """
    from sphinx_edge.prompt import check_text
    from sphinx_edge.runtime.request import write_request

    check_text(question, "the question")
    info = write_request(export_dir, image, question, out, max_new_tokens=max_new_tokens)
    console.print(f"wrote {out}: {info['sequence_length']} positions, {info['views']} views, "
                  f"{info['skipped_tiles']} skip tokens, {info['bytes'] / 1e6:.2f} MB")


@app.command()
def web(
    export_dir: Annotated[Optional[Path], typer.Argument(help="An ONNX export (`sphinx-edge export --format onnx`); "
                                                       "default: the bundled SPHINX-Nano int4 export.")] = None,
    out: Annotated[Path, typer.Option(help="The site folder to write (created, or refreshed in place).")] = Path("out/web"),
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the site until Ctrl-C.")] = False,
    host: Annotated[str, typer.Option(help="Address for --serve.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port for --serve (0: any free port).")] = 8000,
) -> None:
    """Build the browser demo for an ONNX export: runtime/web's page (onnxruntime-web, wasm), the graphs,
    tokenizer.json and config.json in one static folder; --serve serves it on localhost (wasm MIME type and
    the cross-origin isolation headers that wasm threads need). Run runtime/web/install-deps.sh once first."""
    from sphinx_edge.runtime.manifest import ManifestError
    from sphinx_edge.runtime.web_bundle import WebBundleError, build_site, make_server

    try:
        site = build_site(export_dir or NANO_EXPORT, out)
        server = make_server(site, host, port, verbose=True) if serve else None
    except (ManifestError, WebBundleError, OSError) as e:
        fail(str(e))
    console.print(f"wrote the demo site to {site}")
    if server is None:
        console.print(f"serve it with: sphinx-edge web {export_dir} --out {out} --serve")
        return
    address, bound_port = server.server_address[:2]
    console.print(f"serving on http://{address}:{bound_port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def bench(
    export_dirs: Annotated[list[Path], typer.Argument(help="Export directories (`sphinx-edge export`), e.g. one per "
                                                      "quantization; each is benchmarked in every --format it has.")],
    fmt: Annotated[list[str], typer.Option("--format", help="torch (the PyTorch model the export came from, fp32), onnx, pte; "
                                               "repeat the option for several.")] = ["torch", "onnx", "pte"],
    image: Annotated[Optional[list[Path]], typer.Option(help="Images to ask about (default: the bundled square, "
                                                        "2:1 and 1:3 samples); repeat for several.")] = None,
    skip_tokens: Annotated[str, typer.Option(help="on: the model's layout (skip tokens for padded tiles); off: every "
                                             "tile encoded (sphinx-1k); both: each image both ways.")] = "both",
    max_views: Annotated[Optional[list[int]], typer.Option(
        min=1, help="View budgets to run each image with (see `run --help`); repeat for several, e.g. "
                    "--max-views 1 --max-views 3 (default: every view the layout needs).")] = None,
    pipelined: Pipelined = False,
    question: Annotated[str, typer.Option(help="The question asked about each image.")] = "What is in the image?",
    decode_tokens: Annotated[int, typer.Option(min=0, help="Greedy tokens decoded per answer (EOS ignored).")] = 32,
    pp: Annotated[int, typer.Option(min=0, help="LLM alone: prompt tokens prefilled (llama-bench ppN; clipped to "
                                    "the context; 0 skips the LLM-alone rows).")] = 512,
    tg: Annotated[int, typer.Option(min=0, help="LLM alone: tokens generated (llama-bench tgN).")] = 128,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before the timed ones.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=1, help="Timed runs; stage tables show medians "
                                         "and (min–max), the LLM-alone figures mean ± stddev.")] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads for every runtime "
                                                   "in the run, peers included (default: the physical cores).")] = None,
    llm_only: Annotated[bool, typer.Option("--llm-only", help="Only the LLM-alone pp / tg figures: no image "
                                           "stages.")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="What to print: md (tables), json (the whole "
                                        "result), jsonl or csv (one record per LLM-alone test, llama-bench's "
                                        "fields).")] = "md",
    target: Annotated[str, typer.Option(help="local (this machine), android (adb + the C++ runner) or apple "
                                        "(run on a Mac with Apple silicon).")] = "local",
    bandwidth: Annotated[bool, typer.Option(help="Measure memory bandwidth, to express decode speed as a "
                                            "fraction of the bandwidth bound.")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the whole result here (JSON).")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Draw time to first token by stage here (PNG; needs "
                                                "matplotlib: pip install 'sphinx-edge\\[bench]').")] = None,
    peer: Annotated[list[str], typer.Option(help="Also time a peer runtime on the exports' LLM shape (random "
                                            "weights, pp/tg as above): llama.cpp-Q4_0, llama.cpp-Q8_0, "
                                            "ort-genai-int4; repeat for several. Needs pip install "
                                            "'sphinx-edge\\[peers]'.")] = [],
    peers_dir: Annotated[Optional[Path], typer.Option(help="Where the peers' models are written and cached "
                                                      "(default: ~/.cache/sphinx-edge/peers).")] = None,
    runner_dir: Annotated[Optional[Path], typer.Option(help="--target android: the folder holding sphinx_runner built "
                                                       "with the Android NDK and its .so files (runtime/cpp/README.md; "
                                                       "default: build/cpp-android).")] = None,
) -> None:
    """Time every stage (image decode + tiling, vision per view, prefill, time to first token, decode,
    end to end), peak RSS (per stage) and artifact sizes over exports x formats x images x skip tokens
    on/off x view budgets;
    print markdown tables, optionally save JSON and a PNG chart. Every runtime in a run, peers
    included, gets the same --threads; the count is in every row.

    Example: sphinx-edge bench exports/nano-int4 exports/nano-int8 --json bench.json --png bench.png

    LLM alone, as llama-bench: sphinx-edge bench exports/tiny-int4 --llm-only -t 2 -r 5 --peer llama.cpp-Q4_0
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from sphinx_edge.benchmarks.bench import SKIP_TOKENS, BenchSpec
    from sphinx_edge.benchmarks.report import OUTPUT_FORMATS, render, save_chart, save_json
    from sphinx_edge.benchmarks.targets import get_target
    from sphinx_edge.runtime.manifest import read_manifest

    if output not in OUTPUT_FORMATS:
        fail(f"--output: unknown format {output!r}; choose {', '.join(OUTPUT_FORMATS)}")
    if skip_tokens not in SKIP_TOKENS:
        fail(f"--skip-tokens is {', '.join(SKIP_TOKENS)}, not {skip_tokens!r}")
    spec = BenchSpec(export_dirs=export_dirs, backends=list(fmt), layouts=SKIP_TOKENS[skip_tokens],
                     view_budgets=list(max_views) if max_views else [None], pipelined=pipelined, prompt=question,
                     images=image or [SAMPLES / n for n in ("square.png", "wide_2x1.png", "tall_1x3.png")],
                     decode_tokens=decode_tokens, pp=pp, tg=tg, warmup=warmup, repeats=repeats, threads=threads,
                     llm_only=llm_only, bandwidth=bandwidth, peers=list(peer), peers_dir=peers_dir, target=target,
                     runner_dir=runner_dir)
    where = get_target(target)
    where.check(spec)
    n_cases = where.count_cases(spec, [read_manifest(d) for d in export_dirs])
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=n_cases + len(peer) + 2 * bandwidth)  # bandwidth: before and after
        started = [False]

        def on_case(name: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=name)

        result = where.run(spec, on_case)
    console.print(render(result, output), markup=False, highlight=False, soft_wrap=True)
    if json_out:
        save_json(result, json_out)
        console.print(f"wrote {json_out}")
    if png:
        try:
            save_chart(result, png)
        except RuntimeError as e:
            fail(str(e))
        console.print(f"wrote {png}")


@app.command()
def profile(
    export_dir: Annotated[Path, typer.Argument(help="An export directory (`sphinx-edge export`).")],
    fmt: Annotated[Format, typer.Option("--format", help="onnx (onnxruntime's profiler) or pte (ExecuTorch's "
                                        "ETDump).")] = Format.ONNX,
    pp: Annotated[int, typer.Option(min=1, help="Prompt tokens prefilled once.")] = 512,
    tg: Annotated[int, typer.Option(min=1, help="Tokens decoded one at a time after the prompt.")] = 64,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: the "
                                                   "runtime's own choice, one per physical core).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result here (JSON).")] = None,
) -> None:
    """Where the LLM's time goes: one prefill and --tg decode steps under the runtime's own profiler,
    as a table of operators with their time per prefill and per decoded token and their share.

    Example: sphinx-edge profile exports/tiny-int4 --format pte -t 2
    """
    from sphinx_edge.benchmarks.profile import markdown, profile_llm
    from sphinx_edge.benchmarks.report import save_json
    from sphinx_edge.runtime.manifest import ManifestError, read_manifest

    try:
        if fmt not in read_manifest(export_dir)["graphs"]:
            fail(f"{export_dir} has no {fmt} graphs")
    except ManifestError as e:
        fail(str(e))
    with console.status(f"profiling {fmt}: prefill {pp} tokens, decode {tg}"):
        result = profile_llm(export_dir, fmt, pp=pp, tg=tg, threads=threads)
    console.print(markdown(result), markup=False, highlight=False, soft_wrap=True)
    if json_out:
        save_json(result, json_out)
        console.print(f"wrote {json_out}")


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Option(help="LLaVA JSON with reference answers (e.g. data/nano/test.json).")],
    size: Annotated[Optional[str], typer.Option(help="Size; with no --checkpoint, its bundled weights.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Model directory.")] = None,
    export_dir: Annotated[Optional[Path], typer.Option("--export", help="Evaluate this export instead of a PyTorch "
                                                       "model (its --format graphs).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="With --export: the graphs to run.")] = Format.ONNX,
    max_views: MaxViews = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N samples only.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the scores (and every wrong answer) as JSON here.")] = None,
    mistakes: Annotated[int, typer.Option(min=0, help="Also list the first N wrong answers.")] = 0,
) -> None:
    """Exact-match accuracy on held-out questions (greedy answers), per domain and aspect ratio, of a
    PyTorch model or of an export."""
    import json

    from rich.progress import Progress

    from sphinx_edge.train.synthetic import evaluate as score

    if export_dir is not None:
        if size or checkpoint:
            fail("--export evaluates an export, --size/--checkpoint a PyTorch model: give one of them")
        from sphinx_edge.runtime.pipeline import Pipeline

        pipeline = Pipeline(export_dir, fmt, max_views=max_views)

        def predict(image: Path, question: str) -> str:
            return pipeline.answer(question, image, max_new_tokens=16).text
    else:
        from sphinx_edge.generate import generate

        model, tok = _model_and_tokenizer(checkpoint, size)

        def predict(image: Path, question: str) -> str:
            return generate(model, tok, question, image, max_new_tokens=16, max_views=max_views).text
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        result = score(predict, data, limit=limit, progress=lambda i, n: bar.update(task, completed=i, total=n))
    result["max_views"] = max_views
    table = Table(title=f"exact match on {data.name} ({result['n']} questions)")
    table.add_column("slice")
    table.add_column("accuracy", justify="right")
    table.add_row("all", f"{result['accuracy']:.1%}")
    if result.get("padded_tiles") is not None:
        table.add_row(f"images with padded tiles ({result['n_padded']})", f"{result['padded_tiles']:.1%}")
    for k, v in {**result["per_domain"], **{f"aspect {a}": x for a, x in result["per_aspect"].items()},
                 **{f"colour, {n} shape(s)": x for n, x in result["colour_by_shapes"].items()}}.items():
        table.add_row(k, f"{v:.1%}")
    console.print(table)
    if mistakes and result["mistakes"]:
        wrong = Table(title=f"wrong answers ({min(mistakes, len(result['mistakes']))} of {len(result['mistakes'])})")
        for column in ("image", "question", "expected", "answer"):
            wrong.add_column(column)
        for m in result["mistakes"][:mistakes]:
            wrong.add_row(m["image"], m["question"], m["expected"], m["answer"])
        console.print(wrong)
    if json_out:
        from sphinx_edge.io import write_text_atomic

        write_text_atomic(json_out, json.dumps(result, indent=2))


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    train_n: Annotated[int, typer.Option("--train", min=1, help="Training samples.")] = 20000,
    test_n: Annotated[int, typer.Option("--test", min=0, help="Held-out samples (another seed).")] = 500,
    seed: int = 0,
    extra_questions: Annotated[bool, typer.Option(
        help="Training records also ask every other fact of their image (held-out ones ask one question).")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Processes drawing images (the output is the same for any number).")] = 1,
    domains: Annotated[Optional[str], typer.Option(
        help="Comma-separated subset of colour,count,shape,text,position,words,chart,table,marks (default: the "
             "look's: plain the first five, varied all nine).")] = None,
    look: Annotated[Look, typer.Option(
        help="How images are drawn: plain = SPHINX-Nano 1's data (hard-edged shapes, 160-320 px, nine fixed aspect "
             "ratios); varied = Nano 2's (anti-aliased, tinted/gradient/noisy backgrounds, seven fonts, 150-1500 px, "
             "any ratio 1:4-4:1, some JPEG, paraphrased questions, drawing records).")] = "plain",
) -> None:
    """Generate the synthetic multi-domain VQA set: shapes (colour, count, shape, position), numbers and words,
    charts, tables and Set-of-Mark marks."""
    from sphinx_edge.train.synthetic import generate as synth

    chosen = tuple(d.strip() for d in domains.split(",") if d.strip()) if domains else None
    with console.status(f"writing {train_n} + {test_n} images to {out}"):
        try:  # generate checks the domains before it writes anything
            synth(out, train_n, seed=seed, split="train", extra_questions=extra_questions, workers=workers,
                  domains=chosen, look=look)
        except ValueError as e:
            fail(f"--domains: {e}")
        if test_n:
            synth(out, test_n, seed=seed + 1, split="test", workers=workers, domains=chosen, look=look)
    console.print(f"wrote {out / 'train.json'}" + (f" and {out / 'test.json'}" if test_n else ""))


@data_app.command("independent")
def data_independent(
    out: Annotated[Path, typer.Option(help="Output directory (test.json + images/).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Questions (one per image; the domains in turn).")] = 200,
    seed: int = 0,
    domains: Annotated[Optional[str], typer.Option(
        help="Comma-separated subset of colour,count,shape,text,position,words,chart,table,marks (default: all "
             "nine; the first five give the set Nano 1 was first scored on).")] = None,
) -> None:
    """An evaluation set drawn by an independent renderer (the questions and answers of `data synth`, none
    of its drawing code or fonts): answers that hold on pictures the training generator never drew.
    Score it with `sphinx-edge eval --data OUT/test.json`."""
    from sphinx_edge.train.independent import generate
    from sphinx_edge.train.synthetic import DOMAINS

    chosen = tuple(d.strip() for d in domains.split(",") if d.strip()) if domains else DOMAINS
    with console.status(f"writing {n} images to {out}"):
        try:
            path = generate(out, n, seed=seed, domains=chosen)
        except ValueError as e:
            fail(f"--domains: {e}")
    console.print(f"wrote {path}")


@data_app.command("tokenizer")
def data_tokenizer(
    data: Annotated[list[Path], typer.Argument(help="LLaVA JSON files whose conversations form the corpus.")],
    out: Annotated[Path, typer.Option(help="The tokenizer.model to write.")],
    vocab_size: Annotated[int, typer.Option(min=2, help="At most this many pieces.")] = 1024,
) -> None:
    """Train a SentencePiece tokenizer (byte fallback, newlines kept, digits split)."""
    from sphinx_edge.train.tokenizer import conversation_texts, train_tokenizer

    try:
        train_tokenizer(conversation_texts(data), out, vocab_size)
    except ValueError as e:
        fail(str(e))
    console.print(f"wrote {out}")


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A sphinx-edge or LLaMA2-Accessory model directory, or "
                                           "hf://OWNER/REPO\\[/SUBFOLDER] on the Hugging Face Hub.")],
    out: Annotated[Path, typer.Option(help="Output directory (sphinx-edge format).")],
    size: Annotated[Optional[str], typer.Option(help="Expected size: a check (the configuration is read from "
                                                "the checkpoint); a checkpoint of another shape is refused.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights' dtype: checkpoint (keep its own), float32, bfloat16 "
                                       "or float16.")] = "checkpoint",
) -> None:
    """Convert a released SPHINX directory to the sphinx-edge format (safetensors)."""
    from sphinx_edge.checkpoints import CheckpointError, load_model, tokenizer_path
    from sphinx_edge.checkpoints.native import save_native

    if dtype not in ("checkpoint", "float32", "bfloat16", "float16"):
        fail(f"--dtype: unknown dtype {dtype!r}; choose checkpoint, float32, bfloat16 or float16")
    try:
        model = load_model(source, size, dtype=None if dtype == "checkpoint" else dtype)
        tokenizer = tokenizer_path(source)
    except CheckpointError as e:
        fail(str(e))
    save_native(model, out, tokenizer=tokenizer)
    c = model.config
    console.print(f"wrote {out}: {c.name} ({c.llama_type}, LLM {c.llm.family} {c.llm.dim}x{c.llm.n_layers}, "
                  f"layout {c.layout}, {str(next(model.parameters()).dtype).removeprefix('torch.')})")


@app.command()
def assemble(
    size: Annotated[str, typer.Option(help="The size to build.")],
    out: Annotated[Path, typer.Option(help="Output directory (sphinx-edge format).")],
    llm: Annotated[Optional[Path], typer.Option(help="Hugging Face LLM directory (Llama / Mixtral / InternLM2).")] = None,
    dinov2: Annotated[Optional[Path], typer.Option(help="DINOv2 torch-hub weights (.pth).")] = None,
    convnext: Annotated[Optional[Path], typer.Option(help="timm / open_clip ConvNeXt weights.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.model to ship with the model.")] = None,
) -> None:
    """Assemble a SPHINX model from released parts; the projector and special embeddings start fresh."""
    from sphinx_edge.checkpoints import CheckpointError
    from sphinx_edge.checkpoints.hf import assemble_from_parts
    from sphinx_edge.checkpoints.native import save_native

    try:
        model = assemble_from_parts(get_config(size), llm=llm, dinov2=dinov2, convnext=convnext)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    save_native(model, out, tokenizer=tokenizer)
    console.print(f"wrote {out}")


DEMO_IMAGE = SAMPLES / "shapes_2x1.png"  # a held-out-style synthetic scene: 2:1, so two tiles are pure padding
DEMO_QUESTION = "Which side is the yellow triangle on?"


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the export goes.")] = Path("exports/nano-int4"),
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per benchmark row.")] = 3,
) -> None:
    """The main job on the bundled default: export SPHINX-Nano to int4 (ONNX and ExecuTorch), answer a
    question about a bundled image with both formats, and print the per-stage latency table."""
    if bundled_weights("nano") is None:
        fail("the bundled SPHINX-Nano weights are missing (sphinx_edge/weights/nano); `make nano` trains them")
    console.rule("1. export SPHINX-Nano, int4, ONNX + ExecuTorch")
    export_cmd(size="nano", out=out, quant=Quant.INT4, fmt=ExportFormat.BOTH, overwrite=True)
    for name in ("onnx", "pte"):
        console.rule(f"2. {name}: {DEMO_QUESTION} ({DEMO_IMAGE.name})")
        run([str(out), DEMO_QUESTION], image=DEMO_IMAGE, fmt=name, max_new_tokens=16)
    console.rule("3. latency by stage (this machine)")
    bench([out], fmt=["onnx", "pte"], image=[DEMO_IMAGE], skip_tokens="both", pp=256, tg=64, repeats=repeats,
          bandwidth=False)


if __name__ == "__main__":
    app()
