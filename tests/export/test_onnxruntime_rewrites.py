"""ConvNeXt's MLPs a few rows at a time, its downsamplings as matmuls, layer scales folded into the
weights: the same numbers, one copy of each weight in the graph."""

import collections
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from sphinx_edge.config import get_config
from sphinx_edge.export.onnx_int8 import quantize_matmuls_int8, quantize_weight
from sphinx_edge.export.onnxruntime_rewrites import (PatchMatMulDownsample, RowChunkedMlp, _scale_outputs,
                                                     chunk_convnext_mlps, fold_layer_scales,
                                                     matmul_convnext_downsamples)
from sphinx_edge.model.convnext import ConvNeXt, LayerNorm2d
from sphinx_edge.model.dinov2 import DINOv2, LayerScale
from sphinx_edge.model.mlp import Mlp


def _mlp(dim: int = 8, hidden: int = 32) -> Mlp:
    torch.manual_seed(0)
    return Mlp(dim, hidden).eval()


def test_rows_at_a_time_equal_the_whole_map():
    mlp = _mlp()
    x = torch.randn(2, 7, 5, 8)
    chunked = RowChunkedMlp(mlp, chunk_positions=2 * 5, whole_bytes=0)  # 2 rows a chunk: 4 chunks
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), mlp(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("whole_bytes, matmuls", [(0, 8), (7 * 5 * 32 * 4, 2)])
def test_the_graph_has_a_matmul_pair_per_chunk_over_one_copy_of_the_weights(tmp_path, whole_bytes, matmuls):
    """4 chunks of 2, 2, 2 and 1 rows; a map at or under `whole_bytes` runs whole. Checked against
    onnxruntime with a dynamic batch, as the vision encoder is exported."""
    mlp = RowChunkedMlp(_mlp(), chunk_positions=2 * 5, whole_bytes=whole_bytes)
    x = torch.randn(3, 7, 5, 8)
    path = tmp_path / "mlp.onnx"
    with torch.no_grad():
        torch.onnx.export(mlp, (x,), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: Dim("views", min=1, max=8)},))
        want = mlp(x).numpy()
    graph = onnx.load(path).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["MatMul"] == matmuls
    weights = [t for t in graph.initializer if len(t.dims) == 2]
    assert sorted(tuple(t.dims) for t in weights) == [(8, 32), (32, 8)]  # each weight once, transposed
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_every_convnext_block_is_wrapped_once():
    convnext = ConvNeXt(get_config("test-tiny").convnext)
    blocks = sum(len(stage.blocks) for stage in convnext.stages)
    assert chunk_convnext_mlps(convnext) == blocks
    assert chunk_convnext_mlps(convnext) == 0
    assert all(isinstance(b.mlp, RowChunkedMlp) for stage in convnext.stages for b in stage.blocks)


def _downsample(cin: int = 8, cout: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(0)
    down = torch.nn.Sequential(LayerNorm2d(cin, eps=1e-6), torch.nn.Conv2d(cin, cout, 2, stride=2)).eval()
    with torch.no_grad():  # a LayerNorm that is not the identity
        down[0].weight.normal_(1.0, 0.2)
        down[0].bias.normal_(0.0, 0.2)
    return down


@pytest.mark.parametrize("height, width", [(8, 6), (7, 9)])  # 7 x 9: the convolution drops the ragged edge
def test_patch_matmul_downsample_equals_layernorm_and_convolution(height, width):
    down = _downsample()
    x = torch.randn(2, 8, height, width)
    with torch.no_grad():
        torch.testing.assert_close(PatchMatMulDownsample(*down)(x), down(x), atol=1e-5, rtol=1e-5)


def test_only_a_patch_convolution_is_taken():
    with pytest.raises(ValueError, match="not a patch convolution"):
        PatchMatMulDownsample(LayerNorm2d(8), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1))


