"""The exported decoders of every LLM family answer as the PyTorch model does: greedy tokens equal,
logits close, through a conversation's cache uses (prefill, decode, a follow-up chunk after
decoding, a rewind that overwrites stale slots)."""

import numpy as np
import onnx
import pytest
import torch

from sphinx_edge.config import get_config
from sphinx_edge.export.graphs import TextDecoder
from sphinx_edge.model.sphinx import build_model

FAMILY_SIZES = ["test-tiny", "test-intern2", "test-plus", "test-moe", "nano"]  # llama GQA, internlm2, llama MHA, mixtral; ours
CONTEXT = 96


def family_model(size: str):
    """Random weights for the small configs; the shipped weights for Nano."""
    if size == "nano":
        from sphinx_edge.checkpoints import load_model
        from sphinx_edge.bundled import WEIGHTS

        return load_model(WEIGHTS / "nano", "nano").eval()
    return build_model(get_config(size), seed=1).eval()


def lowered_text_decoder(model, context: int):
    """The text_decoder method alone, lowered as export_pte lowers it (fp32, XNNPACK, llama ops)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.runtime import Runtime
    from torch.export import Dim

    seq = Dim("seq_len", min=1, max=context)
    with torch.no_grad():
        program = torch.export.export(TextDecoder(model, max_seq_len=context),
                                      (torch.zeros(1, 3, model.config.llm.dim), torch.arange(3)),
                                      dynamic_shapes=({1: seq}, {0: seq}))
    edge = to_edge_transform_and_lower({"forward": program}, partitioner={"forward": [XnnpackPartitioner()]},
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    buffer = edge.to_executorch(ExecutorchBackendConfig(
        sym_shape_eval_pass={"forward": ConstraintBasedSymShapeEvalPass()})).buffer
    program = Runtime.get().load_program(buffer)  # reads `buffer` in place: it must outlive the method
    method = program.load_method("forward")

    def run(embeds: torch.Tensor, positions: torch.Tensor, _keep=(buffer, program)) -> torch.Tensor:
        return method.execute([embeds, positions])[0][0, -1]
    return run


def conversation(model, step):
    """Greedy tokens and the last logits of (prefill 20, 6 tokens, a 7-token follow-up, 4 tokens,
    rewind to 22 and 4 more), where `step(embeds [1, T, dim], start)` returns the last logits."""
    embed = model.llm.tok_embeddings
    dim = model.config.llm.dim
    prompt = torch.randn(1, 20, dim, generator=torch.Generator().manual_seed(0))
    follow_up = torch.randn(1, 7, dim, generator=torch.Generator().manual_seed(1))
    logits, tokens, length = step(prompt, 0), [], 20
    with torch.no_grad():
        for chunk in ("decode", "follow-up", "decode", "rewind", "decode"):
            if chunk == "decode":
                for _ in range(6 if not tokens else 4):
                    tokens.append(int(logits.argmax()))
                    logits = step(embed(torch.tensor([[tokens[-1]]])), length)
                    length += 1
            elif chunk == "follow-up":
                logits, length = step(follow_up, length), length + follow_up.shape[1]
            else:  # back to just after the first two answer tokens: later slots hold stale keys
                length = 22
                logits = step(embed(torch.tensor([[tokens[1]]])), 21)
    return tokens, torch.as_tensor(logits)


def torch_conversation(model):
    llm = model.llm
    with torch.no_grad():
        llm.setup_caches(max_seq_len=CONTEXT)
        try:
            return conversation(model, lambda x, start: llm(x, torch.arange(start, start + x.shape[1]),
                                                             last_logits_only=True)[0, -1])
        finally:
            llm.clear_caches()


@pytest.mark.parametrize("size", FAMILY_SIZES)
def test_pte_decoder_follows_the_torch_model_through_a_conversation(size):
    model = family_model(size)
    run = lowered_text_decoder(model, CONTEXT)
    want_tokens, want_logits = torch_conversation(model)
    with torch.no_grad():
        got_tokens, got_logits = conversation(model, lambda x, start: run(x, torch.arange(start, start + x.shape[1])))
    assert got_tokens == want_tokens
    np.testing.assert_allclose(got_logits.numpy(), want_logits.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", FAMILY_SIZES)
def test_onnx_decoder_follows_the_torch_model_through_a_conversation(size, tmp_path):
    """onnxruntime's GroupQueryAttention both ways it runs: fed the past as optimum's models are
    (cut back on a rewind), and through the runtime's backend, whose cache buffers are bound as
    past and present at once."""
    import onnxruntime as ort

    from sphinx_edge.export.onnx import decoder_graph, token_embedding_graph, vision_encoder_graph
    from sphinx_edge.runtime.backends import OnnxBackend

    model = family_model(size)
    c = model.config.llm
    for name, write in (("decoder", decoder_graph), ("token_embedding", token_embedding_graph),
                        ("vision_encoder", vision_encoder_graph)):
        write(model, tmp_path / f"{name}.onnx")
    nodes = [n for n in onnx.load(tmp_path / "decoder.onnx", load_external_data=False).graph.node
             if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == c.n_layers
    rotary = {a.name: a.i for a in nodes[0].attribute}["do_rotary"]
    assert rotary == (c.head_dim % 16 == 0)  # RoPE inside the fused op where onnxruntime allows it
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"))
    names = [f"past_key_values.{i}.{kv}" for i in range(c.n_layers) for kv in ("key", "value")]
    past = [np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32) for _ in names]

    def step(x, start):
        nonlocal past
        T = x.shape[1]
        feeds = {"inputs_embeds": x.numpy(), "attention_mask": np.ones((1, start + T), np.int64),
                 "position_ids": np.arange(start, start + T)[None],
                 **{name: p[:, :, :start] for name, p in zip(names, past)}}
        logits, *past = session.run(None, feeds)
        return torch.from_numpy(logits[0, -1])

    backend = OnnxBackend(tmp_path, {n: [f"{n}.onnx"] for n in ("decoder", "token_embedding", "vision_encoder")},
                          model.config.with_context(CONTEXT), threads=1)

    def backend_step(x, start):
        backend.truncate(start)
        return torch.from_numpy(backend.forward(x[0].numpy()))

    want_tokens, want_logits = torch_conversation(model)
    for run in (step, backend_step):
        got_tokens, got_logits = conversation(model, run)
        assert got_tokens == want_tokens
        np.testing.assert_allclose(got_logits.numpy(), want_logits.numpy(), atol=1e-4, rtol=1e-4)


def test_the_pte_decoder_uses_executorchs_llm_ops():
    """The cache is written in place and read up to the current position (no full-cache copy)."""
    model = build_model(get_config("test-tiny"), seed=1).eval()
    with torch.no_grad():
        program = torch.export.export(TextDecoder(model, max_seq_len=CONTEXT),
                                      (torch.zeros(1, 3, model.config.llm.dim), torch.arange(3)))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    layers = model.config.llm.n_layers
    assert targets.count("llama.update_cache.default") == 2 * layers
    assert targets.count("llama.custom_sdpa.default") == layers
    assert not any("index_copy" in t or "einsum" in t for t in targets)
