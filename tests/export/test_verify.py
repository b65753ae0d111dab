"""Verification's PyTorch reference: computed on the whole model, or one part at a time."""

import numpy as np
import pytest

from sphinx_edge.bundled import VERIFY_IMAGE
from sphinx_edge.export.source import ModelSource
from sphinx_edge.export.verify import streamed_reference, torch_reference
from sphinx_edge.tokenizer import Tokenizer


@pytest.mark.parametrize("size", ["test-tiny", "test-ens5"])
def test_the_reference_made_part_by_part_is_the_whole_models(size, tokenizer_file):
    """A large model's reference runs each expert, the projectors and the LLM with only that part in
    memory; its logits, greedy tokens and image embeddings are the whole model's, bit for bit."""
    tok = Tokenizer(tokenizer_file)
    source = ModelSource(size, seed=9)
    whole = torch_reference(source.load(), tok, VERIFY_IMAGE)
    parts = []
    streamed = streamed_reference(lambda only=None: parts.append(only) or source.load(only=only), tok, VERIFY_IMAGE)
    assert streamed.tokens == whole.tokens
    np.testing.assert_array_equal(streamed.logits, whole.logits)
    np.testing.assert_array_equal(streamed.image_embeds, whole.image_embeds)
    assert all(p is not None for p in parts) and len(parts) >= 5  # never the whole model
