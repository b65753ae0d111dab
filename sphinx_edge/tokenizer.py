"""SentencePiece tokenizer (LLaMA / InternLM2 `tokenizer.model`). Torch-free: the runtime uses it."""

from __future__ import annotations

import os
from pathlib import Path

from sphinx_edge.prompt import check_utf8


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm

        path = Path(model_file)
        if not path.exists():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from e
        self.path = path
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        check_utf8(text, "the text", TokenizerError)
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_offsets(self, text: str, *, bos: bool = False) -> tuple[list[int], list[int]]:
        """Ids and the character offset where each token starts (BOS starts at 0)."""
        check_utf8(text, "the text", TokenizerError)
        proto = self.sp.encode(text, return_type="proto")
        # SentencePiece reports byte offsets; map them to character offsets.
        char_of_byte = {}
        pos = 0
        for i, ch in enumerate(text):
            char_of_byte[pos] = i
            pos += len(ch.encode("utf-8"))
        char_of_byte[pos] = len(text)
        ids = [p.id for p in proto.pieces]
        starts = [char_of_byte.get(p.begin, len(text)) for p in proto.pieces]
        return ([self.bos_id] if bos else []) + ids, ([0] if bos else []) + starts

    def model_proto(self):
        """The parsed SentencePiece ModelProto: pieces with scores and types, and the trainer and
        normaliser settings that runners outside Python (C++, JavaScript) must follow."""
        from sentencepiece import sentencepiece_model_pb2  # ships with sentencepiece; needs protobuf

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return proto

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([i for i in ids if 0 <= i < self.vocab_size])
