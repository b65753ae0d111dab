"""Training a SentencePiece tokenizer for models we train ourselves (SPHINX-Nano)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from sphinx_edge.io import atomic_path
from sphinx_edge.prompt import SYSTEM_PROMPT, format_prompt
from sphinx_edge.train.data import read_conversations


def train_tokenizer(texts: Iterable[str], out_file: str | os.PathLike, vocab_size: int) -> Path:
    """A byte-fallback SentencePiece model that keeps newlines (the stop string is "\\n###")."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone takes 256 pieces (use >= 300)")
    lines = [line for text in texts for line in text.split("\n") if line]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines), model_prefix=f"{tmp}/spm", vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, user_defined_symbols=["\n"], character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        )
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(Path(f"{tmp}/spm.model").read_bytes())
        model.trainer_spec.model_prefix = "spm"  # not the temporary folder: the same texts, the same file
        with atomic_path(out_file) as target:
            Path(target).write_bytes(model.SerializeToString())
    return Path(out_file)


def conversation_texts(json_files: Iterable[str | os.PathLike]) -> list[str]:
    """The formatted conversations of LLaVA JSON files, plus the system prompt: a tokenizer corpus."""
    texts = [SYSTEM_PROMPT]
    for file in json_files:
        texts += [format_prompt(turns) for _, turns in read_conversations(file)]
    return texts
