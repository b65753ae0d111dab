"""A SPHINX .pte runs in ExecuTorch's own MultimodalRunner (the C++ runner behind its Android and iOS
demo apps), fed the sequence `multimodal_inputs.build_inputs` describes, and answers exactly as our
runtime does: skip tokens go in as plain token ids, each encoded view as one image input."""

import pytest

from sphinx_edge.bundled import SAMPLES
from sphinx_edge.prompt import STOP_STRINGS
from sphinx_edge.runtime.multimodal_inputs import build_inputs, sequence_length
from sphinx_edge.runtime.pipeline import Pipeline

CASES = [  # (image, question, views, skip tokens)
    ("shapes_2x1.png", "What colour is the circle?", 3, 2),
    ("tall_1x3.png", "What shape is shown?", 3, 2),
    ("square.png", "How many circles are there?", 5, 0),
]


def runner_answer(export_dir, segments, max_new_tokens: int) -> str:
    import torch
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  the decoder's llama:: kernels
    from executorch.extension.llm.runner import (GenerationConfig, MultimodalRunner, make_image_input,
                                                 make_token_input)

    inputs = [make_image_input(torch.from_numpy(s.image)) if s.kind == "image" else make_token_input(list(s.tokens))
              for s in segments]
    runner = MultimodalRunner(str(export_dir / "program.pte"), str(export_dir / "tokenizer.model"))
    pieces: list[str] = []
    runner.generate(inputs, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, echo=False),
                    token_callback=pieces.append)
    text = "".join(pieces)
    for stop in STOP_STRINGS:  # the runner stops on EOS only; our runtime also on "\n###"
        text = text.split(stop)[0]
    return text.strip()


@pytest.mark.parametrize("image,question,views,skips", CASES)
def test_multimodal_runner_answers_like_our_runtime(nano_int4_pte, image, question, views, skips):
    import executorch.extension.llm.runner  # noqa: F401 - in the executorch wheel, a core dependency
    ours = Pipeline(nano_int4_pte, "pte")
    expected = ours.answer(question, SAMPLES / image, max_new_tokens=12)
    segments = build_inputs(ours.config, ours.tokenizer, SAMPLES / image, question)

    assert sum(s.kind == "image" for s in segments) == views
    assert sum(s.tokens.count(ours.config.skip_id) for s in segments) == skips
    assert sequence_length(segments, ours.config.tokens_per_view) == expected.prompt_len
    assert expected.text  # a real answer, not an empty string that would match anything
    assert runner_answer(nano_int4_pte, segments, 12) == expected.text.strip()
