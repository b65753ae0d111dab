"""Checkpoint readers and writers: LLaMA2-Accessory, Hugging Face parts, our own safetensors format.

`load_model(path)` detects the format of a directory and returns a ready SphinxModel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sphinx_edge.checkpoints.strict import CheckpointError

__all__ = ["CheckpointError", "checkpoint_config", "load_model", "open_checkpoint", "read_json", "tokenizer_path"]


def read_json(file: Path) -> Any:
    """A checkpoint's JSON file, or CheckpointError naming the file and what is wrong with it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from e


def _checkpoint_dir(path: str | os.PathLike, size: str | None) -> tuple[Path, str]:
    """(the directory, its kind: "native" or "accessory"), or CheckpointError saying what it is not."""
    from sphinx_edge.checkpoints.hub import resolve
    from sphinx_edge.checkpoints.native import is_native_dir
    from sphinx_edge.config import SIZES

    if size is not None and size not in SIZES:
        raise CheckpointError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    path = resolve(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; expected a checkpoint directory")
    if is_native_dir(path):
        return path, "native"
    from sphinx_edge.checkpoints.accessory import is_accessory_dir  # (imports torch)

    if is_accessory_dir(path):
        return path, "accessory"
    if (path / "config.json").exists():
        read_json(path / "config.json")  # a broken file is named as such, not taken for another format
        raise CheckpointError(
            f"{path} looks like a Hugging Face LLM checkpoint: it is one part of a SPHINX model. "
            "Assemble a model from parts with `sphinx-edge assemble`."
        )
    raise CheckpointError(f"{path} is not a sphinx-edge or LLaMA2-Accessory checkpoint directory")


def _of_size(path: Path, config, size: str | None):  # SphinxConfig -> SphinxConfig
    """`config` (one of our directories'), if it is of `size` (when given)."""
    if size and config.name != size:
        raise CheckpointError(f"{path} holds a {config.name!r} model ({config.llm.family}), not {size!r}")
    return config


def checkpoint_config(path: str | os.PathLike, size: str | None = None):  # -> SphinxConfig
    """The configuration of a checkpoint (`open_checkpoint`'s), reading no tensor. Ours comes from its
    config.json without importing torch; a released directory's needs its shapes (torch)."""
    from sphinx_edge.checkpoints.native import native_config

    path, kind = _checkpoint_dir(path, size)
    return _of_size(path, native_config(path), size) if kind == "native" else open_checkpoint(path, size)[0]


def open_checkpoint(path: str | os.PathLike, size: str | None = None):  # -> (SphinxConfig, LazyTensors)
    """The configuration and the tensors (memory-mapped, each read when asked for) of a sphinx-edge or
    LLaMA2-Accessory directory, or an `hf://` source. The configuration comes from the checkpoint (a
    released directory's is inferred from its tensors' shapes); `size` (optional) is a check: a
    checkpoint of another family or shape is refused, naming what differs."""
    from sphinx_edge.checkpoints.accessory import open_accessory
    from sphinx_edge.checkpoints.native import open_native

    path, kind = _checkpoint_dir(path, size)
    if kind == "native":
        config, tensors = open_native(path)
        return _of_size(path, config, size), tensors
    return open_accessory(path, size)


def load_model(path: str | os.PathLike, size: str | None = None, dtype: Any = "float32",
               on_module: Callable | None = None, only: Sequence[str] | None = None, store=None):
    """A SphinxModel from a checkpoint (`open_checkpoint`; `size` is a check), eval. `dtype`: a torch
    dtype or its name; None keeps the checkpoint's own. The model is made one parameter at a time
    from the memory-mapped files (`model.sphinx.materialize`): `on_module(name, module)` is called on
    each module once its weights are in, and `only` names the parts to read (the rest stays on the
    meta device), so an export stage holds neither a second copy nor the parts it does not need.
    `store`: where the parameters live (`model.sphinx.WeightStore`; default memory)."""
    import torch

    from sphinx_edge.checkpoints.strict import check_state_dict
    from sphinx_edge.model.sphinx import SphinxModel, materialize

    config, tensors = open_checkpoint(path, size)
    if dtype is None:  # the checkpoint's own: that of its token embedding
        dtype = next(t.dtype for k, t in tensors.meta.items() if k.endswith("tok_embeddings.weight"))
    with torch.device("meta"):
        model = SphinxModel(config).to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    check_state_dict(model, tensors.meta, f"checkpoint {tensors.source}")
    return materialize(model, tensors, on_module, only, store).eval()


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The checkpoint's tokenizer.model, None if it has none; CheckpointError if `path` is no directory."""
    from sphinx_edge.checkpoints.hub import resolve

    path = resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} {'is not a directory' if path.exists() else 'does not exist'}")
    file = path / "tokenizer.model"
    return file if file.exists() else None
