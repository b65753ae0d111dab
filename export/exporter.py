"""`export_model`: a SPHINX model -> an export directory (graphs, tokenizer, manifest.json).

Everything is written into a staging directory beside the target and swapped into place at the
end, manifest last: an interrupted export leaves no directory that looks finished, and an export
it replaces stays whole until then. A target that holds an export is replaced only with
`overwrite`; one that holds anything else (the user's files) never is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sphinx_edge.bundled import VERIFY_IMAGE
from sphinx_edge.config import SphinxConfig
from sphinx_edge.export.memory import release_memory
from sphinx_edge.export.options import ExportError, ExportOptions, Format
from sphinx_edge.export.source import ModelSource
from sphinx_edge.export.stages import StageLog
from sphinx_edge.io import publish_mode, replace_dir
from sphinx_edge.runtime.manifest import FORMAT_VERSION, MANIFEST, ManifestError, file_entry, read_manifest
from sphinx_edge.tokenizer import Tokenizer
from sphinx_edge.versions import installed_versions

if TYPE_CHECKING:  # the exporting process stays torch-free while a large model's stages run in theirs
    from sphinx_edge.model.sphinx import SphinxModel

COREML_HERE = ("not run: the vision encoder is a Core ML delegate, which runs on Apple devices only "
               "(ExecuTorch's Core ML runtime); check it there with `sphinx-edge run`")
STAGING_MARK = ".sphinx-edge-staging"  # in a staging directory: the exporting process's id


CONVERSATION_TOKENS = 512  # text room beside the longest image in the default context
MIN_TEXT_TOKENS = 256  # the least: the system prompt, a question, an answer (and the export's own check)


def context_length(config: SphinxConfig, requested: int | None = None) -> int:
    """The context an export is built for. The .pte's static KV cache has exactly this many slots and
    its decoder attends to all of them at every step, so a context sized to the use beats the
    model's maximum: by default the longest image plus a conversation, rounded up to a power of two,
    at most the model's own (SPHINX-Tiny: 1295 + 512 -> 2048 of 4096)."""
    limit, longest_image = config.llm.max_seq_len, config.max_image_tokens
    if requested is None:
        return min(limit, 1 << (longest_image + CONVERSATION_TOKENS - 1).bit_length())
    if requested > limit:
        raise ExportError(f"--max-seq-len {requested} is longer than {config.name}'s context ({limit} tokens)")
    if requested < longest_image + MIN_TEXT_TOKENS:
        raise ExportError(f"--max-seq-len {requested} cannot hold {config.name}'s longest image "
                          f"({longest_image} tokens) and {MIN_TEXT_TOKENS} tokens of text: give at least "
                          f"{longest_image + MIN_TEXT_TOKENS}")
    return requested


def _tool_versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **installed_versions(("sphinx-edge", "torch", "onnx", "onnxruntime", "executorch", "torchao"))}


