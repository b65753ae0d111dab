"""The vision encoder's rewrites for XNNPACK: the same numbers, and a graph XNNPACK takes nearly whole."""

import collections
import re

import pytest
import torch
from torch import nn

from sphinx_edge.export.xnnpack_rewrites import (
    ATTENTION_AS_MATMULS,
    RingDepthwiseConv,
    prepare_vision_for_xnnpack,
    split_depthwise_convs,
)


@pytest.mark.parametrize("kernel", [7, 9, 11])
def test_ring_convolution_equals_the_depthwise_convolution(kernel):
    torch.manual_seed(kernel)
    conv = nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6)
    x = torch.randn(2, 6, 13, 10)
    ring = RingDepthwiseConv(conv)
    with torch.no_grad():
        torch.testing.assert_close(ring(x), conv(x), atol=1e-5, rtol=1e-5)
    taps = [m.weight[0].numel() for m in ring.modules() if isinstance(m, nn.Conv2d)] + [ring.columns[0].numel(), ring.rows[0].numel()]
    assert max(taps) <= 25  # every piece fits one of XNNPACK's depthwise kernels


def test_only_large_same_padded_depthwise_convolutions_are_split():
    model = nn.Sequential(nn.Conv2d(4, 4, 7, padding=3, groups=4),  # split
                          nn.Conv2d(4, 4, 5, padding=2, groups=4),  # fits a kernel
                          nn.Conv2d(4, 8, 7, padding=3),  # not depthwise
                          nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8))  # strided
    assert split_depthwise_convs(model) == 1
    assert isinstance(model[0], RingDepthwiseConv)
    assert [type(m) for m in model[1:]] == [nn.Conv2d] * 3


def test_attention_decomposition_matches_and_refuses_masks():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    program = torch.export.export(Attend(), (q, k, v)).run_decompositions(ATTENTION_AS_MATMULS)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("scaled_dot_product" in t for t in targets) and "aten.bmm.default" in targets
    torch.testing.assert_close(program.module()(q, k, v), Attend()(q, k, v), atol=1e-5, rtol=1e-5)

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    with pytest.raises(NotImplementedError, match="unmasked"):
        torch.export.export(Causal(), (q, k, v)).run_decompositions(ATTENTION_AS_MATMULS)


def test_fixed_position_embeddings_give_the_same_features(model_factory):
    model = model_factory("test-tiny")
    size = model.config.dinov2.image_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = model.dinov2(x)
        model.dinov2.fix_input_size(size, size)
        torch.testing.assert_close(model.dinov2(x), want)
        bigger = torch.randn(1, 3, 2 * size, 2 * size)  # another size still resizes the table
        assert model.dinov2(bigger).shape[1] == 1 + (2 * size // model.config.dinov2.patch_size) ** 2


def test_xnnpack_takes_the_rewritten_vision_encoder(model_factory):
    """After the rewrites, only LayerNorm (which XNNPACK has no operator for) and a few small copies
    run outside the delegate; before, the attention's safe softmax and the position resize did too.
    The lowered program computes what the eager model does."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from sphinx_edge.export.graphs import VisionEncoder

    model = model_factory("test-tiny")
    cfg = model.config
    pixels = torch.randn(1, 3, cfg.convnext.image_size + cfg.dinov2.image_size, cfg.convnext.image_size)
    with torch.no_grad():
        want = VisionEncoder(model)(pixels)
        prepare_vision_for_xnnpack(model)
        program = torch.export.export(VisionEncoder(model), (pixels,)).run_decompositions(ATTENTION_AS_MATMULS)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    outside = collections.Counter(re.search(r"aten\.(\w+)\.", str(n.target)).group(1)
                                  for n in edge.exported_program().graph.nodes
                                  if n.op == "call_function" and "aten." in str(n.target))
    assert set(outside) <= {"native_layer_norm", "squeeze_copy", "split_with_sizes_copy", "expand_copy", "mean"}, outside
    from sphinx_edge.runtime.backends import executorch_runtime

    buffer = edge.to_executorch().buffer  # the loaded program reads from it: keep it alive
    method = executorch_runtime()._load_for_executorch_from_buffer(buffer)
    torch.testing.assert_close(method.forward((pixels,))[0], want, atol=1e-4, rtol=1e-4)
