"""Our SentencePiece tokenizers: the same texts give the same file (exports are byte-reproducible)."""

import sentencepiece as spm

from sphinx_edge.train.tokenizer import train_tokenizer
from tests.conftest import CORPUS


def test_the_same_texts_give_the_same_file(tmp_path):
    texts = CORPUS.splitlines() * 3
    first = train_tokenizer(texts, tmp_path / "a" / "tokenizer.model", 300)
    second = train_tokenizer(texts, tmp_path / "b.model", 300)
    assert first.read_bytes() == second.read_bytes()
    tok = spm.SentencePieceProcessor(model_file=str(first))
    assert tok.decode(tok.encode("How many squares are there?\n")) == "How many squares are there?\n"
