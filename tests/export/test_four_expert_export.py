"""Export of the four-expert models (CLIP ViT-L/14 and BLIP-2's Q-Former beside ConvNeXt and DINOv2) from a
released LLaMA2-Accessory directory: the graphs answer as the PyTorch model read from the same files."""

import shutil

import pytest

from sphinx_edge.checkpoints import load_model
from sphinx_edge.export.exporter import ExportOptions, export_model
from sphinx_edge.export.source import ModelSource
from sphinx_edge.generate import generate
from sphinx_edge.runtime.pipeline import Pipeline
from sphinx_edge.tokenizer import Tokenizer
from tests.checkpoints.test_accessory import FOUR_EXPERTS, write_released
from tests.conftest import make_image

QUESTION = "What colour is the square?"
# Both formats for one llama_type of each view scheme (the 1k tiles with LLaMA, one view with Mixtral's
# sparse LLM); ONNX only for the other two: lowering a program takes most of a minute here.
FORMATS = {"test-ens": ("onnx",), "test-ens5": ("onnx", "pte"), "test-sparse-ens": ("onnx", "pte"),
           "test-sparse-ens5": ("onnx",)}


@pytest.mark.parametrize("size", list(FOUR_EXPERTS))
def test_a_released_four_expert_checkpoint_exports_and_answers_as_torch(model_factory, tokenizer_file, tmp_path,
                                                                       size):
    released = tmp_path / "released"
    write_released(model_factory(size, seed=21), released)
    shutil.copy(tokenizer_file, released / "tokenizer.model")
    manifest = export_model(ModelSource(None, checkpoint=str(released)), Tokenizer(tokenizer_file),
                            tmp_path / "export", ExportOptions(quant="fp32", formats=FORMATS[size]))
    assert manifest["model"]["name"] == size
    model = load_model(released)
    image = tmp_path / "wide.png"
    make_image(90, 40, seed=5).save(image)
    want = generate(model, Tokenizer(tokenizer_file), QUESTION, image, max_new_tokens=8)
    assert want.token_ids and want.image_tokens % model.config.tokens_per_view == 0
    for fmt in FORMATS[size]:
        v = manifest["verification"][fmt]
        assert v["passed"] and v["prefill_max_abs_logit_diff"] <= 1e-3 and v["image_embeds_cosine"] > 0.9999, v
        got = Pipeline(tmp_path / "export", fmt).answer(QUESTION, image, max_new_tokens=8)
        assert got.token_ids == want.token_ids and got.image_tokens == want.image_tokens, fmt