def test_the_downsample_graph_is_one_matmul_that_the_int8_export_quantizes(tmp_path):
    """No Conv left: one MatMul on a [4 C_in, C_out] weight, which `quantize_matmuls_int8` turns into
    int8 (the point of the rewrite); onnxruntime gives the convolution's numbers in fp32 with a
    dynamic batch, and nearly them in int8."""
    down = _downsample()
    x = torch.randn(3, 8, 10, 12)
    path = tmp_path / "down.onnx"
    with torch.no_grad():
        want = down(x).numpy()
        torch.onnx.export(PatchMatMulDownsample(*down).eval(), (x,), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: Dim("views", min=1, max=8)},))
    graph = onnx.load(path).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["Conv"] == 0 and ops["MatMul"] == 1
    assert [tuple(t.dims) for t in graph.initializer if len(t.dims) == 2] == [(4 * 8, 16)]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(run(path), want, atol=1e-5, rtol=1e-5)
    int8 = tmp_path / "down.int8.onnx"
    quantize_matmuls_int8(path, int8)
    assert collections.Counter(node.op_type for node in onnx.load(int8).graph.node)["MatMulInteger"] == 1
    got = run(int8)
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.999


def test_every_convnext_downsampling_is_replaced_once_with_the_same_numbers():
    convnext = ConvNeXt(get_config("test-tiny").convnext).eval()
    x = torch.randn(1, 3, convnext.config.image_size, convnext.config.image_size)
    with torch.no_grad():
        want = convnext(x)
        assert matmul_convnext_downsamples(convnext) == len(convnext.stages) - 1  # the first stage has none
        assert matmul_convnext_downsamples(convnext) == 0
        torch.testing.assert_close(convnext(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn", ["swiglu", "mlp"])
def test_folded_layer_scales_give_the_same_encoders(ffn):
    """Every ConvNeXt gamma and DINOv2 ls1 / ls2 goes into the weights (gains that are not 1), chunked
    MLPs included; the encoders' outputs stay; a second fold finds nothing."""
    cfg = get_config("test-tiny")
    torch.manual_seed(0)
    convnext, dino = ConvNeXt(cfg.convnext).eval(), DINOv2(replace(cfg.dinov2, ffn=ffn)).eval()
    with torch.no_grad():
        for p in [*convnext.parameters(), *dino.parameters()]:
            if p.ndim == 1:  # gains and biases away from their init (ConvNeXt's gamma starts at 1e-6)
                p.normal_(0.0, 1.0)
    chunk_convnext_mlps(convnext, chunk_positions=4, whole_bytes=0)
    x = torch.randn(1, 3, cfg.convnext.image_size, cfg.convnext.image_size)
    v = torch.randn(1, 3, cfg.dinov2.image_size, cfg.dinov2.image_size)
    with torch.no_grad():
        want = convnext(x), dino(v)
        blocks = sum(len(stage.blocks) for stage in convnext.stages)
        changed = []  # weights in a scratch file hand their pages back after each one
        folded = sum(fold_layer_scales(m, after_each=lambda: changed.append(1)) for m in (convnext, dino))
        assert folded == len(changed) == blocks + 2 * len(dino.blocks)
        assert fold_layer_scales(convnext) + fold_layer_scales(dino) == 0
        torch.testing.assert_close(convnext(x), want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dino(v), want[1], atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, LayerScale) for m in dino.modules())


def test_a_folded_gain_leaves_the_int8_weights_as_they_were():
    """Per-column int8 absorbs a gain on each output: the same integers (sign-flipped for a negative
    gain), the scale times |gain|."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    gain = torch.randn(8)
    q, scale = quantize_weight(linear.weight.detach().t().numpy())
    _scale_outputs(linear, gain)
    q_folded, scale_folded = quantize_weight(linear.weight.detach().t().numpy())
    np.testing.assert_array_equal(q_folded, q * np.sign(gain.numpy()).astype(np.int8))
    np.testing.assert_allclose(scale_folded, scale * np.abs(gain.numpy()), rtol=1e-6)
