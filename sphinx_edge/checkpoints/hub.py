"""Checkpoints on the Hugging Face Hub: `hf://OWNER/REPO[/SUBFOLDER]` as a local directory.

Only a checkpoint's own files are fetched (LLaMA2-Accessory shards, meta.json, config.json, the
tokenizer; or our safetensors format), through huggingface_hub, so its cache (HF_HOME / HF_HUB_CACHE),
token and offline mode (HF_HUB_OFFLINE=1) apply as for any Hub download. Example: the SPHINX-Tiny-1k
folder of Alpha-VLLM/LLaMA2-Accessory is hf://Alpha-VLLM/LLaMA2-Accessory/finetune/mm/SPHINX/SPHINX-Tiny-1k.
"""

from __future__ import annotations

import os
from pathlib import Path

from sphinx_edge.checkpoints.strict import CheckpointError

SCHEME = "hf://"
CHECKPOINT_FILES = ("meta.json", "config.json", "tokenizer.model", "consolidated.*.model.pth", "model.safetensors")


def is_hub_source(source: str | os.PathLike) -> bool:
    # A Path collapses "hf://" to "hf:/": both spellings name the Hub.
    return str(source).startswith("hf:/")


def resolve(source: str | os.PathLike) -> Path:
    """The local directory of a checkpoint: `source` itself, or an hf:// source downloaded (or found in
    the cache)."""
    if not is_hub_source(source):
        return Path(source)
    parts = [p for p in str(source)[len("hf:"):].split("/") if p]
    if len(parts) < 2:
        raise CheckpointError(f"{source!s}: a Hub source is {SCHEME}OWNER/REPO[/SUBFOLDER]")
    repo_id, folder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise CheckpointError(f"{SCHEME} sources need huggingface_hub: pip install 'sphinx-edge[export]'") from e
    patterns = [f"{folder}/{f}" if folder else f for f in CHECKPOINT_FILES]
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{SCHEME}{repo_id} is not in the Hugging Face cache and cannot be downloaded "
                              f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): {e}") from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download {SCHEME}{repo_id}: {e}") from e
    local = root / folder
    if not local.is_dir() or not any(local.iterdir()):
        raise CheckpointError(f"{SCHEME}{repo_id} has no checkpoint files under {folder or 'its root'!r} "
                              f"(looked for {', '.join(CHECKPOINT_FILES)})")
    return local
