"""ONNX export of a small model: parity with torch, dynamic views, skip tokens, quantization, bad inputs."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_image
from sphinx_edge.config import get_config
from sphinx_edge.export.exporter import ExportOptions, export_model
from sphinx_edge.export.graphs import VisionEncoder
from sphinx_edge.export.onnx import decoder_graph, quantize_file
from sphinx_edge.layout import pack_views, preprocess
from sphinx_edge.runtime.manifest import ManifestError, read_manifest
from sphinx_edge.runtime.pipeline import Pipeline
from sphinx_edge.tokenizer import Tokenizer


def test_fp32_export_verifies_against_torch(onnx_export):
    _, out, manifest = onnx_export
    v = manifest["verification"]["onnx"]
    assert v["passed"] and v["greedy_identical"] and v["steps"] == 32
    assert v["prefill_max_abs_logit_diff"] <= 1e-3
    assert read_manifest(out)["files"] == manifest["files"]
    names = [i["name"] for i in manifest["graphs"]["onnx"]["decoder"]["inputs"]]
    assert names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert manifest["graphs"]["onnx"]["decoder"]["outputs"][1]["name"] == "present.0.key"
    # optimum's dimension names, not torch.export's symbols
    shapes = {v["name"]: v["shape"] for g in manifest["graphs"]["onnx"].values() for v in g["inputs"] + g["outputs"]}
    assert shapes["inputs_embeds"][1] == shapes["position_ids"][1] == shapes["input_ids"][1] == "sequence_length"
    assert shapes["attention_mask"] == [1, "total_sequence_length"]
    assert shapes["past_key_values.0.key"][2] == "past_sequence_length"
    assert shapes["present.0.key"][2] in ("past_sequence_length + sequence_length",
                                         "sequence_length + past_sequence_length")
    assert shapes["pixel_values"][0] == shapes["image_embeds"][0] == "num_views"


def test_vision_graph_runs_gelu_as_one_fused_op(onnx_export):
    """ConvNeXt's exact GELU is onnxruntime's fused Gelu in the graph (the views' parity with torch is
    checked above and below); nothing of the five-op form is left."""
    _, out, _ = onnx_export
    ops = [n.op_type for n in onnx.load(out / "vision_encoder.onnx", load_external_data=False).graph.node]
    assert ops.count("Gelu") == sum(get_config("test-tiny").convnext.depths) and "Erf" not in ops


def test_gelu_fusion_keeps_the_values_and_leaves_other_graphs_alone():
    from onnx import TensorProto, helper, numpy_helper

    from sphinx_edge.export.onnx import fuse_gelu

    def graph(sqrt2: float):
        consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("r", sqrt2), ("one", 1.0), ("half", 0.5))]
        nodes = [helper.make_node("Div", ["x", "r"], ["a"]), helper.make_node("Erf", ["a"], ["b"]),
                 helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Mul", ["half", "c"], ["d"]),
                 helper.make_node("Mul", ["x", "d"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 4]) for n in ("x", "z")]
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], consts),
                                 opset_imports=[helper.make_opsetid("", 18)])

    x = np.linspace(-4, 4, 12, dtype=np.float32).reshape(3, 4)
    model = graph(2 ** 0.5)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert fuse_gelu(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gelu", "Relu"]
    assert not model.graph.initializer  # its constants went with it
    np.testing.assert_allclose(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], want, atol=1e-6)
    other = graph(2.0)  # not a GELU
    assert fuse_gelu(other) == 0 and len(other.graph.node) == 6


@pytest.mark.parametrize("n_views", [1, 2, 3, 5])
def test_vision_graph_takes_any_number_of_views(onnx_export, n_views):
    model, out, _ = onnx_export
    cfg = model.config
    pixels = torch.randn(n_views, 3, cfg.convnext.image_size + cfg.dinov2.image_size, cfg.convnext.image_size,
                         generator=torch.Generator().manual_seed(n_views))
    session = ort.InferenceSession(str(out / "vision_encoder.onnx"))
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = VisionEncoder(model)(pixels).numpy()
    assert got.shape == (n_views, cfg.tokens_per_view, cfg.llm.dim)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_padded_tiles_shorten_the_exported_sequence(onnx_export, tmp_path):
    model, out, _ = onnx_export
    cfg = model.config
    pipeline = Pipeline(out)
    make_image(64, 64).save(tmp_path / "square.png")
    make_image(120, 40, seed=1).save(tmp_path / "wide.png")  # 3:1: the bottom row of the 2x2 grid is padding
    square = pipeline.answer("What is this?", tmp_path / "square.png", max_new_tokens=2)
    wide = pipeline.answer("What is this?", tmp_path / "wide.png", max_new_tokens=2)
    plan, _, _ = preprocess(tmp_path / "wide.png", layout=cfg.layout, grid=cfg.grid,
                            tile_size=cfg.convnext.image_size, dino_size=cfg.dinov2.image_size)
    assert square.timings["views"] == 5 and wide.timings["views"] == plan.n_views == 3
    assert square.image_tokens == 5 * cfg.tokens_per_view
    assert wide.image_tokens == plan.n_image_tokens(cfg.tokens_per_view) == 3 * cfg.tokens_per_view + 2
    assert wide.prompt_len < square.prompt_len


def test_packed_views_keep_both_experts_exact(onnx_export, tmp_path):
    model, _, _ = onnx_export
    cfg = model.config
    make_image(70, 30).save(tmp_path / "img.png")
    _, cv, dv = preprocess(tmp_path / "img.png", layout=cfg.layout, grid=cfg.grid,
                           tile_size=cfg.convnext.image_size, dino_size=cfg.dinov2.image_size)
    with torch.no_grad():
        packed = VisionEncoder(model)(torch.from_numpy(pack_views(cv, dv)))
        direct = model.encode_views(torch.from_numpy(cv), torch.from_numpy(dv))
    torch.testing.assert_close(packed, direct, rtol=0, atol=0)


def test_int4_uses_matmulnbits_and_reports_agreement(model_factory, tokenizer_file, tmp_path):
    model = model_factory("test-tiny")
    manifest = export_model(model, Tokenizer(tokenizer_file), tmp_path / "q", ExportOptions(quant="int4"))
    ops = {n.op_type for n in onnx.load(tmp_path / "q" / "decoder.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    vision_ops = {n.op_type for n in onnx.load(tmp_path / "q" / "vision_encoder.onnx", load_external_data=False).graph.node}
    assert "MatMulInteger" in vision_ops  # int8 at most on the vision side
    v = manifest["verification"]["onnx"]
    assert 0.5 <= v["top1_agreement"] <= 1.0 and "passed" not in v
    assert manifest["quantization"] == {"quant": "int4", "group_size": 32, "accuracy_level": 4, "vision": "int8",
                                        "embedding": "fp32"}


def test_same_model_exports_identical_graphs(onnx_export, tokenizer_file, tmp_path):
    model, _, manifest = onnx_export
    again = export_model(model, Tokenizer(tokenizer_file), tmp_path / "again", ExportOptions(verify=False))
    graphs = [f for f in manifest["files"] if ".onnx" in f]
    assert graphs and {f: again["files"][f] for f in graphs} == {f: manifest["files"][f] for f in graphs}


def test_fp16_and_int8_graphs_load_and_stay_close(model_factory, tmp_path):
    model = model_factory("test-tiny")
    decoder_graph(model, tmp_path / "fp32.onnx")
    c = model.config.llm
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.normal(0, 0.02, (1, 4, c.dim)).astype(np.float32),
             "attention_mask": np.ones((1, 4), dtype=np.int64), "position_ids": np.arange(4)[None],
             **{f"past_key_values.{i}.{kv}": np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32)
                for i in range(c.n_layers) for kv in ("key", "value")}}
    reference = ort.InferenceSession(str(tmp_path / "fp32.onnx")).run(["logits"], feeds)[0].ravel()
    for quant, op, min_cosine in (("fp16", "Cast", 0.9999), ("int8", "MatMulInteger", 0.99), ("int4", "MatMulNBits", 0.95)):
        files = quantize_file(tmp_path / "fp32.onnx", quant, tmp_path / f"{quant}.onnx")
        assert files[0] == tmp_path / f"{quant}.onnx"
        assert op in {n.op_type for n in onnx.load(files[0], load_external_data=False).graph.node}
        got = ort.InferenceSession(str(files[0])).run(["logits"], feeds)[0].ravel()
        cosine = got @ reference / np.linalg.norm(got) / np.linalg.norm(reference)
        assert cosine >= min_cosine, (quant, cosine)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")], "scratch files left behind"


# --- bad inputs ---------------------------------------------------------------------------------


def test_tampered_or_missing_files_are_refused(onnx_export, tmp_path):
    import shutil

    _, out, _ = onnx_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "decoder.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ManifestError, match="decoder.onnx.data does not match its manifest hash"):
        Pipeline(copy)
    (copy / "decoder.onnx.data").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Pipeline(copy)
    (copy / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99"):
        Pipeline(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        Pipeline(copy)
    with pytest.raises(ManifestError, match="no pte graphs"):
        Pipeline(out, "pte")


def test_a_written_graph_lets_go_of_the_weights_it_was_made_from(tmp_path):
    """Writing one graph keeps no reference to the model's weights (onnxscript's rewrite rules held on
    to the last graph they matched): a large export frees one graph's weights before the next."""
    import gc
    import weakref

    from sphinx_edge.export.onnx import vision_encoder_graph
    from sphinx_edge.export.source import ModelSource

    model = ModelSource("test-tiny", seed=0).load()
    weight = weakref.ref(next(model.dinov2.parameters()))
    vision_encoder_graph(model, tmp_path / "vision_encoder.onnx")
    del model
    gc.collect()
    assert weight() is None


