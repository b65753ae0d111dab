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
    assert v["image_embeds_cosine"] > 0.99999
    entry = manifest["graphs"]["pte"]["program"]
    assert entry["methods"] == ["vision_encoder", "token_embedding", "text_decoder"]
    assert {"get_max_seq_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "get_skip_id"} <= set(entry["constant_methods"])


def test_constant_methods_are_readable(pte_export):
    from executorch.runtime import Runtime

    model, out, _ = pte_export
    program = Runtime.get().load_program(out / "program.pte")
    assert program.load_method("get_max_seq_len").execute([])[0] == model.config.llm.max_seq_len
    assert program.load_method("get_skip_id").execute([])[0] == model.config.skip_id


def test_vision_method_encodes_one_view_per_call(pte_export):
    """One view per call, as the runtime and MultimodalRunner call it: ExecuTorch plans and allocates a
    method's activations for its largest input, so a view axis up to 5 would hold five views' worth."""
    model, out, _ = pte_export
    cfg = model.config
    pixels = torch.randn(3, 3, cfg.convnext.image_size + cfg.dinov2.image_size, cfg.convnext.image_size,
                         generator=torch.Generator().manual_seed(3))
    backend = Pipeline(out, "pte").backend
    got = np.concatenate([backend.encode_views(pixels[i:i + 1].numpy()) for i in range(3)])
    with torch.no_grad():
        want = VisionEncoder(model)(pixels).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(RuntimeError):
        backend.encode_views(pixels[:2].numpy())


def test_export_from_a_loader_frees_and_reloads_the_model(tokenizer_file, tmp_path):
    """With a loader the exporter loads a fresh model per stage (ONNX graphs, the in-place quantized
    ExecuTorch program, verification); with a model it leaves that model's weights untouched."""
    from sphinx_edge.config import get_config
    from sphinx_edge.export.exporter import ExportOptions, export_model
    from sphinx_edge.model.sphinx import build_model
    from sphinx_edge.tokenizer import Tokenizer

    calls = []

    def load():
        calls.append(1)
        return build_model(get_config("test-tiny"), seed=0).eval()

    tok = Tokenizer(tokenizer_file)
    manifest = export_model(load, tok, tmp_path / "a", ExportOptions(quant="int4", formats=("onnx", "pte")))
    assert len(calls) == 3  # onnx graphs, pte (quantized in place), verification against fp32
    for fmt in ("onnx", "pte"):
        assert manifest["verification"][fmt]["top1_agreement"] >= 0.8
        assert manifest["verification"][fmt]["prefill_max_abs_logit_diff"] < 1.0
        assert manifest["verification"][fmt]["image_embeds_cosine"] > 0.99  # int8 vision

    model = load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, tok, tmp_path / "b", ExportOptions(quant="int4", formats=("pte",), verify=False))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_coreml_backend_delegates_the_vision_encoder_and_says_where_it_runs(tokenizer_file, tmp_path):
    """--delegate coreml: the vision method is one Core ML delegate (compiled on the Apple device),
    the decoder XNNPACK; off Apple devices the export is not run, and says why."""
    import sys

    from executorch.exir._serialize._program import deserialize_pte_binary

    from sphinx_edge.config import get_config
    from sphinx_edge.export.exporter import ExportOptions, export_model
    from sphinx_edge.model.sphinx import build_model
    from sphinx_edge.runtime.manifest import ManifestError
    from sphinx_edge.tokenizer import Tokenizer

    model = build_model(get_config("test-tiny"), seed=0).eval()
    options = ExportOptions(quant="int4", formats=("pte",), delegate="coreml")
    manifest = export_model(model, Tokenizer(tokenizer_file), tmp_path / "c", options)
    assert manifest["graphs"]["pte"]["program"]["delegate"] == "coreml"
    program = deserialize_pte_binary((tmp_path / "c" / "program.pte").read_bytes())
    delegates = {plan.name: {d.id for d in plan.delegates} for plan in getattr(program, "program", program).execution_plan}
    assert delegates["vision_encoder"] == {"CoreMLBackend"}
    assert delegates["text_decoder"] == {"XnnpackBackend"}
    if sys.platform != "darwin":
        assert "Apple devices only" in manifest["verification"]["pte"]["skipped"]
        with pytest.raises(ManifestError, match="Core ML"):
            Pipeline(tmp_path / "c", "pte")


def test_export_from_a_model_source_runs_each_stage_in_its_own_process(tokenizer_file, tmp_path, monkeypatch):
    """What the CLI does for a large model: the ONNX and ExecuTorch stages load the weights in spawned
    processes; the result verifies against the same weights loaded here."""
    from sphinx_edge.export import exporter
    from sphinx_edge.export.exporter import ExportOptions, ModelSource, export_model
    from sphinx_edge.tokenizer import Tokenizer

    monkeypatch.setattr(exporter, "OWN_PROCESS_BYTES", 0)  # test-tiny counts as large
    source = ModelSource("test-tiny", seed=3)
    manifest = export_model(source, Tokenizer(tokenizer_file), tmp_path / "s",
                            ExportOptions(quant="fp32", formats=("onnx", "pte")))
    assert manifest["source"] == {"random_init": True, "seed": 3}
    for fmt in ("onnx", "pte"):
        assert manifest["verification"][fmt]["passed"], manifest["verification"][fmt]
    names = [s["name"] for s in manifest["export_stages"]]
    assert names[:5] == ["onnx graphs", "onnx quantize", "pte quantize, torch.export", "pte lower (xnnpack)",
                         "pte write"]


