"""Where an export's weights and tokenizer come from: the bundled weights of a size, a checkpoint
(a directory or hf://), or random weights of the real shape with a small stand-in tokenizer (latency
and memory work). Torch-free until a source is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sphinx_edge.bundled import bundled_weights
from sphinx_edge.config import SphinxConfig, get_config, parameter_counts
from sphinx_edge.export.options import ExportError
from sphinx_edge.runtime.manifest import sha256

# Where to find each size's weights, said when none are given.
WEIGHTS_HELP = {
    "tiny": "SPHINX-Tiny's released weights (LLaMA2-Accessory format, Alpha-VLLM/SPHINX on Hugging Face: "
            "the SPHINX-Tiny folder) or parts assembled with `sphinx-edge assemble`",
}
STAND_IN_VOCAB = 1024


@dataclass(frozen=True)
class ModelSource:
    """Where an export's weights come from: a checkpoint directory, or random weights of `size`
    (seeded). Picklable, so that each stage can load the model in a process of its own."""

    size: str | None  # None: whatever the checkpoint holds
    checkpoint: str | None = None
    seed: int = 0

    @functools.cached_property  # (asked by the CLI and the exporter; a released directory's costs a process)
    def config(self) -> SphinxConfig:
        """The model's configuration: the checkpoint's (read without its tensors), else the size's. A
        released directory's comes from its tensors' shapes, which takes torch: that is done in a
        process of its own, so that the exporting process, whose memory adds to every stage's, never
        holds torch's libraries (about 250 MiB) for a large model."""
        if not self.checkpoint:
            return get_config(self.size)
        from sphinx_edge.checkpoints import checkpoint_config
        from sphinx_edge.checkpoints.hub import resolve
        from sphinx_edge.checkpoints.native import is_native_dir
        from sphinx_edge.processes import run_in_child

        if is_native_dir(resolve(self.checkpoint)):  # its config.json
            return checkpoint_config(self.checkpoint, self.size)
        return run_in_child(checkpoint_config, self.checkpoint, self.size)

    def load(self, on_module: Callable | None = None, only: Sequence[str] | None = None,
             store=None):  # -> SphinxModel
        """The model, fp32, eval. `on_module(name, module)` is called on each module once its weights
        are in place (`model.sphinx.materialize`): random weights are made one module at a time, so
        a quantizing hook keeps the fp32 model from ever existing whole. `only`: the parts to make
        (the rest stays on the meta device), e.g. ("dinov2", "llm.tok_embeddings"). `store`: where the
        parameters live (`model.sphinx.WeightStore`; default memory)."""
        import torch

        from sphinx_edge.model.sphinx import SphinxModel, materialize

        if self.checkpoint:
            from sphinx_edge.checkpoints import load_model

            # Streamed from the memory-mapped files like random weights; refuses another size.
            return load_model(self.checkpoint, self.size, on_module=on_module, only=only, store=store)
        with torch.device("meta"):
            model = SphinxModel(get_config(self.size))
        return materialize(model, self._random_fill(), on_module, only, store).eval()  # = build_model(config, seed)

    def _random_fill(self):
        """One RandomFill per source and process: a second pass (another part) reuses the generator
        states the first one remembered."""
        from sphinx_edge.model.sphinx import RandomFill

        return _RANDOM_FILLS.setdefault((self.size, self.seed), RandomFill(seed=self.seed)).restart()

    def entry(self) -> dict:
        """The manifest's `source`: what a benchmark needs to rebuild the PyTorch reference. Weights that
        ship with the package are named by size, not by a path that only holds on the exporting machine."""
        if not self.checkpoint:
            return {"random_init": True, "seed": self.seed}
        folder = Path(self.checkpoint).resolve()
        if self.size and folder == bundled_weights(self.size):
            return {"bundled": self.size, "weights": _weights_digest(folder)}
        return {"checkpoint": str(folder)}


_RANDOM_FILLS: dict = {}


def _weights_digest(folder: Path) -> dict[str, str]:
    """sha256 of each weight file of a checkpoint folder: tells whether an export is stale."""
    return {f.name: sha256(f) for f in sorted(folder.iterdir()) if f.suffix in (".safetensors", ".pth", ".bin")}


def choose_source(size: str | None, checkpoint: str | Path | None, random_init: bool, tokenizer: Path | None,
                  workdir: Path) -> tuple[ModelSource, Path]:
    """The weights and the tokenizer.model of an export. Default: the bundled weights of `size`; with a
    checkpoint `size` may be None (the checkpoint says what it holds) or a check."""
    if size is None and (random_init or checkpoint is None):
        raise ExportError("give --size (or --checkpoint DIR: its model's size is read from its files)")
    if random_init:
        return ModelSource(size, seed=0), tokenizer or stand_in_tokenizer(get_config(size).llm.vocab_size, workdir)
    from sphinx_edge.checkpoints import tokenizer_path

    checkpoint = checkpoint or bundled_weights(size)
    if checkpoint is None:
        how = WEIGHTS_HELP.get(size, "the released checkpoint of this size (LLaMA2-Accessory format)")
        raise ExportError(f"no weights for {size!r}: give --checkpoint DIR with {how}; or pass --random-init to "
                          "export random weights of the real shape, which is what latency and memory benchmarks "
                          "need (answers will be noise)")
    found = tokenizer or tokenizer_path(checkpoint)
    if found is None:
        raise ExportError(f"{checkpoint} has no tokenizer.model; give --tokenizer")
    return ModelSource(size, checkpoint=str(checkpoint)), found


def stand_in_tokenizer(vocab_size: int, workdir: Path) -> Path:
    """A small byte-fallback tokenizer for random-weight exports (latency work needs token ids, not meaning)."""
    from sphinx_edge.prompt import format_prompt
    from sphinx_edge.train.synthetic import QUESTIONS
    from sphinx_edge.train.tokenizer import train_tokenizer

    size = min(vocab_size, STAND_IN_VOCAB)
    if size < 300:
        raise ExportError(f"the model's vocabulary ({vocab_size}) is too small for a stand-in tokenizer; "
                          "give --tokenizer FILE")
    texts = [format_prompt([(q, "yes")]) for q in QUESTIONS.values()] * 50
    return train_tokenizer(texts, workdir / "tokenizer.model", size)


def memory_warning(config: SphinxConfig) -> str | None:
    """A warning when exporting a model of `config` may need more than half the available memory. No
    stage holds the whole fp32 model; the estimate, the fp32 weights of the vision side or of the LLM,
    whichever is larger, is an upper bound (SPHINX-Tiny: 8.3 GiB estimated, a 5.9 GB peak measured, in
    lowering; benchmarks/RESULTS.md, "Export on a laptop (issue 22, third part)")."""
    counts = parameter_counts(config)
    largest = max(counts["total"] - counts["llm"], counts["llm"])
    need = largest * 4 * 1.1 / 2**30
    free = _available_gib()
    if free is not None and need > 0.5 * free:
        return f"exporting {config.name} needs about {need:.0f} GiB of memory; {free:.0f} GiB is available"
    return None


def _available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None