def _verify(load: Callable[..., SphinxModel], tokenizer: Tokenizer, stage: Path, graphs: dict,
            options: ExportOptions, log: StageLog, streamed: bool) -> dict:
    """The manifest's `verification`: the torch side first, then the model is let go, then each
    runnable format of the export against it. `streamed`: the reference is computed one part of the
    model at a time (`load(only=...)`), unless held-out questions are asked for, which need it whole."""
    from sphinx_edge.export.verify import (export_accuracy, held_out_questions, streamed_reference, torch_accuracy,
                                           torch_reference, verify_export)

    runnable = [fmt for fmt in graphs if not (fmt == "pte" and options.delegate == "coreml")]
    verification: dict = {"pte": {"skipped": COREML_HERE}} if len(runnable) < len(graphs) else {}
    if not runnable:
        return verification
    with tempfile.TemporaryDirectory() as tmp:
        with log.stage("verify: the PyTorch reference"):
            accuracy = None
            if streamed and not options.eval_samples:
                reference = streamed_reference(load, tokenizer, VERIFY_IMAGE)
            else:
                model = load()
                reference = torch_reference(model, tokenizer, VERIFY_IMAGE)
                data = held_out_questions(options.eval_samples, Path(tmp)) if options.eval_samples else None
                accuracy = {"n": options.eval_samples, "torch_fp32": torch_accuracy(model, tokenizer, data)} if data else None
                del model
            release_memory()
        for fmt in runnable:
            with log.stage(f"verify {fmt}"):
                verification[fmt] = verify_export(reference, stage, fmt, options.quant)
                if accuracy:
                    log.say(f"{options.eval_samples} held-out questions")
                    accuracy[fmt] = export_accuracy(stage, fmt, data)
    if accuracy:
        verification["accuracy"] = accuracy
    return verification


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuses a target that holds anything but a sphinx-edge export, and an export unless `overwrite`.
    A directory with files the manifest does not list is never replaced: they may be the user's."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; choose another --out")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    try:
        manifest: dict | None = read_manifest(out_dir)
    except ManifestError:
        manifest = None
    listed = set(manifest["files"]) | {MANIFEST} if manifest else set()
    foreign = [name for name in entries if name not in listed]
    if foreign:
        what = "files that are not part of a sphinx-edge export" if manifest is None else \
            "an export and files it did not write"
        raise ExportError(f"{out_dir} holds {what} ({_listing(foreign)}); nothing was changed: "
                          "give --out a new or empty directory")
    if not overwrite:
        raise ExportError(f"{out_dir} already holds an export of {manifest['model'].get('name', '?')!r}; "
                          "pass --overwrite to replace it, or choose another --out")


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def new_stage(out_dir: Path) -> Path:
    """A private staging directory beside `out_dir`, marked with this process's id so that a later
    export can sweep it if this process dies without cleaning up (SIGKILL, the OOM killer)."""
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    (stage / STAGING_MARK).write_text(str(os.getpid()), encoding="utf-8")
    return stage


