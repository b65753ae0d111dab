"""Our own checkpoint format: config.json + model.safetensors + tokenizer files, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

from sphinx_edge.checkpoints.strict import CheckpointError
from sphinx_edge.config import SphinxConfig
from sphinx_edge.io import atomic_path, write_text_atomic

if TYPE_CHECKING:
    import torch

    from sphinx_edge.checkpoints.lazy import LazyTensors

FORMAT = "sphinx-edge"
VERSION = 1


def is_native_dir(path: str | os.PathLike) -> bool:
    file = Path(path) / "config.json"
    if not file.exists():
        return False
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def save_native(model, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """Writes `model` (a SphinxModel) to the directory `path`; `tokenizer` is a tokenizer.model to copy."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    if tokenizer is not None:
        with atomic_path(path / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer, tmp)
    # config.json last: its presence marks the directory as complete.
    meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict()}
    write_text_atomic(path / "config.json", json.dumps(meta, indent=2))
    return path


def native_config(path: str | os.PathLike) -> SphinxConfig:
    """The configuration of one of our directories, from its config.json (no torch needed)."""
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'config.json'} is not a sphinx-edge config")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is format version {meta.get('version')}; this sphinx-edge reads {VERSION}")
    try:
        config = SphinxConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} holds an invalid model config: {e}") from e
    if not (path / "model.safetensors").exists():
        raise CheckpointError(f"{path} has a config.json but no model.safetensors")
    return config


def open_native(path: str | os.PathLike) -> tuple[SphinxConfig, LazyTensors]:
    """The config and the (memory-mapped, read on demand) tensors of one of our directories."""
    from safetensors import safe_open

    from sphinx_edge.checkpoints.lazy import LazyTensors

    config = native_config(path)
    weights = Path(path) / "model.safetensors"
    try:
        file = safe_open(str(weights), framework="pt")
        meta = {k: _meta_tensor(file.get_slice(k)) for k in file.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    read = {k: (lambda k=k: file.get_tensor(k)) for k in meta}
    return config, LazyTensors(read, meta, str(weights), [weights])


def _meta_tensor(view) -> torch.Tensor:  # noqa: ANN001 (a safetensors slice)
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F64": torch.float64}
    return torch.empty(view.get_shape(), dtype=dtypes[view.get_dtype()], device="meta")