def _graph_digests(manifest: dict) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in manifest["files"].items()}


def test_streamed_weights_export_the_same_bytes_as_a_whole_model(tokenizer_file, tmp_path):
    """Random weights made and quantized one module at a time (a ModelSource) give byte-identical
    graphs to the model built whole in memory and quantized in place; each stage is timed and
    measured, and lowering reports its partitions as it goes."""
    from sphinx_edge.config import get_config
    from sphinx_edge.export.exporter import ExportOptions, ModelSource, export_model
    from sphinx_edge.model.sphinx import build_model
    from sphinx_edge.tokenizer import Tokenizer

    tok, options = Tokenizer(tokenizer_file), ExportOptions(quant="int4", formats=("onnx", "pte"), verify=False)
    whole = export_model(lambda: build_model(get_config("test-tiny"), seed=5).eval(), tok, tmp_path / "whole",
                         options)
    lines = []
    streamed = export_model(ModelSource("test-tiny", seed=5), tok, tmp_path / "streamed", options,
                            on_stage=lines.append)
    assert _graph_digests(streamed) == _graph_digests(whole)
    assert any(line.startswith("pte lower (xnnpack): text_decoder: partition 1 of ") for line in lines), lines
    assert [s["name"] for s in streamed["export_stages"]] == [
        "onnx graphs", "onnx quantize", "pte quantize, torch.export", "pte lower (xnnpack)", "pte write"]
    for stage in streamed["export_stages"]:
        assert stage["seconds"] >= 0
        assert stage["peak_rss_mib"] is None or stage["peak_rss_mib"] > 100  # a process with torch loaded


def test_the_export_context_sizes_the_static_cache(model_factory, tokenizer_file, tmp_path):
    """--max-seq-len: a shorter context is what the program, its constant methods, the manifest and
    the runtime all say, and the answers stay the PyTorch model's."""
    from executorch.runtime import Runtime

    from sphinx_edge.config import get_config
    from sphinx_edge.export.exporter import ExportError, ExportOptions, context_length, export_model
    from sphinx_edge.runtime.pipeline import Pipeline
    from sphinx_edge.tokenizer import Tokenizer

    assert context_length(get_config("tiny")) == 2048  # 1295 image tokens + 512, as a power of two
    assert context_length(get_config("nano")) == 512 == context_length(get_config("test-tiny"))  # their own max
    with pytest.raises(ExportError, match="longer than"):
        context_length(get_config("nano"), 1024)
    with pytest.raises(ExportError, match="longest image"):
        context_length(get_config("tiny"), 1200)
    model = model_factory("test-tiny")
    manifest = export_model(model, Tokenizer(tokenizer_file), tmp_path / "e",
                            ExportOptions(formats=("onnx", "pte"), max_seq_len=384))
    assert model.config.llm.max_seq_len == 512  # the caller's model is not changed
    assert manifest["model"]["config"]["llm"]["max_seq_len"] == 384
    assert manifest["verification"]["pte"]["greedy_identical"] and manifest["verification"]["onnx"]["greedy_identical"]
    program = Runtime.get().load_program(tmp_path / "e" / "program.pte")
    assert program.load_method("get_max_seq_len").execute([])[0] == 384
    for backend in ("onnx", "pte"):
        assert Pipeline(tmp_path / "e", backend).backend.max_seq_len == 384


def test_int8_embedding_table_runs_on_executorchs_quantized_kernel(model_factory, tmp_path):
    """--embedding-quant int8: one int8 row and scale per token, looked up by
    quantized_decomposed::embedding_byte; every row within half a step of the fp32 table."""
    from sphinx_edge.export.executorch import export_pte
    from sphinx_edge.export.graphs import TokenEmbedding
    from sphinx_edge.runtime.backends import PteBackend

    model = model_factory("test-tiny")
    export_pte(model, tmp_path, embedding_quant="int8")
    backend = PteBackend(tmp_path, {"program": ["program.pte"]}, model.config, threads=1)
    table = TokenEmbedding(model).embedding.weight.detach().numpy()
    got = backend.embed(np.arange(table.shape[0]))
    step = np.abs(table).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - table) <= step / 2 + 1e-7)
    assert not np.array_equal(got, table)  # it is quantized


def test_every_vision_linear_is_quantized_in_four_expert_models(model_factory):
    """int8 vision reaches CLIP, the Q-Former and both projectors too, not only ConvNeXt and DINOv2."""
    from torch import nn

    from sphinx_edge.export.executorch import linear_quantizer
    from sphinx_edge.model.sphinx import each_module

    model = each_module(model_factory("test-ens5"), linear_quantizer("int4", 32, "int8"))
    linears = {name: type(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {name.split(".")[0] for name in linears} == {"clip", "convnext", "dinov2", "qformer", "visual_proj",
                                                        "qformer_proj", "llm"}
    fp32 = sorted(name for name, kind in linears.items() if kind is nn.Parameter)
    assert not fp32, fp32