def sweep_stale_stages(parent: Path) -> list[Path]:
    """Removes the staging directories in `parent` whose export process is gone; returns them."""
    removed = []
    for stage in parent.glob(".*.partial"):
        try:
            pid = (stage / STAGING_MARK).read_text(encoding="utf-8").strip()
        except OSError:  # not a directory of ours, or not readable
            continue
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a zombie (dead, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _onnx_stage(load: Callable[..., SphinxModel], stage: Path, options: ExportOptions, tokenizer_ids: dict,
                in_place: bool, log: StageLog) -> dict:
    """The ONNX graphs, quantized, in `stage`; returns the manifest's `graphs.onnx`. (The graphs carry
    no tokenizer ids.)"""
    from sphinx_edge.export.onnx import graph_io, quantize_graphs, write_graphs

    # The vision graph rewrites its model in place (onnxruntime_rewrites), so a model the caller holds is
    # copied per graph; the CLI passes loaders (fresh models), which are rewritten as they are.
    if not in_place:
        load = (lambda only=None, store=None, held=load: copy.deepcopy(held(only=only, store=store)))
    with log.stage("onnx graphs"):
        # Each graph made from the parts it reads. (The ONNX decoder's past grows with the sequence: its
        # graphs do not depend on the context.)
        fp32 = write_graphs(load, stage / ".fp32", on_stage=log.say)
    with log.stage("onnx quantize"):
        files = quantize_graphs(fp32, stage, quant=options.quant, vision_quant=options.vision,
                                embedding_quant=options.embedding_quant, block_size=options.group_size,
                                accuracy_level=options.accuracy_level, on_stage=log.say)
        shutil.rmtree(stage / ".fp32")
    return {name: {"files": [f.name for f in fs], **graph_io(fs[0])} for name, fs in files.items()}


def _pte_stage(load: Callable[..., SphinxModel], stage: Path, options: ExportOptions, tokenizer_ids: dict,
               in_place: bool, log: StageLog) -> dict:
    """The ExecuTorch program in `stage`; returns the manifest's `graphs.pte`."""
    from sphinx_edge.export.executorch import export_pte

    # In place: the loader quantizes each module as its weights arrive (no fp32 copy of the whole model).
    return export_pte(load if in_place else load(), stage, quant=options.quant, group_size=options.group_size,
                      vision_quant=options.vision, embedding_quant=options.embedding_quant, tokenizer_ids=tokenizer_ids, log=log,
                      in_place=in_place, delegate=options.delegate, max_seq_len=options.max_seq_len)


# One stage per format: (load, staging dir, options, tokenizer ids, may modify the model, stage log) ->
# the manifest's `graphs.FORMAT` entry.
STAGES = {Format.ONNX: _onnx_stage, Format.PTE: _pte_stage}

# Models whose fp32 weights take more than this export each format in a process of its own.
OWN_PROCESS_BYTES = 2**30


def _needs_own_processes(config: SphinxConfig) -> bool:
    """Whatever a stage leaves behind (torch export caches, quantizer graphs, heap fragments: about
    5 GB after the ONNX stage of SPHINX-Tiny, 13 GB after its ExecuTorch stage) goes back to the OS
    when its process ends. A small model leaves little, and a process costs seconds to start."""
    from sphinx_edge.config import parameter_counts

    return parameter_counts(config)["total"] * 4 > OWN_PROCESS_BYTES


def _in_own_process(log: StageLog, stage_fn, *args):
    """`stage_fn(*args, log)` in a fresh, spawned process that dies with this one; its stages join
    `log`, each peak counted with what this process held meanwhile."""
    from sphinx_edge.processes import run_in_child
    from sphinx_edge.rss import peak_rss_mib, reset_peak_rss

    resettable = reset_peak_rss()
    result, records = run_in_child(_logged, stage_fn, args, on_progress=log.say)
    log.adopt(records, peak_rss_mib() if resettable else None)
    return result


def _side_by_side(model, isolated: bool, options: ExportOptions) -> bool:
    """Whether the two formats are made at once, ONNX in a child process: for a small model from a
    ModelSource (which a child can load) on a machine with a core to spare. Each stage is mostly one
    busy Python thread, so on two cores the ONNX graphs take no wall time of their own (the bundled
    Nano: 10-14 s of ~75; benchmarks/RESULTS.md, "Export on a laptop (issue 22, third part)"). Large
    models keep one stage at a time: their memory is the limit."""
    return (isinstance(model, ModelSource) and not isolated and (os.cpu_count() or 1) >= 2
            and set(options.formats) == {Format.ONNX, Format.PTE})


class _Background:
    """A stage running in its own process, watched from a thread: `result()` waits for it and gives
    (its return value, its stage records), or raises what it raised; `stop()` kills it and waits."""

    def __init__(self, log: StageLog, stage_fn, args: tuple) -> None:
        from sphinx_edge.processes import run_in_child

        self._outcome: tuple = ()
        self._cancel = threading.Event()

        def watch() -> None:
            try:
                self._outcome = (True, run_in_child(_logged, stage_fn, args, on_progress=log.show,
                                                    cancel=self._cancel))
            except BaseException as error:  # handed to the thread that asks for the result
                self._outcome = (False, error)

        self._thread = threading.Thread(target=watch, name=f"stage {stage_fn.__name__}", daemon=True)
        self._thread.start()

    def result(self) -> tuple:
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._cancel.set()
        self._thread.join()


def _logged(stage_fn, args: tuple, show: Callable[[str], None]) -> tuple:
    """In the child: the stage with a log of its own, whose lines go to the parent's display."""
    log = StageLog(show)
    return stage_fn(*args, log), log.records


def export_model(model: SphinxModel | ModelSource | Callable[[], SphinxModel], tokenizer: Tokenizer,
                 out_dir: str | Path, options: ExportOptions, *, overwrite: bool = False,
                 on_stage: Callable[[str], None] | None = None, source: dict | None = None) -> dict:
    """Exports `model` (fp32, eval) with `tokenizer` into `out_dir`; returns the manifest.

    `model` may be a `ModelSource`: then each stage loads the weights itself, a large model's in a
    process of its own (ONNX graphs, ExecuTorch program), and verification drops the PyTorch model
    before it loads the export, so at no time do two copies of a large model's weights live side by
    side. It may also be a function that loads a fresh model (stages run in this process; the
    ExecuTorch stage quantizes its copy in place), or a model (never modified). `source` says where
    the weights came from when `model` is not a ModelSource. `on_stage` receives each line of
    progress; the manifest's `export_stages` holds each stage's time and peak memory."""
    log = StageLog(on_stage)
    current: SphinxModel | None = None
    if isinstance(model, ModelSource):  # the stages load the weights (and refuse a checkpoint of another size)
        config, load, source = model.config, model.load, model.entry()
        fresh, isolated = True, _needs_own_processes(config)
        if not isolated:  # a small model's stages run in this process
            from sphinx_edge.model.sphinx import each_module
    else:  # loaders take `on_module` (ModelSource.load), which only a fresh model may go through
        from sphinx_edge.model.sphinx import SphinxModel, each_module

        fresh = not isinstance(model, SphinxModel)
        load = ((lambda on_module=None, only=None, store=None: each_module(model(), on_module)) if fresh else
                (lambda on_module=None, only=None, store=None: model))  # the whole model, whatever parts are asked for
        with log.stage("load the model"):
            current = load()
        config, isolated = current.config, False
    out_dir = Path(out_dir)
    options = dataclasses.replace(options, max_seq_len=context_length(config, options.max_seq_len))
    config = config.with_context(options.max_seq_len)
    check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_stages(out_dir.parent)
    stage = new_stage(out_dir)
    started = time.perf_counter()
    side_by_side, onnx = _side_by_side(model, isolated, options), None
    try:
        graphs: dict[str, dict] = {}
        shutil.copyfile(tokenizer.path, stage / "tokenizer.model")
        ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
        if side_by_side:  # the ONNX graphs in a process of their own, on the other core
            onnx = _Background(log, STAGES[Format.ONNX], (load, stage, options, ids, True))
            since = len(log.records)
        for fmt in options.formats:
            if side_by_side and fmt == Format.ONNX:
                continue
            if isolated:
                graphs[fmt] = _in_own_process(log, STAGES[fmt], load, stage, options, ids, True)
            else:
                held, current = current, None  # a stage may quantize a fresh model in place: no longer fp32
                get = load if held is None else (lambda on_module=None, only=None, store=None, m=held: each_module(m, on_module))
                graphs[fmt] = STAGES[fmt](get, stage, options, ids, fresh, log)
                del held, get
            release_memory()
        if side_by_side:
            graphs[Format.ONNX], records = onnx.result()
            log.merge_side_by_side(since, records)
            graphs = {fmt: graphs[fmt] for fmt in options.formats}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": {"name": config.name, "paper_name": config.paper_name, "config": config.to_dict()},
            "source": source or {},
            "layout": config.layout,
            "quantization": {"quant": options.quant, "group_size": options.group_size,
                             "accuracy_level": options.accuracy_level,
                             "vision": options.vision,
                             "embedding": options.embedding_quant},
            "tokenizer": "tokenizer.model",
            "files": {f.name: file_entry(f) for f in sorted(stage.iterdir()) if f.is_file() and f.name != STAGING_MARK},
            "graphs": graphs,
            "tools": _tool_versions(),
        }
        # The manifest goes in first so that verification loads the staged export as a user would.
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if options.verify:
            # Part by part for large models: both sources make only the parts asked for.
            manifest["verification"] = _verify(load, tokenizer, stage, graphs, options, log, isolated)
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        manifest["export_stages"] = log.summary()
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        (stage / STAGING_MARK).unlink()
        for path in [stage, *stage.iterdir()]:  # some writers (onnx's external data) create files 0600
            publish_mode(path)
        check_target(out_dir, overwrite)  # again: the user may have put files there meanwhile
        replace_dir(stage, out_dir)
    except BaseException:
        if onnx is not None:  # the ONNX process goes before its folder does
            onnx.stop()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest
