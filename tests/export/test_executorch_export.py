"""ExecuTorch export of a small model: parity with torch through the executorch runtime, dynamic views."""

import numpy as np
import pytest
import torch

from sphinx_edge.export.graphs import VisionEncoder
from sphinx_edge.runtime.pipeline import Pipeline


def test_fp32_program_verifies_against_torch(pte_export):
    _, out, manifest = pte_export
    v = manifest["verification"]["pte"]
    assert v["passed"] and v["greedy_identical"] and v["prefill_max_abs_logit_diff"] <= 1e-3
    entry = manifest["graphs"]["pte"]["program"]
    assert entry["methods"] == ["vision_encoder", "token_embedding", "text_decoder"]
    assert {"get_max_seq_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "get_skip_id"} <= set(entry["constant_methods"])


def test_constant_methods_are_readable(pte_export):
    from executorch.runtime import Runtime

    model, out, _ = pte_export
    program = Runtime.get().load_program(out / "program.pte")
    assert program.load_method("get_max_seq_len").execute([])[0] == model.config.llm.max_seq_len
    assert program.load_method("get_skip_id").execute([])[0] == model.config.skip_id


@pytest.mark.parametrize("n_views", [1, 2, 3, 5])
def test_vision_method_takes_any_number_of_views(pte_export, n_views):
    model, out, _ = pte_export
    cfg = model.config
    pixels = torch.randn(n_views, 3, cfg.convnext.image_size + cfg.dinov2.image_size, cfg.convnext.image_size,
                         generator=torch.Generator().manual_seed(n_views))
    got = Pipeline(out, "pte").backend.encode_views(pixels.numpy())
    with torch.no_grad():
        want = VisionEncoder(model)(pixels).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