def test_the_int4_quantizer_leaves_the_root_logger_alone():
    """onnxruntime's quantizer module configures the root logger at INFO when imported; the export puts
    it back, so no library's INFO lines reach the user's terminal."""
    import subprocess
    import sys

    script = ("import logging\nfrom sphinx_edge.export.onnx import matmul_nbits_quantizer\n"
              "matmul_nbits_quantizer()\nroot = logging.getLogger()\n"
              "print(len(root.handlers), logging.getLevelName(root.level))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "WARNING"], done.stdout + done.stderr


def test_generated_value_names_are_numbered_in_graph_order():
    """Which of two equal constants survives onnxscript's deduplication varies from process to process;
    renumbering the exporter's `val_N` names in graph order makes the file the same either way."""
    from onnx import TensorProto, helper

    from sphinx_edge.export.onnx import renumber_values

    def graph(first: str, second: str) -> onnx.GraphProto:
        zero = helper.make_tensor(first, TensorProto.INT64, [], [0])
        nodes = [helper.make_node("Gather", ["x", first], [second]),
                 helper.make_node("Relu", [second], ["y"])]
        return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [zero])

    a, b = graph("val_2", "val_7"), graph("val_3", "val_5")
    renumber_values(a)
    renumber_values(b)
    assert a == b
    assert [list(n.input) for n in a.node] == [["x", "val_0"], ["val_1"]] and a.initializer[0].name == "val_0"
    assert a.input[0].name == "x" and a.output[0].name == "y"
